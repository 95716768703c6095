"""The real-vs-real row: how alike DreamBench's own photos of a subject are — the ceiling of CLIP-I and DINO.

Where it sits: `python -m drp.evaluate report RUN … --real DATA`. DreamBooth's table prints beside the
methods the same metrics between distinct real photos of the same subject (docs/EVALUATION.md): no
generated image can be expected to look more like the subject's photos than they look like each
other. For each subject, the mean cosine over all pairs of distinct photos, for CLIP-I and DINO; the
row is the mean over subjects, with a bootstrap interval over subjects (stats.py).

The weights must be the ones that scored the runs (their sha256 is checked): the scorers are read
from where `score` read them (recorded in the rows), or from `--clip`/`--dino` when they have moved.
"""

from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import DrpError
from . import data as bench_data
from .metrics import identity, load_clip, load_dino
from .stats import estimate, units_of


def pair_mean(embeddings):
    """The mean cosine over the distinct pairs of unit vectors (M, P), M ≥ 2."""
    sims = embeddings @ embeddings.T
    m = len(embeddings)
    return ((sims.sum() - sims.diagonal().sum()) / (m * (m - 1))).item()


def load_scorer(kind, given, recorded):
    """The scorer of `kind` ("clip" or "dino") that made the runs' scores, checked by its sha256."""
    path = given or (recorded or {}).get("path")
    if not path or not Path(path).exists():
        raise DrpError(f"the {kind.upper()} weights that scored the runs are not at {path}; give --{kind} where "
                       "they are now.")
    scorer = (load_clip if kind == "clip" else load_dino)(path)
    if identity(scorer.weights) != identity(recorded):
        raise DrpError(f"{path} holds other {kind.upper()} weights than the ones that scored the runs (sha256 "
                       f"{recorded['sha256'][:12]}…); give --{kind} the file that scored them.")
    return scorer


def real_vs_real(data, subjects, weights, clip=None, dino=None, progress=True):
    """The real photos' row: {metric: {mean, ci, images}} over `subjects`, and {subject: {metric: value}}."""
    if not subjects:
        raise DrpError("--real compares DreamBench's photos of the runs' subjects, and these runs have none "
                       "(a style benchmark); leave --real out.")
    clip_model = load_scorer("clip", clip, weights["clip"])
    dino_model = load_scorer("dino", dino, weights["dino"]) if weights.get("dino") else None
    per_subject = {}
    for s in tqdm(bench_data.dreambench(data, subjects), desc="real photos", disable=not progress):
        photos = [Path(data) / p for p in s.photos]
        if len(photos) < 2:
            continue  # one photo has no pair
        with torch.no_grad():
            row = dict(clip_i=pair_mean(clip_model.images(photos)))
            if dino_model is not None:
                row["dino"] = pair_mean(dino_model.images(photos))
        per_subject[s.name] = dict(row, photos=len(photos))
    names = sorted(per_subject)
    units = units_of([dict(subject=n) for n in names])
    metrics = {m: estimate(units, [per_subject[n].get(m) for n in names]) for m in ("clip_i", "dino")}
    return {m: v for m, v in metrics.items() if v}, per_subject
