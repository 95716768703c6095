"""Generating a benchmark's images: the items, their seeds, the shards of each rank, and resuming.

Where it sits: `python -m drp.evaluate run`, between `download` and `score`. A benchmark is a sorted list of
items (one image each); item i gets the seed derived from (base seed, item id), so its image never depends
on how many processes share the work, and rank r of w makes `items[r::w]` (torchrun; ranks.py). It writes

    RUN/config.json     the settings; a folder holding other settings is refused, not overwritten
    RUN/items.jsonl     one line per item: id, prompt, subject, content, style, seed, file
    RUN/images/<id>.png each with its settings in the web UI's `parameters` text (drp/png_info.py)

`content` is relative to DATA (`dataset/cat/00.jpg`), `style` to the style folder (both in config.json).
Resuming: an item whose PNG exists with the same `parameters` text is skipped; PNGs are written under a
temporary name and renamed (`save_png`), so a run killed at any moment, started again, makes each missing
image exactly once. The benchmarks (docs/EVALUATION.md):

- dreambench: each subject × its 25 class-only prompts × K; the first photo (sorted) is `content`;
- style: each style picture × the content prompts × K;
- dual: each subject × each style picture × the subject's prompts × K.
"""

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from PIL import Image
from tqdm import tqdm

from ..errors import DrpError
from ..files import write_atomically
from ..png_info import parameters_text, save_png
from . import data as bench_data
from . import ranks as R

BENCHES = ("dreambench", "style", "dual")
MODES = ("plain", "self-attention", "ip-adapter", "auto")  # plain: text only, the baseline
FORMAT = 1
# config.json keys that decide each image's pixels: a run folder refuses a different value of any of them.
# The others (which subjects, how many prompts and images, --limit, DATA's path) only choose the items.
PIXEL_SETTINGS = ("format", "bench", "mode", "seed", "steps", "height", "width", "guidance", "dtype", "model",
                  "model_dtype", "ip_adapter", "style_dir")


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


def planned_parameters(item, cfg):
    """The `parameters` text an item's PNG carries: its settings, known before the image is made."""
    info = dict(prompt=[item.prompt], negative_prompt="", steps=cfg["steps"], sampler="DDIM",
                guidance=cfg["guidance"], seeds=[item.seed], width=cfg["width"], height=cfg["height"],
                model=cfg["model_file"], eta=0.0)
    if cfg["mode"] != "plain":
        info["drp"] = dict(subject=item.subject if item.content else None, content=item.content or None,
                           style=item.style or None, mode=cfg["mode"])
    return parameters_text(info)


def generate_kwargs(item, cfg, data, style_dir):
    """drp.generate's keyword arguments for an item."""
    kwargs = dict(steps=cfg["steps"], guidance=cfg["guidance"], height=cfg["height"], width=cfg["width"],
                  seed=item.seed, progress=False)
    if cfg["mode"] != "plain":  # the references are given only to the DRP-Diff modes
        kwargs.update(mode=cfg["mode"], content=str(Path(data) / item.content) if item.content else None,
                      subject=item.subject if item.content else None,
                      style=str(Path(style_dir) / item.style) if item.style else None)
    return kwargs


def write_text(path, text):
    """Write `text` to `path` through a temporary file; a file that already holds it is left untouched.

    The one writer of the harness's text files (config.json, items.jsonl, scores, the report)."""
    path = Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), "choose a writable folder.")


