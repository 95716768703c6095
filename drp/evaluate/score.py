"""Scoring a run's images: raw cosines per image, one file per rank, merged into RUN/scores.jsonl; resumable.

Where it sits: `python -m drp.evaluate score RUN --clip CLIP [--dino DINO]`, after `run` (or `import`),
before `report`. For each item of RUN/items.jsonl (docs/EVALUATION.md), the fields that apply:

    clip_t        cos(CLIP image, CLIP text of the prompt)                      every item
    clip_t_bg     the same against the prompt without the subject's words        items with a subject
    clip_i        mean cos(CLIP image, CLIP image of each real photo)             DreamBench items
    clip_i_cond   cos(CLIP image, CLIP image of the conditioning photo)          DreamBench items
    dino          mean cos(DINO, DINO of each real photo)                         DreamBench items, with --dino
    dino_cond     cos(DINO, DINO of the conditioning photo)                       DreamBench items, with --dino
    style_clip    cos(CLIP image, CLIP image of the style picture)               style and dual items
    content_leak  cos(CLIP image, CLIP text "a photo of <caption>")              style pictures with a caption
                  (`<picture>.txt` beside it): how much of the painting's *content* came along; lower is better

"The real photos" are every photo in the conditioning photo's folder. Each row also holds `weights`:
which CLIP and DINO files scored it (metrics.py `describe`), so `report` can refuse to compare scores of
different weights. Under torchrun rank r scores `items[r::w]` into RUN/scores.rank-<r>-of-<w>.jsonl,
rewritten after every batch; once all are written, rank 0 merges them, checking that every item is
there exactly once, and removes them. Raw cosines are stored; tables scale them.

Resuming: rows already in scores.jsonl, or in rank files a crash left (of any number of ranks), are kept
when the same weights scored the same image (`image`: its file's sha256, shortened); only the other
items are scored. Temporary files of a killed `score`
are removed when it starts again.
"""

import hashlib
import json
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import DrpError
from . import data as bench_data
from . import ranks as R
from .metrics import cosine, identity, load_clip, load_dino
from .plan import read_run, remove_leftovers, write_lines


def reference_paths(cfg, items, data=None, style_dir=None):
    """(DATA, style folder) where the run's references are, checked to hold every one of them."""
    data = Path(data or cfg.get("data") or ".")
    style_dir = Path(style_dir or cfg.get("style_dir") or bench_data.ASSETS)
    for item in items:
        for name, root, option in (("content", data, "--data"), ("style", style_dir, "--style-dir")):
            if item[name] and not (root / item[name]).is_file():
                raise DrpError(f"the reference {root / item[name]} of item {item['id']} is missing; "
                               f"give {option} where the run's references are now.")
    return data, style_dir


class Embeddings:
    """Embeddings of references and prompts, each computed once."""

    def __init__(self, fn):
        self.fn, self.known = fn, {}

    def __call__(self, keys):
        new = [k for k in dict.fromkeys(keys) if k not in self.known]
        if new:
            self.known.update(zip(new, self.fn(new)))
        return torch.stack([self.known[k] for k in keys])


def score_items(items, run, clip, dino, data, style_dir, batch_size=16, progress=True, on_batch=None):
    """[{id, metric: cosine, ...}] for `items` (dicts from items.jsonl); `on_batch(rows)` after each batch."""
    clip_text = Embeddings(clip.texts)
    clip_ref, dino_ref = Embeddings(clip.images), Embeddings(dino.images) if dino else None
    photos = {}  # a subject folder -> its photos (the real photos of the subject)
    rows = []
    for start in tqdm(range(0, len(items), batch_size), desc="scoring", disable=not progress):
        batch = items[start : start + batch_size]
        generated = [run / item["file"] for item in batch]
        g_clip = clip.images(generated)  # (B, P)
        g_dino = dino.images(generated) if dino else None
        out = [dict(id=item["id"], image=image_digest(path)) for item, path in zip(batch, generated)]
        t = cosine(g_clip, clip_text([item["prompt"] for item in batch]))
        for row, value in zip(out, t.tolist()):
            row["clip_t"] = value
        for b, (item, row) in enumerate(zip(batch, out)):
            if item["subject"]:
                background = bench_data.without_words(item["prompt"], item["subject"])
                row["clip_t_bg"] = cosine(g_clip[b : b + 1], clip_text([background])).item()
            if item["content"]:
                cond = data / item["content"]
                folder = cond.parent
                if folder not in photos:
                    photos[folder] = bench_data.photos_in(folder)
                for name, g, refs in (("clip", g_clip, clip_ref), ("dino", g_dino, dino_ref)):
                    if refs is None:
                        continue
                    real = refs(photos[folder])  # (M, P)
                    key = "clip_i" if name == "clip" else "dino"
                    row[key] = (real @ g[b]).mean().item()
                    row[f"{key}_cond"] = cosine(g[b : b + 1], refs([cond])).item()
            if item["style"]:
                row["style_clip"] = cosine(g_clip[b : b + 1], clip_ref([style_dir / item["style"]])).item()
                shows = bench_data.caption(style_dir, item["style"])
                if shows:
                    row["content_leak"] = cosine(g_clip[b : b + 1], clip_text([f"a photo of {shows}"])).item()
        rows += out
        if on_batch is not None:
            on_batch(out)
    return rows


