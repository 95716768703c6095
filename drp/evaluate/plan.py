"""What a run is: its items and their seeds, its settings (config.json), and the folder that holds them.

Where it sits: the first step of `run`, `items` and `import`, and what `score` and `report` read back.
A benchmark is a sorted list of items (one image each); item i gets the seed derived from (base seed,
item id), so its image never depends on how many processes share the work. A run folder holds

    RUN/config.json     the settings; a folder holding other settings is refused, not overwritten
    RUN/items.jsonl     one line per item: id, prompt, subject, content, style, seed, file
    RUN/images/<id>.png the images (made by `run`, or brought in by `import`)

`content` is relative to DATA (`dataset/cat/00.jpg`), `style` to the style folder (both in config.json).
The benchmarks (docs/EVALUATION.md):

- dreambench: each subject × its 25 class-only prompts × K; the first photo (sorted) is `content`;
- style: each style picture × the content prompts × K;
- dual: each subject × each style picture × the subject's prompts × K.

An item id is `<subject>[-<style>]-<prompt number>-<image number>` ("cat-03-01"): the items of one
(subject, style, prompt) differ only in their last part, which is how `run --batch` groups them.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DrpError
from ..files import write_atomically
from . import data as bench_data

BENCHES = ("dreambench", "style", "dual")
# Format 2 added the negative prompt, the modes' knobs (`options`), the image prompt's scale and `batch`;
# a format-1 folder is the same run with their defaults (`upgrade`), so it is resumed, scored and reported.
FORMAT = 2
FORMAT_1_DEFAULTS = dict(negative_prompt="", options={}, ip_scale=None, batch=1)
# config.json keys that decide each image's pixels: a run folder refuses a different value of any of them.
# The others (which subjects, how many prompts and images, --limit, DATA's path) only choose the items.
PIXEL_SETTINGS = ("format", "bench", "mode", "seed", "steps", "height", "width", "guidance", "dtype", "model",
                  "model_dtype", "ip_adapter", "style_dir", "negative_prompt", "options", "ip_scale", "batch")
TEMPORARY = re.compile(r"^\..+\.\d+\.tmp$")  # files/write_atomically's `.<name>.<pid>.tmp`


@dataclass(frozen=True)
class Item:
    """One image of a benchmark."""

    id: str  # "cat-03-01": subject (and style), prompt number, image number
    prompt: str
    subject: str  # the class noun that names the subject in the prompt ("" for the style benchmark)
    content: str  # the conditioning photo, relative to DATA ("" when none)
    style: str  # the style picture, relative to the style folder ("" when none)
    seed: int
    file: str  # "images/<id>.png", relative to RUN


def item_seed(base, item_id):
    """A seed in [0, 2³²) from (base seed, item id): the same for an item whatever the sharding."""
    return int.from_bytes(hashlib.sha256(f"{base}/{item_id}".encode()).digest()[:4], "big")


def prompt_of(item_id):
    """The id of an item's (subject, style, prompt): "cat-shipwreck-03-01" -> "cat-shipwreck-03"."""
    return item_id.rsplit("-", 1)[0]


def prompt_number(item_id):
    """The prompt's position in its list (0-based): "cat-shipwreck-03-01" -> 3."""
    return int(item_id.rsplit("-", 2)[1])


def build_items(bench, data=None, style_dir=None, subjects=None, prompts=None, images_per_prompt=4, limit=None,
                seed=0):
    """(sorted items, style folder or None) of a benchmark."""
    if bench not in BENCHES:
        raise DrpError(f"unknown benchmark {bench!r}; choose one of {', '.join(BENCHES)}.")
    if images_per_prompt < 1 or (prompts is not None and prompts < 1) or (limit is not None and limit < 1):
        raise DrpError("--images-per-prompt, --prompts and --limit must be whole numbers ≥ 1.")
    if subjects is not None and not subjects:  # `--subjects ,`: a run of nothing
        raise DrpError("--subjects names no subject; give names such as cat,dog, or leave it out for all.")
    rows = []  # (id, prompt, subject, content, style)
    styles = (None, [""])
    if bench in ("style", "dual"):
        styles = bench_data.style_images(style_dir)
    if bench == "style":
        if subjects:
            raise DrpError("--subjects chooses DreamBench subjects; the style benchmark has none.")
        for style in styles[1]:
            for p, prompt in enumerate(bench_data.CONTENT_PROMPTS[:prompts]):
                rows.append((f"{bench_data.slug(style)}-{p:02d}", prompt, "", "", style))
    else:
        if data is None:
            raise DrpError(f"the {bench} benchmark needs DreamBench: give --data DATA "
                           f"({bench_data.DOWNLOAD_HINT}).")
        for s in bench_data.dreambench(data, subjects):
            for style in styles[1]:
                name = f"{s.name}-{bench_data.slug(style)}" if style else s.name
                for p, prompt in enumerate(s.prompts[:prompts]):
                    rows.append((f"{name}-{p:02d}", prompt, s.noun, s.photos[0], style))
    items = [Item(f"{name}-{k:02d}", prompt, subject, content, style, item_seed(seed, f"{name}-{k:02d}"),
                  f"images/{name}-{k:02d}.png")
             for name, prompt, subject, content, style in rows for k in range(images_per_prompt)]
    items.sort(key=lambda item: item.id)
    if len({item.id for item in items}) != len(items):
        raise DrpError("two style pictures have the same name once made file-safe; rename one of them.")
    return items[:limit], styles[0]


