"""Tabulating scored runs: summary.json, report.md (the table, paired differences, breakdowns), contact sheets.

Where it sits: `python -m drp.evaluate report RUN [RUN ...] [--real DATA]`, the last step. Each run is
one row: its method (the mode and its knobs, or the imported method's name), its images, its units
(subjects, style pictures), its seconds per image and machine (RUN/timings.jsonl), and every metric as
the mean with a 95 % bootstrap interval over the units (stats.py), ×100 as papers print it. Then:

- **paired differences**: each run minus the first, per metric, with the interval of the difference
  over the same units, marked `*` where it excludes 0. Runs over different items are refused (one
  sentence; `--unpaired` tabulates them without differences);
- **breakdowns**: per DreamBench prompt kind (recontextualisation, accessory, property; with
  intervals), per subject and per style picture (means);
- **real photos** (`--real DATA`, real.py): CLIP-I and DINO between distinct photos of each subject.

Runs scored with different CLIP or DINO weights are refused, naming them: their numbers are not
comparable. summary.json holds every number raw (not ×100) with its interval and number of units;
the contact sheets are sheet.py's.
"""

import json
from pathlib import Path

from ..errors import DrpError
from . import data as bench_data
from .plan import make_folder, prompt_number, read_run, write_text
from .run import run_summary
from .score import weights_of
from .sheet import contact_sheet
from .stats import DRAWS, LEVEL, SEED, difference, estimate, units_of

METRICS = ("clip_t", "clip_t_bg", "clip_i", "clip_i_cond", "dino", "dino_cond", "style_clip", "content_leak")
KINDS = ("recontextualisation", "accessory", "property")
UNIT_NAMES = {"subject": "subjects", "style": "style pictures"}
FEW_UNITS = 10  # below this many units of a factor, report.md says that the intervals are rough


def labels(item):
    """The units an item belongs to: {subject: DreamBench subject folder, style: style picture}."""
    return dict(subject=Path(item["content"]).parent.name if item["content"] else None, style=item["style"] or None)


def prompt_kind(item):
    """The DreamBench prompt kind of an item, or None (the style benchmark's prompts have none)."""
    if not item["content"]:
        return None
    return bench_data.prompt_kind(prompt_number(item["id"]), item["subject"] in bench_data.LIVE_CLASSES)


def method_of(cfg):
    """How a run is named in the table: the imported method, or the mode with its settings."""
    if cfg["mode"] == "external":
        return cfg.get("method") or "external"
    parts = [cfg["mode"]]
    if cfg.get("ip_scale") is not None:
        scale = cfg["ip_scale"]
        parts.append("scale " + (",".join(f"{k}={v:g}" for k, v in scale.items()) if isinstance(scale, dict)
                                 else f"{scale:g}"))
    parts += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(cfg["options"].items())]
    return " ".join(parts)


