"""The evaluation harness: benchmarks, metrics written by hand, and runs spread over many GPUs with torchrun.

    python -m drp.evaluate download dreambench --out DATA     fetch.py    (DreamBench, checked file by file)
    python -m drp.evaluate run --bench B --data DATA --out RUN  run.py      (modes, --set knobs.py, batches, resume)
    python -m drp.evaluate items … / import RUN --from DIR      external.py (other methods' images)
    python -m drp.evaluate score RUN --clip CLIP --dino DINO  score.py    (metrics.py: CLIP and DINO; resumable)
    python -m drp.evaluate report RUN [RUN ...] [--real DATA] report.py   (stats.py: bootstrap; real.py, sheet.py)

plan.py holds what a run is (items, seeds, config.json, the folder), data.py the benchmarks' lists,
ranks.py the little torch.distributed it needs. The protocol and the metrics' definitions are
docs/EVALUATION.md's.
"""