def rank_file(run, rank, world):
    return Path(run) / f"scores.rank-{rank}-of-{world}.jsonl"


def merge_scores(run, ids, world):
    """Merge the `world` rank files into RUN/scores.jsonl (in the items' order), checking that every id in
    `ids` is there exactly once; the rank files are removed once merged."""
    run = Path(run)
    rows = {}
    for r in range(world):
        path = rank_file(run, r, world)
        if not path.is_file():
            raise DrpError(f"{path} is missing: rank {r} did not finish scoring; run the score command again.")
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["id"] in rows:
                raise DrpError(f"image {row['id']} was scored twice ({path}); run the score command again.")
            rows[row["id"]] = row
    missing = [i for i in ids if i not in rows]
    unknown = [i for i in rows if i not in set(ids)]
    if missing or unknown:
        what = f"no score for {missing[0]}" if missing else f"a score for {unknown[0]}, which is no item"
        raise DrpError(f"the rank files of {run} hold {what}; run the score command again.")
    write_lines(run / "scores.jsonl", [rows[i] for i in ids])
    for path in rank_files(run):  # this world's, and any other a crash left
        path.unlink()
    return run / "scores.jsonl"


def rank_files(run):
    return sorted(Path(run).glob("scores.rank-*-of-*.jsonl"))


def weights_of(row):
    """The identity of the weights that scored a row (None for rows of a drp that did not record them)."""
    weights = row.get("weights")
    return {k: identity(v) for k, v in weights.items()} if isinstance(weights, dict) else None


def image_digest(path):
    """A short sha256 of an image file: a row is kept only for the very image it scored."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def scored(run, files, weights):
    """{id: row} of the rows already scored with `weights`, of the images now in `files` ({id: file}): in
    scores.jsonl, and in rank files a crash left."""
    want, rows, digests = weights_of(dict(weights=weights)), {}, {}
    for path in [Path(run) / "scores.jsonl", *rank_files(run)]:
        lines = path.read_text().splitlines() if path.is_file() else []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short: score it again
                continue
            if not isinstance(row, dict) or row.get("id") not in files or weights_of(row) != want:
                continue
            if row["id"] not in digests:
                digests[row["id"]] = image_digest(Path(run) / files[row["id"]])
            if row.get("image") == digests[row["id"]]:  # not an image made or imported again since
                rows[row["id"]] = row
    return rows


def score(run, clip, dino=None, data=None, style_dir=None, device="auto", batch_size=16, progress=True, log=print):
    """Score every image of `run` with the CLIP folder `clip` (and DINO `dino`); as this rank under torchrun."""
    run = Path(run)
    cfg, items = read_run(run)
    missing = [item["file"] for item in items if not (run / item["file"]).is_file()]
    if missing:
        raise DrpError(f"{len(missing)} of the run's {len(items)} images are missing (first: {missing[0]}); "
                       "finish the run with its run command first.")
    data, style_dir = reference_paths(cfg, items, data, style_dir)
    if batch_size < 1:
        raise DrpError(f"--batch-size must be a whole number ≥ 1, got {batch_size}.")
    ranks = R.start(device)
    try:
        clip_model = load_clip(clip, ranks.device)
        dino_model = load_dino(dino, ranks.device) if dino else None
        weights = dict(clip=clip_model.weights, dino=dino_model.weights if dino_model else None)
        if ranks.main:  # what a killed score left; nobody writes before the barrier below
            remove_leftovers(run, lambda name: name.startswith("scores."))
        known = scored(run, {item["id"]: item["file"] for item in items}, weights)
        R.barrier(ranks)  # every rank has read what is there before any rank file is rewritten
        mine = items[ranks.rank :: ranks.world]
        rows = [dict(known[item["id"]], weights=weights) for item in mine if item["id"] in known]  # where they are now
        path = rank_file(run, ranks.rank, ranks.world)

        def keep(new):  # after each batch: a crash loses at most one batch
            rows.extend(dict(row, weights=weights) for row in new)
            write_lines(path, rows)

        todo = [item for item in mine if item["id"] not in known]
        write_lines(path, rows)
        score_items(todo, run, clip_model, dino_model, data, style_dir, batch_size, progress and ranks.main, keep)
        R.barrier(ranks)  # every rank's file is written
        if ranks.main:
            merged = merge_scores(run, [item["id"] for item in items], ranks.world)
            log(f"scored {len(items)} images into {merged} ({len(items) - len(known)} now, {len(known)} kept from "
                "an earlier score with the same weights)")
    finally:
        R.stop(ranks)