def make_folder(folder):
    """mkdir -p, with a sentence instead of a traceback when the folder cannot be made."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DrpError(f"cannot create the folder {folder} ({e.strerror or e}); choose a writable place.") from None


def is_config_tmp(name):
    """The temporary file of a config.json being written (what a run killed at its first moment leaves)."""
    return name.startswith(".config.json.") and name.endswith(".tmp")


def check_run_folder(out, cfg):
    """Refuse a folder that holds something else than a run with these pixel settings."""
    config = out / "config.json"
    if config.is_file():
        try:
            old = json.loads(config.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict):
            raise DrpError(f"{config} is not a run's config.json; choose another --out.")
        for key in PIXEL_SETTINGS:
            if old.get(key) != cfg.get(key):
                raise DrpError(f"{out} holds a run with other settings ({key} {old.get(key)!r}, not "
                               f"{cfg.get(key)!r}); choose another --out, or repeat that run's settings to "
                               "complete it.")
    elif out.is_dir() and any(not is_config_tmp(p.name) for p in out.iterdir()):
        raise DrpError(f"{out} is not empty and holds no run of drp.evaluate; choose a new or empty --out.")
    elif out.exists() and not out.is_dir():
        raise DrpError(f"{out} is a file, not a folder; choose another --out.")


def png_parameters(path):
    """The `parameters` text of a PNG, or None when it has none or cannot be read."""
    try:
        with Image.open(path) as img:
            return img.info.get("parameters")
    except (OSError, SyntaxError, ValueError):
        return None


def pending(items, out, cfg):
    """The items whose image is still to be made; an image made with other settings is an error."""
    todo = []
    for item in items:
        path = out / item.file
        if not path.exists():
            todo.append(item)
        elif png_parameters(path) != planned_parameters(item, cfg):
            raise DrpError(f"{path} was made with other settings than this run's; delete it, or choose another --out.")
    return todo


def run(cfg, out, weights="weights", device="auto", progress=True, log=print):
    """Generate every missing image of the run described by `cfg` (see `make_config`) in `out`, as this rank."""
    import drp  # the models, only once the settings are known to be good
    from ..devices import DTYPES, resolve_dtype
    from ..method_common import resolve_mode
    from ..model_io import ip_component_converted, read_model_json

    out = Path(out)
    items, style_dir = build_items(cfg["bench"], cfg["data"], cfg["style_dir"], cfg["subjects"], cfg["prompts"],
                                   cfg["images_per_prompt"], cfg["limit"], cfg["seed"])
    style_dir = style_dir or bench_data.ASSETS
    ranks = R.start(device)
    try:
        dtype = resolve_dtype(cfg["dtype"], ranks.device)
        cfg = dict(cfg, dtype=next(name for name, d in DTYPES.items() if d == dtype))  # "fp16" …
        source = read_model_json(weights)[0]["source"]
        cfg.update(model=source.get("sha256"), model_file=source.get("file", "unknown"),
                   model_dtype=source.get("dtype"))  # the checkpoint's sha256, and the dtype it was converted to
        if cfg["mode"] != "plain":  # "auto" -> the mode it means with these weights, read without loading them
            converted = SimpleNamespace(has=lambda name: ip_component_converted(weights, name))  # no model read
            cfg["mode"] = resolve_mode(converted, cfg["mode"])
        if cfg["mode"] == "ip-adapter":  # which adapter and image encoder: their converted descriptions
            described = "".join((Path(weights) / f).read_text() for f in ("ip_adapter.json", "image_encoder.json"))
            cfg["ip_adapter"] = hashlib.sha256(described.encode()).hexdigest()
        check_run_folder(out, cfg)
        R.barrier(ranks)  # every rank has looked at the folder before rank 0 writes into it
        if ranks.main:  # config.json first: a folder holding it is a run of ours whatever happens next
            make_folder(out)
            write_text(out / "config.json", json.dumps(cfg, indent=1) + "\n")
            write_text(out / "items.jsonl", "".join(json.dumps(asdict(i)) + "\n" for i in items))
            make_folder(out / "images")
        R.barrier(ranks)
        mine = items[ranks.rank :: ranks.world]
        todo = pending(mine, out, cfg)
        sd = drp.load(weights, device=ranks.device, dtype=cfg["dtype"]) if todo else None
        rounds = R.all_max(ranks, len(todo))  # the ranks meet once per round to count what was made
        skipped = R.all_sum(ranks, [len(mine) - len(todo)])[0]
        bar = tqdm(total=len(items), initial=int(skipped), desc="images", unit="img",
                   disable=not (progress and ranks.main))
        seconds = 0.0
        with bar:
            for j in range(rounds):
                made = 0
                if j < len(todo):
                    item, start = todo[j], time.perf_counter()
                    result = drp.generate(sd, item.prompt, **generate_kwargs(item, cfg, cfg["data"], style_dir))
                    save_png(result.images[0], out / item.file, planned_parameters(item, cfg))
                    seconds += time.perf_counter() - start
                    made = 1
                bar.update(int(R.all_sum(ranks, [made])[0]))
        rows = R.gather(ranks, [len(todo), len(mine) - len(todo), seconds])
        if ranks.main:
            for r, (made, kept, secs) in enumerate(rows):
                pace = f", {secs / made:.2f} s per image" if made else ""
                log(f"rank {r} of {ranks.world}: {int(made)} made, {int(kept)} already there{pace}")
    finally:
        R.stop(ranks)
    return items


def make_config(bench, mode="plain", data=None, style_dir=None, subjects=None, prompts=None, images_per_prompt=4,
                limit=None, seed=0, steps=50, height=512, width=512, guidance=7.5, dtype="auto"):
    """The settings of a run as config.json holds them (model and dtype are filled in by `run`)."""
    if mode not in MODES:
        raise DrpError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    from ..sampling import check_settings

    check_settings(steps, guidance, height, width)
    return dict(format=FORMAT, bench=bench, mode=mode, seed=seed, steps=steps, height=height, width=width,
                guidance=guidance, dtype=dtype, model=None, model_file=None, model_dtype=None, ip_adapter=None,
                style_dir=str(Path(style_dir).resolve()) if style_dir and bench != "dreambench" else None,
                data=str(Path(data).resolve()) if data else None, subjects=subjects, prompts=prompts,
                images_per_prompt=images_per_prompt, limit=limit)
