"""Generating a benchmark's images: the modes, the shards of each rank, batches, resuming, and the time it took.

Where it sits: `python -m drp.evaluate run`, between `download` and `score`; the items and the run
folder are plan.py's. Each row of a comparison is one run, in one of these modes:

    plain           the prompt alone: the text-only baseline
    image-prompt    plain IP-Adapter: the run's references as `ip_image` at `--ip-scale` (DreamBench: the
                    conditioning photo; style: the style picture; dual: both, in one joint softmax). A
                    per-block scale (`up_blocks.1=1`) is InstantStyle's way of taking style only.
    self-attention, ip-adapter, auto   DRP-Diff's modes (auto: ip-adapter when its weights are converted),
                    with their knobs from `--set KEY=VALUE` (knobs.py): one run per row of an ablation

Batches: `--batch K` makes up to K images of one (subject, style, prompt) in one `generate` call, each
from its own item's seed (its initial latent, `sampling.initial_latents`). The batches are cut from the
sorted items by their ids alone, and rank r of w makes `batches[r::w]` (torchrun; ranks.py), so the
images never depend on the number of processes. K changes the last bits of the sums, so it is a
pixel setting.

Resuming: a batch whose PNGs all exist with the same `parameters` text is skipped; in a batch with
some missing, the whole batch is made again (so that each image is what its batch gives) and only the
missing PNGs are written. PNGs are written under a temporary name and renamed, and the temporary
files of a killed run are removed when it starts again. Each start that made images adds a line to
RUN/timings.jsonl (images made, seconds, processes, device, dtype, batch): the seconds per image of
the report.

Attention maps: `--attention-maps NAMES` (words of the prompts, and content/style where the DRP-Diff
mode has those references) keeps each image's maps as RUN/images/<id>.npz beside its PNG, one (h, w)
array per "name/stage" (drp/attention_maps.py). Recording changes no pixel, so the names are not a pixel
setting; a word missing from an item's prompt is left out of that item's file (a DreamBench run has one
class noun per subject). A batch whose PNGs exist but whose maps are missing is made again for its maps.
"""

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from tqdm import tqdm

from ..attention_maps import REFERENCES, parse_names, save_npz, word_positions
from ..errors import DrpError
from ..ip_adapter import resolve_scale
from ..png_info import parameters_text, save_png, setting_text
from . import knobs as K
from . import ranks as R
from .plan import (FORMAT, check_run_folder, item_config, items_of, make_folder, prompt_of, remove_leftovers,
                   write_lines, write_text)

MODES = ("plain", "image-prompt", "self-attention", "ip-adapter", "auto")
DRP_MODES = ("self-attention", "ip-adapter")
DEFAULT_IP_SCALE = 0.6  # generate's
RUN_FILES = ("config.json", "items.jsonl", "timings.jsonl")


def make_config(bench, mode="plain", data=None, style_dir=None, subjects=None, prompts=None, images_per_prompt=4,
                limit=None, seed=0, steps=50, height=512, width=512, guidance=7.5, dtype="auto", negative_prompt="",
                options=None, ip_scale=None, batch=1, attention_maps=None):
    """The settings of a run as config.json holds them (model, dtype and the knobs' types are settled by `run`).

    `options`: {knob: value or its text} (`--set`); `ip_scale`: the image-prompt mode's scale;
    `attention_maps`: names whose maps are kept beside each image (not a pixel setting)."""
    if mode not in MODES:
        raise DrpError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    from ..sampling import check_settings

    check_settings(steps, guidance, height, width)
    if not isinstance(batch, int) or batch < 1:
        raise DrpError(f"--batch must be a whole number ≥ 1, got {batch!r}.")
    if not isinstance(negative_prompt, str):
        raise DrpError(f"the negative prompt must be text, got {negative_prompt!r}.")
    if ip_scale is not None and mode != "image-prompt":
        raise DrpError(f"--ip-scale is the image-prompt mode's scale; the {mode} mode does not take it (DRP-Diff's "
                       "ip-adapter mode has --set scale_early=… and --set scale_late=…).")
    K.check_mode_takes_knobs(mode, options or {})
    return dict(format=FORMAT, mode=mode, steps=steps, height=height, width=width, guidance=guidance, dtype=dtype,
                model=None, model_file=None, model_dtype=None, ip_adapter=None, negative_prompt=negative_prompt,
                options=dict(options or {}), ip_scale=ip_scale, batch=batch,
                attention_maps=parse_names(attention_maps),
                **item_config(bench, data, style_dir, subjects, prompts, images_per_prompt, limit, seed))