def read_scores(run, items):
    """{id: row} of RUN/scores.jsonl, which must hold every item."""
    path = Path(run) / "scores.jsonl"
    if not path.is_file():
        raise DrpError(f"{run} has no scores.jsonl; score it first with "
                       f"`python -m drp.evaluate score {run} --clip CLIP`.")
    try:
        rows = {r["id"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}
    except (ValueError, KeyError, TypeError):
        raise DrpError(f"{path} is broken; score {run} again with `python -m drp.evaluate score`.") from None
    missing = [i["id"] for i in items if i["id"] not in rows]
    if missing:
        raise DrpError(f"{path} has no score for {missing[0]} (of {len(missing)} items); score {run} again.")
    return rows


def common_weights(run, rows):
    """The weights that scored every row of a run (None when they were not recorded)."""
    seen = {json.dumps(weights_of(r), sort_keys=True) for r in rows}
    if len(seen) > 1:
        raise DrpError(f"{run}'s scores come from different weights; score it again with one --clip and --dino.")
    return next(iter(rows)).get("weights") if rows else None


def summarize(run):
    """One run's summary: settings, weights, units, {metric: {mean, ci, images}}, breakdowns, time."""
    run = Path(run)
    cfg, items = read_run(run)
    rows = read_scores(run, items)
    ordered = [rows[i["id"]] for i in items]
    units = units_of([labels(i) for i in items])
    metrics = {m: estimate(units, [r.get(m) for r in ordered]) for m in METRICS}
    breakdown = {"prompt kind": {}, "subject": {}, "style": {}}
    for kind in KINDS:
        chosen = [(i, r) for i, r in zip(items, ordered) if prompt_kind(i) == kind]
        if chosen:
            sub = units_of([labels(i) for i, _ in chosen])
            breakdown["prompt kind"][kind] = {m: e for m in METRICS
                                              if (e := estimate(sub, [r.get(m) for _, r in chosen]))}
    for factor in ("subject", "style"):
        for name in units.levels.get(factor, []):
            chosen = [r for i, r in zip(items, ordered) if labels(i)[factor] == name]
            breakdown[factor][name] = {m: dict(mean=sum(v) / len(v), images=len(v)) for m in METRICS
                                       if (v := [r[m] for r in chosen if m in r])}
    seconds, machine = run_summary(run)
    size = f"{cfg['width']}x{cfg['height']}" if cfg.get("width") else None  # an imported run: the other tool's
    return dict(run=str(run), name=run.name, bench=cfg["bench"], mode=cfg["mode"], method=method_of(cfg),
                images=len(ordered), steps=cfg.get("steps"), size=size, seconds_per_image=seconds, machine=machine,
                weights=common_weights(run, ordered), units=units.count(),
                metrics={m: e for m, e in metrics.items() if e}, breakdown=breakdown,
                _ids=[i["id"] for i in items], _units=units, _values={m: [r.get(m) for r in ordered] for m in METRICS})


def weights_text(weights):
    if weights is None:
        return "unrecorded weights"
    parts = []
    for name in ("clip", "dino"):
        w = weights.get(name)
        if w:
            eps = f", LayerNorm ε {w['eps']:g}" if "eps" in w else ""
            parts.append(f"{w['model']} {w['kind']} ({w['file']}, sha256 {w['sha256'][:12]}…{eps})")
    return " and ".join(parts) + ("" if weights.get("dino") else " without DINO")


def check_comparable(summaries, paired):
    """Refuse runs scored with different weights, and (for paired differences) runs over different items."""
    first = summaries[0]
    for s in summaries:
        if s["weights"] is None and len(summaries) > 1:
            raise DrpError(f"{s['run']} was scored before drp recorded which weights score; score it again "
                           "(`python -m drp.evaluate score` keeps nothing it cannot vouch for).")
    for s in summaries[1:]:
        if weights_of(dict(weights=s["weights"])) != weights_of(dict(weights=first["weights"])):
            raise DrpError(f"{first['run']} was scored with {weights_text(first['weights'])} and {s['run']} with "
                           f"{weights_text(s['weights'])}; score them with the same --clip and --dino to put them "
                           "in one table.")
        if paired and s["_ids"] != first["_ids"]:
            raise DrpError(f"{first['run']} and {s['run']} hold different items ({len(first['_ids'])} and "
                           f"{len(s['_ids'])}), so their paired differences cannot be computed; give runs over the "
                           "same items, or add --unpaired for a table without differences.")


def paired_differences(summaries):
    """Each later run minus the first: {metric: {mean, ci, excludes_zero}}, over the first run's units."""
    first = summaries[0]
    for s in summaries[1:]:
        s["difference"] = {m: d for m in METRICS if (d := difference(first["_units"], s["_values"][m],
                                                                      first["_values"][m]))}


def number(stat, sign=False):
    """A cell: mean ×100 and its interval, e.g. "21.34 [20.10, 22.55]"."""
    if not stat:
        return "—"
    mean = f"{100 * stat['mean']:{'+' if sign else ''}.2f}"
    ci = stat.get("ci")
    interval = f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]" if ci else ""
    return mean + interval + (" *" if stat.get("excludes_zero") else "")


def units_text(count):
    return " × ".join(f"{n} {UNIT_NAMES[f] if n != 1 else f}" for f, n in count.items()) or "—"