def item_config(bench, data=None, style_dir=None, subjects=None, prompts=None, images_per_prompt=4, limit=None,
                seed=0):
    """The settings that choose a run's items (config.json holds them beside the pixel settings)."""
    return dict(bench=bench, seed=seed,
                style_dir=str(Path(style_dir).resolve()) if style_dir and bench != "dreambench" else None,
                data=str(Path(data).resolve()) if data else None, subjects=subjects, prompts=prompts,
                images_per_prompt=images_per_prompt, limit=limit)


def items_of(cfg):
    """(items, style folder) that a config describes."""
    items, style_dir = build_items(cfg["bench"], cfg["data"], cfg["style_dir"], cfg["subjects"], cfg["prompts"],
                                   cfg["images_per_prompt"], cfg["limit"], cfg["seed"])
    return items, style_dir or bench_data.ASSETS


def write_text(path, text):
    """Write `text` to `path` through a temporary file; a file that already holds it is left untouched.

    The one writer of the harness's text files (config.json, items.jsonl, scores, the report)."""
    path = Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), "choose a writable folder.")


def write_lines(path, rows):
    """Rows as JSON lines, written through a temporary file."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def make_folder(folder):
    """mkdir -p, with a sentence instead of a traceback when the folder cannot be made."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DrpError(f"cannot create the folder {folder} ({e.strerror or e}); choose a writable place.") from None


def remove_leftovers(folder, names):
    """Delete the temporary files a killed process left in `folder`, of the files whose name `names(name)` accepts.

    A process killed between writing a temporary file and renaming it (kill -9, a lost machine) leaves
    `.<name>.<pid>.tmp` behind; the command that wrote it removes it when it starts again."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if TEMPORARY.match(p.name) and names(p.name[1:].rsplit(".", 2)[0]):
                p.unlink(missing_ok=True)


def upgrade(cfg):
    """A config.json as this version writes it: format 1 gains format 2's settings at their defaults."""
    if cfg.get("format") == 1:
        cfg = {**FORMAT_1_DEFAULTS, **cfg, "format": FORMAT}
    return cfg


def read_config(path):
    """A run's config.json, upgraded; DrpError when it is no run's, or a newer drp's."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        cfg = None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("format"), int):
        raise DrpError(f"{path} is not a run's config.json; choose another folder.")
    if cfg["format"] > FORMAT:
        raise DrpError(f"{path} was written by a newer version of drp (run format {cfg['format']}, this one "
                       f"reads up to {FORMAT}); update drp to use this run.")
    return upgrade(cfg)


def read_run(run):
    """(config dict, items as dicts) of a run folder."""
    run = Path(run)
    if not (run / "config.json").is_file() or not (run / "items.jsonl").is_file():
        raise DrpError(f"{run} is not a run folder of drp.evaluate (config.json or items.jsonl missing); give the "
                       "--out folder of `python -m drp.evaluate run` or `items`.")
    cfg = read_config(run / "config.json")
    try:
        items = [json.loads(line) for line in (run / "items.jsonl").read_text().splitlines() if line.strip()]
    except ValueError:
        raise DrpError(f"{run / 'items.jsonl'} is broken; make the run's items again with its command.") from None
    return cfg, items


def is_ours(name):
    """A file a run folder may hold before its config.json exists: a temporary file of ours."""
    return bool(TEMPORARY.match(name))


def check_run_folder(out, cfg, settings=PIXEL_SETTINGS):
    """Refuse a folder that holds something else than a run with these `settings`."""
    out = Path(out)
    config = out / "config.json"
    if config.is_file():
        old = read_config(config)
        for key in settings:
            if old.get(key) != cfg.get(key):
                raise DrpError(f"{out} holds a run with other settings ({key} {old.get(key)!r}, not "
                               f"{cfg.get(key)!r}); choose another --out, or repeat that run's settings to "
                               "complete it.")
    elif out.is_dir() and any(not is_ours(p.name) for p in out.iterdir()):
        raise DrpError(f"{out} is not empty and holds no run of drp.evaluate; choose a new or empty --out.")
    elif out.exists() and not out.is_dir():
        raise DrpError(f"{out} is a file, not a folder; choose another --out.")
