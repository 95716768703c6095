"""Tabulating scored runs: summary.json, one Markdown table, and a contact sheet per run.

Where it sits: `python -m drp.evaluate report RUN [RUN ...]`, the last step. Each run becomes one row:
its mode, its number of images, and every metric as mean ± standard error of the mean (the sample
standard deviation / √n), raw and ×100 (the two scales papers print). The contact sheet
(RUN/contact_sheet.png) shows, per reference, the references beside the images made from them: the
picture a researcher looks at first.
"""

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from ..errors import DrpError
from ..files import write_atomically
from ..images import load_image
from . import data as bench_data
from .run import make_folder, write_text
from .score import read_run

METRICS = ("clip_t", "clip_t_bg", "clip_i", "clip_i_cond", "dino", "dino_cond", "style_clip")
THUMB = 128  # pixels per picture on the contact sheet
SHEET_ROWS, SHEET_IMAGES = 12, 8  # at most this many references, and images beside each


def mean_sem(values):
    """(mean, standard error of the mean); the error is None for fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(run):
    """One run's summary: settings, image count, and {metric: {mean, sem, n}}."""
    run = Path(run)
    cfg, items = read_run(run)
    path = run / "scores.jsonl"
    if not path.is_file():
        raise DrpError(f"{run} has no scores.jsonl; score it first with "
                       f"`python -m drp.evaluate score {run} --clip CLIP`.")
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError:
        raise DrpError(f"{path} is broken; score {run} again with `python -m drp.evaluate score`.") from None
    metrics = {}
    for m in METRICS:
        values = [r[m] for r in rows if m in r]
        if values:
            mean, sem = mean_sem(values)
            metrics[m] = dict(mean=mean, sem=sem, n=len(values))
    return dict(run=str(run), bench=cfg["bench"], mode=cfg["mode"], images=len(rows), items=len(items),
                steps=cfg["steps"], size=f"{cfg['width']}x{cfg['height']}", metrics=metrics)


def cell(stat, scale):
    if stat is None:
        return "—"
    sem = "n/a" if stat["sem"] is None else f"{stat['sem'] * scale:.{4 if scale == 1 else 2}f}"
    return f"{stat['mean'] * scale:.{4 if scale == 1 else 2}f} ± {sem}"


def table(summaries):
    """The Markdown table: one row per run, each metric raw and ×100."""
    shown = [m for m in METRICS if any(m in s["metrics"] for s in summaries)]
    head = ["run", "bench", "mode", "images"] + [f"{m} (raw / ×100)" for m in shown]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for s in summaries:
        cells = [Path(s["run"]).name, s["bench"], s["mode"], str(s["images"])]
        cells += [f"{cell(s['metrics'].get(m), 1)} / {cell(s['metrics'].get(m), 100)}" for m in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def thumbnail(path):
    img = ImageOps.contain(load_image(path), (THUMB, THUMB), Image.BICUBIC)  # up or down to fit the tile
    tile = Image.new("RGB", (THUMB, THUMB), "white")
    tile.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
    return tile


def contact_sheet(run, path=None):
    """RUN/contact_sheet.png: per reference pair, the content and style pictures, then the images made."""
    run = Path(run)
    cfg, items = read_run(run)
    data = Path(cfg.get("data") or ".")
    style_dir = Path(cfg.get("style_dir") or bench_data.ASSETS)
    groups = {}
    for item in items:
        if (run / item["file"]).is_file():
            groups.setdefault((item["content"], item["style"]), []).append(item)
    groups = list(groups.items())[:SHEET_ROWS]
    if not groups:
        raise DrpError(f"{run} has no images yet; run it first.")
    label = 14  # pixels of text above each row
    refs = max(bool(c) + bool(s) for (c, s), _ in groups)
    columns = min(SHEET_IMAGES, max(len(members) for _, members in groups))
    width = (refs + columns) * THUMB + 8
    sheet = Image.new("RGB", (width, len(groups) * (THUMB + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, ((content, style), members) in enumerate(groups):
        y = row * (THUMB + label)
        draw.text((2, y), " + ".join(x for x in (content, style) if x) or members[0]["prompt"], fill="black")
        pictures = [data / content] * bool(content) + [style_dir / style] * bool(style)
        for col, picture in enumerate(pictures):
            if picture.is_file():
                sheet.paste(thumbnail(picture), (col * THUMB, y + label))
        for col, item in enumerate(members[:SHEET_IMAGES]):
            sheet.paste(thumbnail(run / item["file"]), ((refs + col) * THUMB + 8, y + label))
    return write_atomically(path or run / "contact_sheet.png", lambda tmp: sheet.save(tmp, format="PNG"),
                            f"make {run} writable.")


def report(runs, out=None):
    """Writes summary.json and report.md into `out` (default: the first run) and a contact sheet per run;
    returns the Markdown table."""
    summaries = [summarize(run) for run in runs]
    for run in runs:
        contact_sheet(run)
    out = Path(out or runs[0])
    make_folder(out)
    text = table(summaries)
    write_text(out / "summary.json", json.dumps(summaries, indent=1) + "\n")
    write_text(out / "report.md", text)
    return text