def settle(cfg, weights, device):
    """The config with what the weights and device decide (mode, dtype, model, adapter) and the knobs typed and
    checked; reads the weights' JSON descriptions only, no tensor."""
    from ..devices import DTYPES, resolve_dtype
    from ..method_common import resolve_mode
    from ..model_io import ip_component_converted, read_model_json

    dtype = resolve_dtype(cfg["dtype"], device)
    cfg = dict(cfg, dtype=next(name for name, d in DTYPES.items() if d == dtype))  # "fp16" …
    source = read_model_json(weights)[0]["source"]
    cfg.update(model=source.get("sha256"), model_file=source.get("file", "unknown"),
               model_dtype=source.get("dtype"))  # the checkpoint's sha256, and the dtype it was converted to
    converted = SimpleNamespace(has=lambda name: ip_component_converted(weights, name))  # no model read
    if cfg["mode"] in ("auto", "ip-adapter"):  # "auto" -> the mode it means with these weights
        cfg["mode"] = resolve_mode(converted, cfg["mode"])
    if cfg["mode"] == "image-prompt" and not (converted.has("ip_adapter") and converted.has("image_encoder")):
        raise DrpError(f"--mode image-prompt needs the IP-Adapter and its image encoder, which are not converted in "
                       f"{weights}; add them with `python convert_weights.py --download ip-adapter`.")
    if cfg["mode"] in ("ip-adapter", "image-prompt"):  # which adapter and image encoder: their descriptions
        described = "".join((Path(weights) / f).read_text() for f in ("ip_adapter.json", "image_encoder.json"))
        cfg["ip_adapter"] = hashlib.sha256(described.encode()).hexdigest()
        cfg["ip_adapter_file"] = json.loads((Path(weights) / "ip_adapter.json").read_text())["source"]["file"]
    if cfg["mode"] == "image-prompt":
        cfg["ip_scale"] = DEFAULT_IP_SCALE if cfg["ip_scale"] is None else cfg["ip_scale"]
        resolve_scale(cfg["ip_scale"], K.adapter_layers(weights))  # a block the adapter lacks: one sentence
    options = K.typed_knobs(cfg["mode"], cfg["options"])
    K.check_knobs(cfg["mode"], options, weights, cfg["steps"])
    return dict(cfg, options=K.as_json(options))


def check_map_names(cfg, items, weights):
    """The attention maps asked for, checked before any model is loaded: each word is in some item's prompt,
    and content/style name references that every item of this mode has."""
    from ..model_io import VOCAB
    from ..tokenizer import Tokenizer

    if not cfg.get("attention_maps"):
        return
    vocab = Path(weights) / VOCAB
    tokenizer = Tokenizer(vocab if vocab.is_file() else None)
    prompts = sorted({item.prompt for item in items})
    for name in cfg["attention_maps"]:
        if name in REFERENCES:
            if cfg["mode"] not in DRP_MODES or not all(getattr(item, name) for item in items):
                raise DrpError(f"--attention-maps names the {name} reference, which the items of this {cfg['mode']} "
                               f"run do not all have; name it only in a DRP-Diff run (--mode auto, ip-adapter or "
                               f"self-attention) of a benchmark with {name} pictures.")
        elif not any(word_positions(tokenizer, p, name) for p in prompts):
            raise DrpError(f"--attention-maps names {name!r}, which is a word of none of the run's {len(prompts)} "
                           f"prompts (e.g. {prompts[0]!r}); name words of the prompts, or content/style.")


