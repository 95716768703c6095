"""The evaluation harness: benchmarks, metrics written by hand, and runs spread over many GPUs with torchrun.

    python -m drp.evaluate download dreambench --out DATA     fetch.py   (DreamBench, checked file by file)
    python -m drp.evaluate run --bench B --data DATA --out RUN  run.py     (items, seeds, shards, resume)
    python -m drp.evaluate score RUN --clip CLIP --dino DINO  score.py   (metrics.py: CLIP and DINO)
    python -m drp.evaluate report RUN [RUN ...]               report.py  (table, summary, contact sheets)

data.py holds the benchmarks' lists, ranks.py the little torch.distributed it needs. The protocol and the
metrics' definitions are docs/EVALUATION.md's.
"""
