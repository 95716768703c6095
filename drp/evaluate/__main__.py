"""The evaluation harness's command line: download, run, items, import, score, report.

    python -m drp.evaluate download dreambench --out data/dreambench
    python -m drp.evaluate run --bench dreambench --data data/dreambench --out runs/plain --mode plain
    torchrun --nproc_per_node 8 -m drp.evaluate run --bench dreambench --data data/dreambench --out runs/drp --mode auto
    python -m drp.evaluate items --bench dreambench --data data/dreambench --out runs/other
    python -m drp.evaluate import runs/other --from rendered/ --method OtherMethod
    python -m drp.evaluate score runs/drp --clip clip-vit-large-patch14 --dino dino_deitsmall16_pretrain.pth
    python -m drp.evaluate report runs/plain runs/drp runs/other --real data/dreambench

A mistake in the input is reported as one line `error: …` on stderr with exit status 1, before any
weights are loaded where it can be; nothing already on disk is overwritten.
"""

import argparse
import sys

from ..errors import DrpError
from ..ip_adapter import parse_scale
from . import run as run_module
from .plan import BENCHES

MAX_SEED = 2**32 - 1


def names(text):
    """argparse type: 'a,b' -> ['a', 'b']."""
    return [n.strip() for n in text.split(",") if n.strip()]


def key_value(text):
    """argparse type: 'KEY=VALUE' -> (KEY, VALUE)."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. bg_prompt=false)")
    return key.strip(), value.strip()


def item_options(p):
    """The options that choose a benchmark's items: `run` and `items` share them."""
    p.add_argument("--bench", required=True, choices=BENCHES)
    p.add_argument("--data", metavar="DATA", help="the DreamBench folder of `download` (dreambench, dual)")
    p.add_argument("--style-dir", metavar="DIR", help="style pictures (style, dual; default: the project's paintings)")
    p.add_argument("--subjects", type=names, metavar="A,B", help="DreamBench subjects (default: all 30)")
    p.add_argument("--prompts", type=int, metavar="N", help="the first N prompts of each subject or style")
    p.add_argument("--images-per-prompt", type=int, default=4, metavar="K", help="(default: %(default)s)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N items (in sorted order)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="base seed; each item's seed derives from "
                                                                    "it and the item's id (default: %(default)s)")


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
    item_options(r)
    r.add_argument("--out", required=True, metavar="RUN", help="the run's folder (resumed when it exists)")
    r.add_argument("--mode", default="plain", choices=run_module.MODES,
                   help="plain: the prompt alone (the baseline); image-prompt: plain IP-Adapter with the "
                        "references; the others: DRP-Diff's modes (default: %(default)s)")
    r.add_argument("--ip-scale", metavar="S", help="image-prompt: a number, or BLOCK=NUMBER pairs such as "
                                                   "up_blocks.1=1 (InstantStyle) (default: 0.6)")
    r.add_argument("--set", dest="options", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="a knob of the DRP-Diff mode (its Options, or switch_step), e.g. bg_prompt=false; repeatable")
    r.add_argument("--negative-prompt", default="", metavar="TEXT", help="(default: none)")
    r.add_argument("--batch", type=int, default=1, metavar="K",
                   help="images of one prompt made together, each from its own seed (default: %(default)s)")
    r.add_argument("--attention-maps", type=names, metavar="NAMES",
                   help="words of the prompts, and content/style (DRP-Diff modes): keep each image's attention maps "
                        "as images/<id>.npz beside its PNG")
    r.add_argument("--weights", default="weights", metavar="DIR", help="converted weights (default: %(default)s)")
    r.add_argument("--steps", type=int, default=50, metavar="N", help="(default: %(default)s)")
    r.add_argument("--height", type=int, default=512, metavar="PX", help="(default: %(default)s)")
    r.add_argument("--width", type=int, default=512, metavar="PX", help="(default: %(default)s)")
    r.add_argument("--guidance", type=float, default=7.5, metavar="SCALE", help="(default: %(default)s)")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: cuda:<local rank>)")
    r.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16 (default: %(default)s)")
    r.add_argument("--no-progress", action="store_true")

    i = sub.add_parser("items", help="write a benchmark's items for another method to render")
    item_options(i)
    i.add_argument("--out", required=True, metavar="RUN", help="the run's folder: items.jsonl and config.json")

    m = sub.add_parser("import", help="bring another method's pictures <id>.png|jpg|webp into an `items` run")
    m.add_argument("run", metavar="RUN")
    m.add_argument("--from", dest="source", required=True, metavar="DIR", help="the folder of the pictures")
    m.add_argument("--method", metavar="NAME", help="the method's name in the report (default: DIR's name)")
    m.add_argument("--partial", action="store_true", help="import what is there, even if some items are missing")
    m.add_argument("--no-progress", action="store_true")

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
    t.add_argument("--real", metavar="DATA", help="add the real-vs-real row: DreamBench's photos against each other")
    t.add_argument("--clip", metavar="DIR", help="--real: where the scoring CLIP is now (default: where it was)")
    t.add_argument("--dino", metavar="FILE|DIR", help="--real: where the scoring DINO is now (default: where it was)")
    t.add_argument("--unpaired", action="store_true",
                   help="runs over different items: tabulate them without paired differences")
    t.add_argument("--no-progress", action="store_true")
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
            options = dict(args.options)
            if len(options) < len(args.options):
                raise DrpError("--set gives one knob twice; give each knob once.")
            ip_scale = parse_scale(args.ip_scale) if args.ip_scale is not None else None
            cfg = run_module.make_config(
                args.bench, args.mode, args.data, args.style_dir, args.subjects, args.prompts,
                args.images_per_prompt, args.limit, args.seed, args.steps, args.height, args.width, args.guidance,
                args.dtype, args.negative_prompt, options, ip_scale, args.batch, args.attention_maps)
            run_module.run(cfg, args.out, args.weights, args.device, progress=not args.no_progress)
        elif args.command == "items":
            from .external import items

            listed = items(args.bench, args.out, args.data, args.style_dir, args.subjects, args.prompts,
                           args.images_per_prompt, args.limit, args.seed)
            print(f"wrote {len(listed)} items into {args.out}/items.jsonl: render each as <id>.png, then "
                  f"`python -m drp.evaluate import {args.out} --from DIR`")
        elif args.command == "import":
            from .external import import_images

            import_images(args.run, args.source, args.method, args.partial, progress=not args.no_progress)
        elif args.command == "score":
            from .score import score

            score(args.run, args.clip, args.dino, data=args.data, style_dir=args.style_dir, device=args.device,
                  batch_size=args.batch_size, progress=not args.no_progress)
        elif args.command == "report":
            from .report import report

            print(report(args.runs, args.out, real=args.real, clip=args.clip, dino=args.dino,
                         paired=not args.unpaired, progress=not args.no_progress))
    except DrpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
