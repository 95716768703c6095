"""Other methods' images in the same table: the list of items another tool must render, and importing its pictures.

Where it sits: beside `run`, for methods drp does not implement (MS-Diffusion, RB-Modulation,
StyleStudio, …), so that their images are scored and reported exactly like ours:

    python -m drp.evaluate items --bench dreambench --data DATA --out runs/msdiff [--subjects …]
        writes RUN/items.jsonl (id, prompt, subject, content, style, seed, file) and RUN/config.json
        (mode `external`), nothing else: render each item's prompt from its references with the other
        tool, into DIR/<id>.png (or .jpg, .jpeg, .webp), at any size
    python -m drp.evaluate import runs/msdiff --from DIR [--method MS-Diffusion] [--partial]
        converts each DIR/<id>.* into RUN/images/<id>.png (atomically, the prompt and method in its
        `parameters` text), says which ids are missing and which files are no item, and refuses an
        incomplete set unless --partial (an import can be finished by a second one)

`score` and `report` then read the run like any other; `report` names the method.
"""

import json
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from ..errors import DrpError
from ..images import load_image
from ..png_info import save_png, setting_text
from .data import IMAGE_SUFFIXES
from .plan import (FORMAT, check_run_folder, item_config, items_of, make_folder, read_run, remove_leftovers,
                   write_lines, write_text)

SHOWN = 5  # ids named in a message before "and N more"


def items(bench, out, data=None, style_dir=None, subjects=None, prompts=None, images_per_prompt=4, limit=None,
          seed=0):
    """Write the item list of a benchmark for another tool into `out`; returns the items."""
    cfg = dict(format=FORMAT, mode="external", method=None,
               **item_config(bench, data, style_dir, subjects, prompts, images_per_prompt, limit, seed))
    listed, _ = items_of(cfg)
    out = Path(out)
    check_run_folder(out, cfg, settings=("mode", *item_config(bench)))  # the same list again: nothing changes
    make_folder(out)
    if (out / "config.json").is_file():
        cfg["method"] = read_run(out)[0].get("method")  # an import already named it
    write_text(out / "config.json", json.dumps(cfg, indent=1) + "\n")
    write_lines(out / "items.jsonl", [asdict(i) for i in listed])
    return listed


def named(ids):
    ids = sorted(ids)
    more = f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else ""
    return ", ".join(ids[:SHOWN]) + more


def pictures_in(folder):
    """{stem: path} of the pictures in `folder`; two pictures of one stem (a.png and a.jpg) are an error."""
    found = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in found:
                raise DrpError(f"{folder} holds two pictures for {p.stem} ({found[p.stem].name} and {p.name}); "
                               "keep one of them.")
            found[p.stem] = p
    return found


def parameters(item, method, source):
    """The imported PNG's `parameters` text: prompt, method, seed asked for, the file it came from."""
    pairs = dict(Method=method, Seed=item["seed"], Source=source.name)
    return item["prompt"] + "\n" + ", ".join(f"{k}: {setting_text(v)}" for k, v in pairs.items())


def import_images(run, source, method=None, partial=False, progress=True, log=print):
    """Bring DIR's pictures of an `items` run into RUN/images/ as PNGs; returns the number imported."""
    run, source = Path(run), Path(source)
    cfg, listed = read_run(run)
    if cfg.get("mode") != "external":
        raise DrpError(f"{run} holds a run made by drp ({cfg.get('mode')} mode), not a list of `items` for "
                       "another method; write one with `python -m drp.evaluate items`.")
    if not source.is_dir():
        raise DrpError(f"{source} is not a folder; give --from the folder that holds the pictures <id>.png.")
    method = method or cfg.get("method") or source.resolve().name
    done = [i["id"] for i in listed if (run / i["file"]).is_file()]
    if done and cfg.get("method") not in (None, method):
        raise DrpError(f"{run} already holds images of the method {cfg['method']!r}; import {method!r} into a "
                       "run folder of its own (write one with `python -m drp.evaluate items`).")
    found = pictures_in(source)
    ids = {i["id"] for i in listed}
    extra = sorted(set(found) - ids)
    missing = [i["id"] for i in listed if i["id"] not in found and i["id"] not in done]
    if extra:
        log(f"left out the pictures in {source} that are no item of {run} ({len(extra)}): {named(extra)}")
    if missing and not partial:
        raise DrpError(f"{source} lacks {len(missing)} of the {len(listed)} items ({named(missing)}); render them, "
                       "or add --partial to import the others now.")
    write_text(run / "config.json", json.dumps(dict(cfg, method=method), indent=1) + "\n")
    make_folder(run / "images")
    remove_leftovers(run / "images", lambda name: name.endswith(".png"))  # of an import that was killed
    imported = 0
    for item in tqdm([i for i in listed if i["id"] in found], desc="importing", unit="img", disable=not progress):
        picture = load_image(found[item["id"]], f"picture of {item['id']}")  # one at a time: any number fits
        save_png(picture, run / item["file"], parameters(item, method, found[item["id"]]))
        imported += 1
    if missing:
        log(f"items still missing ({len(missing)}): {named(missing)}")
    log(f"imported {imported} pictures of {method} into {run / 'images'}")
    return imported