def maps_of(cfg, prompt, tokenizer):
    """The names whose maps are recorded for a batch of `prompt`: the references, and the words it has."""
    return [n for n in cfg["attention_maps"] if n in REFERENCES or word_positions(tokenizer, prompt, n)]


def maps_file(out, item):
    """Where an item's attention maps are kept: beside its PNG."""
    return (out / item.file).with_suffix(".npz")


def references(item, cfg, data, style_dir):
    """The item's reference pictures as paths: (content or None, style or None)."""
    return (str(Path(data) / item.content) if item.content else None,
            str(Path(style_dir) / item.style) if item.style else None)


def planned_parameters(item, cfg):
    """The `parameters` text an item's PNG carries: its settings, known before the image is made."""
    info = dict(prompt=[item.prompt], negative_prompt=cfg["negative_prompt"], steps=cfg["steps"], sampler="DDIM",
                guidance=cfg["guidance"], seeds=[item.seed], width=cfg["width"], height=cfg["height"],
                model=cfg["model_file"], eta=0.0)
    if cfg["mode"] == "image-prompt":
        info["ip_adapter"] = dict(file=cfg["ip_adapter_file"], scale=cfg["ip_scale"],
                                  images=[x for x in (item.content, item.style) if x])
    elif cfg["mode"] != "plain":
        info["drp"] = dict(subject=item.subject if item.content else None, content=item.content or None,
                           style=item.style or None, mode=cfg["mode"])
    text = parameters_text(info)
    knobs = {f"DRP {k.replace('_', ' ')}": v for k, v in sorted(cfg["options"].items())}
    if cfg["batch"] > 1:
        knobs["Batch"] = cfg["batch"]  # the batch it was made in: the last bits of its pixels
    # the last line holds the pairs, written as sample.py's PNGs write them (a per-block scale as up_blocks.1=1)
    text += "".join(f", {key}: {setting_text(v)}" for key, v in knobs.items())
    return text