def markdown_table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def document(summaries, real):
    """report.md: the table, the paired differences and the breakdowns."""
    every = summaries + ([real] if real else [])
    shown = [m for m in METRICS if any(m in s["metrics"] for s in every)]
    units = ", ".join(sorted({UNIT_NAMES[f] for s in summaries for f in s["units"]})) or "images"
    out = ["# Evaluation report", "",
           f"Each number is a mean ×100 with its {LEVEL:.0%} interval from a bootstrap over {units} ({DRAWS:,} draws, "
           f"seed {SEED}); content_leak: lower is better. Scored with {weights_text(summaries[0]['weights'])}."]
    fewest = min((n for s in summaries for n in s["units"].values()), default=0)
    if fewest < FEW_UNITS:
        out[-1] += (f" With {fewest} units an interval is rough: the bootstrap needs a few dozen to cover its "
                    f"nominal {LEVEL:.0%}.")
    out.append("")
    rows = [[s["name"], s["method"], s["bench"], s["images"], units_text(s["units"]),
             f"{s['seconds_per_image']:.2f}" if s["seconds_per_image"] else "—", s["machine"] or "—"]
            + [number(s["metrics"].get(m)) for m in shown] for s in summaries]
    if real:
        rows.append(["real photos", f"DreamBench photos ({real['data']})", "dreambench", f"{real['images']} photos",
                     units_text(real["units"]), "—", "—"] + [number(real["metrics"].get(m)) for m in shown])
    out += markdown_table(["run", "method", "bench", "images", "units", "s / image", "machine"] + shown, rows)
    if len(summaries) > 1 and "difference" in summaries[1]:
        out += ["", f"## Paired differences to {summaries[0]['name']}", "",
                "Each run minus the first on the same items, ×100; `*`: the interval excludes 0.", ""]
        out += markdown_table(["run"] + shown, [[s["name"]] + [number(s["difference"].get(m), sign=True)
                                                               for m in shown] for s in summaries[1:]])
    for title, factor in (("By prompt kind", "prompt kind"), ("By subject", "subject"), ("By style picture", "style")):
        rows = [[s["name"], group, max(v["images"] for v in stats.values())] + [number(stats.get(m)) for m in shown]
                for s in summaries for group, stats in s["breakdown"][factor].items()]
        if rows:
            out += ["", f"## {title}", ""] + markdown_table(["run", factor, "images"] + shown, rows)
    return "\n".join(out) + "\n"


def report(runs, out=None, real=None, clip=None, dino=None, paired=True, progress=True):
    """Writes summary.json and report.md into `out` (default: the first run) and a contact sheet per run;
    returns report.md's text. `real`: DATA of DreamBench for the real-vs-real row."""
    summaries = [summarize(run) for run in runs]
    check_comparable(summaries, paired)
    if paired and len(summaries) > 1:
        paired_differences(summaries)
    real_row = None
    if real is not None:
        from .real import real_vs_real

        if summaries[0]["weights"] is None:
            raise DrpError(f"{summaries[0]['run']} was scored before drp recorded which weights score, so the "
                           "real photos cannot be scored with the same ones; score it again first.")
        subjects = sorted({n for s in summaries for n in s["_units"].levels.get("subject", [])})
        metrics, per_subject = real_vs_real(real, subjects, summaries[0]["weights"], clip, dino, progress)
        real_row = dict(data=str(real), images=sum(r["photos"] for r in per_subject.values()),
                        units=dict(subject=len(per_subject)), metrics=metrics, per_subject=per_subject)
    for run in runs:
        contact_sheet(run)
    out = Path(out or runs[0])
    make_folder(out)
    text = document(summaries, real_row)
    public = [{k: v for k, v in s.items() if not k.startswith("_")} for s in summaries]
    summary = dict(bootstrap=dict(draws=DRAWS, seed=SEED, level=LEVEL, units="subjects and style pictures"),
                   weights=summaries[0]["weights"], runs=public, real=real_row)
    write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_text(out / "report.md", text)
    return text

