"""The evaluation harness's command line: download, run, score, report.

    python -m drp.evaluate download dreambench --out data/dreambench
    python -m drp.evaluate run --bench dreambench --data data/dreambench --out runs/plain --mode plain
    torchrun --nproc_per_node 8 -m drp.evaluate run --bench dreambench --data data/dreambench --out runs/drp --mode auto
    python -m drp.evaluate score runs/drp --clip clip-vit-large-patch14 --dino dino_deitsmall16_pretrain.pth
    python -m drp.evaluate report runs/plain runs/drp

A mistake in the input is reported as one line `error: …` on stderr with exit status 1, before any
weights are loaded where it can be; nothing already on disk is overwritten.
"""

import argparse
import sys

from ..errors import DrpError
from . import run as run_module

MAX_SEED = 2**32 - 1


def names(text):
    """argparse type: 'a,b' -> ['a', 'b']."""
    return [n.strip() for n in text.split(",") if n.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m drp.evaluate",
                                description="Benchmarks for personalization: generate, score and tabulate.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("download", help="download a benchmark's dataset")
    d.add_argument("dataset", choices=["dreambench"])
    d.add_argument("--out", required=True, metavar="DATA", help="folder to hold the dataset (DATA/dataset/...)")
    d.add_argument("--tree-url", metavar="URL", help="the git-trees listing of the files (default: GitHub's API)")
    d.add_argument("--raw-url", metavar="URL", help="base address of the files (default: raw.githubusercontent.com)")
    d.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("run", help="generate a benchmark's images (also under torchrun)")
    r.add_argument("--bench", required=True, choices=run_module.BENCHES)
    r.add_argument("--data", metavar="DATA", help="the DreamBench folder of `download` (dreambench, dual)")
    r.add_argument("--out", required=True, metavar="RUN", help="the run's folder (resumed when it exists)")
    r.add_argument("--mode", default="plain", choices=run_module.MODES,
                   help="plain: the prompt alone (the baseline); the others: DRP-Diff's modes (default: %(default)s)")
    r.add_argument("--style-dir", metavar="DIR", help="style pictures (style, dual; default: the project's paintings)")
    r.add_argument("--subjects", type=names, metavar="A,B", help="DreamBench subjects (default: all 30)")
    r.add_argument("--prompts", type=int, metavar="N", help="the first N prompts of each subject or style")
    r.add_argument("--images-per-prompt", type=int, default=4, metavar="K", help="(default: %(default)s)")
    r.add_argument("--limit", type=int, metavar="N", help="only the first N items (in sorted order)")
    r.add_argument("--seed", type=int, default=0, metavar="N", help="base seed; each item's seed derives from "
                                                                    "it and the item's id (default: %(default)s)")
    r.add_argument("--weights", default="weights", metavar="DIR", help="converted weights (default: %(default)s)")
    r.add_argument("--steps", type=int, default=50, metavar="N", help="(default: %(default)s)")
    r.add_argument("--height", type=int, default=512, metavar="PX", help="(default: %(default)s)")
    r.add_argument("--width", type=int, default=512, metavar="PX", help="(default: %(default)s)")
    r.add_argument("--guidance", type=float, default=7.5, metavar="SCALE", help="(default: %(default)s)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: cuda:<local rank>)")
    r.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16 (default: %(default)s)")
    r.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("score", help="score a run's images with CLIP and DINO (also under torchrun)")
    s.add_argument("run", metavar="RUN")
    s.add_argument("--clip", required=True, metavar="DIR", help="a transformers CLIPModel folder (e.g. "
                                                                "openai/clip-vit-large-patch14)")
    s.add_argument("--dino", metavar="FILE|DIR", help="dino_deitsmall16_pretrain.pth or a facebook/dino-vits16 folder")
    s.add_argument("--data", metavar="DATA", help="where DreamBench is now (default: the run's)")
    s.add_argument("--style-dir", metavar="DIR", help="where the style pictures are now (default: the run's)")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=int, default=16, metavar="N")
    s.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("report", help="tabulate scored runs and draw a contact sheet of each")
    t.add_argument("runs", nargs="+", metavar="RUN")
    t.add_argument("--out", metavar="DIR", help="where summary.json and report.md go (default: the first RUN)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.command == "download":
            from .fetch import download_dreambench

            n = download_dreambench(args.out, args.tree_url, args.raw_url, progress=not args.no_progress)
            print(f"DreamBench is complete in {args.out} ({n} files downloaded now)")
        elif args.command == "run":
            if not 0 <= args.seed <= MAX_SEED:
                raise DrpError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {args.seed}.")
            cfg = run_module.make_config(
                args.bench, args.mode, args.data, args.style_dir, args.subjects, args.prompts,
                args.images_per_prompt, args.limit, args.seed, args.steps, args.height, args.width, args.guidance,
                args.dtype)
            run_module.run(cfg, args.out, args.weights, args.device, progress=not args.no_progress)
        elif args.command == "score":
            from .score import score

            score(args.run, args.clip, args.dino, data=args.data, style_dir=args.style_dir, device=args.device,
                  batch_size=args.batch_size, progress=not args.no_progress)
        elif args.command == "report":
            from .report import report

            print(report(args.runs, args.out))
    except DrpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