def generate_kwargs(batch, cfg, data, style_dir):
    """drp.generate's keyword arguments for a batch of items of one (subject, style, prompt)."""
    from ..sampling import initial_latents

    first = batch[0]
    shape = (1, 4, cfg["height"] // 8, cfg["width"] // 8)
    kwargs = dict(negative_prompt=cfg["negative_prompt"], steps=cfg["steps"], guidance=cfg["guidance"],
                  height=cfg["height"], width=cfg["width"], seed=first.seed, num_images=len(batch),
                  latents=initial_latents([item.seed for item in batch], shape), progress=False)
    content, style = references(first, cfg, data, style_dir)
    if cfg["mode"] == "image-prompt":
        kwargs.update(ip_image=[x for x in (content, style) if x], ip_scale=cfg["ip_scale"])
    elif cfg["mode"] != "plain":  # the references are given only to the DRP-Diff modes
        kwargs.update(mode=cfg["mode"], content=content, style=style, subject=first.subject if content else None,
                      **K.options_for_generate(cfg["mode"], cfg["options"]))
    return kwargs


def batches(items, size):
    """The items cut into batches of at most `size` items of one (subject, style, prompt), by their ids alone."""
    out, current = [], []
    for item in items:
        if current and (len(current) == size or prompt_of(current[0].id) != prompt_of(item.id)):
            out.append(current)
            current = []
        current.append(item)
    return out + [current] if current else out


def png_parameters(path):
    """The `parameters` text of a PNG, or None when it has none or cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.info.get("parameters")
    except (OSError, SyntaxError, ValueError):
        return None


def pending(groups, out, cfg):
    """The batches with an image (or its attention maps) still to be made; an image made with other settings
    is an error."""
    todo = []
    for group in groups:
        missing = False
        for item in group:
            path = out / item.file
            if not path.exists() or cfg.get("attention_maps") and not maps_file(out, item).exists():
                missing = True
            elif png_parameters(path) != planned_parameters(item, cfg):
                raise DrpError(f"{path} was made with other settings than this run's; delete it, or choose another "
                               "--out.")
        if missing:
            todo.append(group)
    return todo


def record_timing(out, made, seconds, world, device, cfg):
    """Add this start's images and seconds to RUN/timings.jsonl."""
    path = out / "timings.jsonl"
    old = path.read_text() if path.is_file() else ""
    line = dict(images=made, seconds=round(seconds, 3), processes=world, device=R.device_name(device),
                dtype=cfg["dtype"], batch=cfg["batch"])
    write_text(path, old + json.dumps(line) + "\n")


def run(cfg, out, weights="weights", device="auto", progress=True, log=print):
    """Generate every missing image of the run described by `cfg` (see `make_config`) in `out`, as this rank."""
    import drp  # the models, only once the settings are known to be good

    out = Path(out)
    items, style_dir = items_of(cfg)
    ranks = R.start(device)
    try:
        cfg = settle(cfg, weights, ranks.device)
        check_map_names(cfg, items, weights)
        check_run_folder(out, cfg)
        if ranks.main:  # what a killed start left; nobody writes before the barrier below
            remove_leftovers(out, lambda name: name in RUN_FILES)
            remove_leftovers(out / "images", lambda name: name.endswith((".png", ".npz")))
        R.barrier(ranks)  # every rank has looked at the folder before rank 0 writes into it
        if ranks.main:  # config.json first: a folder holding it is a run of ours whatever happens next
            make_folder(out)
            write_text(out / "config.json", json.dumps(cfg, indent=1) + "\n")
            write_lines(out / "items.jsonl", [asdict(i) for i in items])
            make_folder(out / "images")
        R.barrier(ranks)
        mine = batches(items, cfg["batch"])[ranks.rank :: ranks.world]
        todo = pending(mine, out, cfg)
        sd = drp.load(weights, device=ranks.device, dtype=cfg["dtype"]) if todo else None
        rounds = R.all_max(ranks, len(todo))  # the ranks meet once per round to count what was made
        kept = sum(len(g) for g in mine) - sum(not (out / i.file).exists() for g in todo for i in g)
        skipped = R.all_sum(ranks, [kept])[0]
        bar = tqdm(total=len(items), initial=int(skipped), desc="images", unit="img",
                   disable=not (progress and ranks.main))
        seconds, made = 0.0, 0
        with bar:
            for j in range(rounds):
                now = 0
                if j < len(todo):
                    group, start = todo[j], time.perf_counter()
                    kwargs = generate_kwargs(group, cfg, cfg["data"], style_dir)
                    maps = maps_of(cfg, group[0].prompt, sd.tokenizer)
                    result = drp.generate(sd, group[0].prompt, attention_maps=maps or None, **kwargs)
                    for k, (item, image) in enumerate(zip(group, result.images)):
                        if not (out / item.file).exists():
                            save_png(image, out / item.file, planned_parameters(item, cfg))
                            now += 1
                        if cfg.get("attention_maps") and not maps_file(out, item).exists():
                            save_npz(maps_file(out, item), result.attention_maps, k)
                    seconds += time.perf_counter() - start
                made += now
                bar.update(int(R.all_sum(ranks, [now])[0]))
        rows = R.gather(ranks, [made, kept, seconds])
        if ranks.main:
            for r, (n, k, secs) in enumerate(rows):
                pace = f", {secs / n:.2f} s per image" if n else ""
                log(f"rank {r} of {ranks.world}: {int(n)} made, {int(k)} already there{pace}")
            total = sum(int(r[0]) for r in rows)
            if total:
                record_timing(out, total, sum(r[2] for r in rows), ranks.world, ranks.device, cfg)
    finally:
        R.stop(ranks)
    return items


def run_summary(run):
    """(seconds per image, machine) of a run from RUN/timings.jsonl, or (None, None) when it has none."""
    path = Path(run) / "timings.jsonl"
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None, None
    images = sum(x["images"] for x in lines)
    machines = sorted({f"{x['device']}, {x['dtype']}" for x in lines})
    return (sum(x["seconds"] for x in lines) / images if images else None), "; ".join(machines) or None

