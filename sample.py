"""Make images from the command line: Stable Diffusion 1.x text-to-image, with DRP-Diff's two references.

    python sample.py                                           # the demo (see DEMO below)
    python sample.py --prompt "a lighthouse at dusk" --seed 7 --out lighthouse.png
    python sample.py --prompt "a cat on a beach" --content cat.jpg --subject cat --style painting.jpg
    python sample.py --mode self-attention                     # the demo without IP-Adapter, even where it is converted
    python sample.py --prompt "a cat, best quality" --ip-image cat.jpg --ip-scale 0.6   # IP-Adapter image prompt
    python sample.py --attention-maps cat,beach,content,style   # the demo, and where each acts: 42-attention.png

On a fresh machine (no converted weights in --weights) it first downloads SD 1.5, and IP-Adapter with its
image encoder for the paper's mode (6.8 GB in all; `--mode self-attention`: SD 1.5 alone, 4.3 GB), and
converts them, as `python convert_weights.py --download` and `--download ip-adapter` do; `--no-download`
stops with an error instead. A folder that holds converted SD weights is not added to (but to finish a first
run that stopped): `--mode auto` then runs with what is there, and says how to add IP-Adapter. $DRP_WEIGHTS_URL
and $DRP_IP_ADAPTER_URL name other addresses of the files (drp/first_run.py).
The settings, files and folders are checked before the weights are loaded, so a mistake costs no time:
it is reported as one line `error: …` on stderr, the exit status is 1, and nothing is written. Each image is saved as a
PNG that carries its settings in the web UI's `parameters` text chunk (drp/png_info.py).
"""

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

import drp
from drp import cache, first_run, heatmaps
from drp.attention_maps import check_names
from drp.devices import resolve_device, resolve_dtype
from drp.dual_reference import Options
from drp.dual_reference_ip import Options as IPOptions
from drp.errors import DrpError
from drp.images import load_image
from drp.ip_adapter import parse_scale, resolve_scale
from drp.method_common import MODES, resolve_mode
from drp.mode_flags import (check_mode_settings, ip_files_missing, ip_knobs, planned_mode, self_attention_knobs,
                            unet_layer_names)
from drp.model_io import VOCAB, read_model_json
from drp.sampling import check_settings
from drp.png_info import parameters_text, save_png
from drp.report import save_report
from drp.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
# With no --prompt: a cat photo as the subject, a painting as the style (licences in assets/README.md).
DEMO = {"prompt": "a cat sitting on a beach, in the style of a painting", "subject": "cat",
        "content": ASSETS / "chelsea.png", "style": ASSETS / "starry_night.jpg"}
DEFAULT_OUT = "outputs"
DEFAULT_SEED = 42
MAX_SEED = 2**32 - 1  # the range of seeds the web UIs show
IP_SCALE = 0.6  # --ip-scale's default, as drp.generate's ip_scale


def number(text):
    """argparse type: a float that is a real number (not nan or inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def ip_scale(text):
    """argparse type: a number, or BLOCK=NUMBER pairs separated by commas (a per-block scale; ip_adapter.parse_scale)."""
    try:
        return parse_scale(text)
    except DrpError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Generate images with Stable Diffusion 1.x, optionally guided by a photo of a subject "
                    "(--content) and a picture to take the style from (--style) with DRP-Diff. "
                    "Without --prompt it runs the demo.")
    g = p.add_argument_group("text-to-image")
    g.add_argument("--prompt", metavar="TEXT",
                   help=f"what to draw (without it: the demo, {DEMO['prompt']!r}, subject 'cat', with the "
                        "bundled cat photo and painting as references)")
    g.add_argument("--negative-prompt", default="", metavar="TEXT", help="what to steer away from")
    g.add_argument("--steps", type=int, default=50, metavar="N", help="DDIM steps (default: %(default)s)")
    g.add_argument("--guidance", type=number, default=7.5, metavar="SCALE",
                   help="classifier-free guidance scale (default: %(default)s)")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="N",
                   help="seed of the first image; image k gets seed + k (default: %(default)s)")
    g.add_argument("--height", type=int, default=512, metavar="PX", help="a multiple of 8 (default: %(default)s)")
    g.add_argument("--width", type=int, default=512, metavar="PX", help="a multiple of 8 (default: %(default)s)")
    g.add_argument("--num-images", type=int, default=1, metavar="N", help="how many images (default: %(default)s)")
    g.add_argument("--eta", type=number, default=0.0, metavar="ETA",
                   help="DDIM noise, from 0 (deterministic, the default) to 1")

    d = p.add_argument_group("DRP-Diff references")
    d.add_argument("--content", metavar="IMG", help="photo of the subject to put in the image")
    d.add_argument("--style", metavar="IMG", help="picture whose style the image takes")
    d.add_argument("--subject", metavar="WORD", help="the word of the prompt that names the content's subject")
    d.add_argument("--content-mask", metavar="IMG", help="white = the subject in --content (default: found by SD)")
    d.add_argument("--style-mask", metavar="IMG", help="white = the foreground of --style (default: found by SD)")
    d.add_argument("--switch-step", type=int, metavar="N",
                   help="the step where the late stage starts, either mode (default: from the references' entropies)")
    d.add_argument("--report", metavar="FILE.png", help="also draw the masks, the numbers and the result into FILE.png")
    d.add_argument("--fixed-switch", action="store_true", default=None,
                   help="ablation, either mode: switch at half the steps")
    d.add_argument("--mode", choices=MODES, default="auto",
                   help="how the references enter the image: self-attention (SD 1.5 alone, masks from inverted "
                        "references), ip-adapter (the paper's: image tokens in the cross-attention, an SVD split of "
                        "the image keys; needs `python convert_weights.py --download ip-adapter`), or auto "
                        "(default): ip-adapter when its files are in --weights")

    # Flags of one mode default to None, so that a flag given to the other mode is an error, not ignored.
    a = p.add_argument_group("DRP-Diff in self-attention (--mode self-attention; see docs/ALGORITHM.md)")
    a.add_argument("--layers", metavar="BLOCKS", help="comma-separated UNet blocks whose self-attention sees the "
                                                      f"references (default: {','.join(Options().layers)})")
    a.add_argument("--no-masks", action="store_true", default=None, help="ablation: every reference token everywhere")
    a.add_argument("--style-caption", metavar="TEXT", help="caption to invert --style with (default: none)")
    a.add_argument("--cache-dir", metavar="DIR",
                   help="where reference inversions are kept (default: $DRP_CACHE_DIR, else ~/.cache/drp)")
    a.add_argument("--no-cache", action="store_true", default=None,
                   help="invert the references again, and keep nothing")
    a.add_argument("--clear-cache", action="store_true", help="empty the cache folder first (any mode)")

    m = p.add_argument_group("DRP-Diff on IP-Adapter (--mode ip-adapter; see docs/ALGORITHM_IP_ADAPTER.md)")
    ip = IPOptions()
    m.add_argument("--rank-energy", type=number, metavar="E", help="share of the singular values' energy Σσ² "
                   f"that counts as foreground, in (0, 1] (default: {ip.rank_energy})")
    m.add_argument("--rank-rule", choices=("energy", "gd"),
                   help="split the spectrum by --rank-energy or by the Gavish-Donoho threshold "
                        f"(default: {ip.rank_rule})")
    m.add_argument("--floor", type=number, metavar="E", help="ε of the style matrix W̄: σ below ε·σ_1 are re-weighted "
                   f"as ε·σ_1, so the tilt is at most ε^-p (default: {ip.floor})")
    m.add_argument("--power", type=number, metavar="P", help="p of W̄'s weights σ·σ^-p: 2 = 1/σ, 1 = the polar factor, "
                   f"0 = the adapter's keys (default: {ip.power})")
    m.add_argument("--scale-early", type=ip_scale, metavar="S", help="image-attention scale of the early stage: a "
                   f"number, or per block as --ip-scale takes it (default: {ip.scale_early})")
    m.add_argument("--scale-late", type=ip_scale, metavar="S",
                   help=f"image-attention scale of the late stage, the same way (default: {ip.scale_late})")
    m.add_argument("--late", choices=("both", "style-only"),
                   help=f"late-stage image tokens: both references, or the style's alone (default: {ip.late})")
    m.add_argument("--no-bg-prompt", action="store_true", default=None,
                   help="ablation: keep the subject's words in the early stage's text (C_bg = the full prompt)")
    m.add_argument("--bg-placeholder", metavar="TEXT",
                   help="what replaces the subject's words in the early stage's text C_bg (default: nothing)")
    m.add_argument("--ip-layers", metavar="BLOCKS", help="comma-separated blocks or attn2 layers with image attention, "
                                                         "e.g. up_blocks.1,mid_block (default: every attn2 layer)")
    m.add_argument("--filter-values", action="store_true", default=None,
                   help="ablation: the early stage's values also leave out the background directions (default: off)")

    i = p.add_argument_group("IP-Adapter image prompt (after `python convert_weights.py --download ip-adapter`)")
    i.add_argument("--ip-image", action="append", metavar="IMG",
                   help="a picture to prompt with; repeat for several (they share one attention)")
    i.add_argument("--ip-scale", type=ip_scale, metavar="S",
                   help=f"how strongly the picture counts: a number (default: {IP_SCALE}), or per block, "
                        "e.g. up_blocks.1=1.0 (style only) or down_blocks.2=1,mid_block=1 (layout); "
                        "blocks not named get 0")

    o = p.add_argument_group("output and machine")
    o.add_argument("--out", metavar="PATH", help=f"a folder (images named <seed>.png) or a file x.png "
                                                 f"(x-0.png, x-1.png, … for several; default: {DEFAULT_OUT}/)")
    o.add_argument("--weights", default="weights", metavar="DIR", help="converted weights (default: %(default)s)")
    o.add_argument("--no-download", action="store_true",
                   help="if DIR holds no converted weights, stop with an error instead of downloading SD 1.5 and "
                        "IP-Adapter with its image encoder (6.8 GB; with --mode self-attention SD 1.5 alone, "
                        "4.3 GB) into DIR and converting them; $DRP_WEIGHTS_URL and $DRP_IP_ADAPTER_URL name "
                        "other addresses")
    o.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,mps}", help="(default: %(default)s)")
    o.add_argument("--dtype", default="auto", metavar="{auto,fp32,fp16,bf16}",
                   help="(default: %(default)s: fp16 on CUDA, bf16 on CPUs with fast bf16, else fp32)")
    o.add_argument("--tiled-decode", action="store_true",
                   help="decode in 512-px tiles: less memory for large images, slightly different pixels")
    o.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: 1.5× faster steps on a GPU after minutes of compiling "
                        "(more with references); no gain on a CPU")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    o.add_argument("--attention-maps", metavar="NAMES",
                   help="comma-separated words of the prompt, and content/style for the references: also write "
                        "<image>-attention.png, where in the image each of them acts, per stage")
    return p.parse_args(argv)


def with_demo(args):
    """Without --prompt, the demo: its prompt, and its subject and references where none were given."""
    if args.prompt is not None:
        return False
    if args.ip_image:  # an image prompt alone: the picture's variations
        args.prompt = ""
        return False
    args.prompt = DEMO["prompt"]
    for name in ("subject", "content", "style"):
        if getattr(args, name) is None:
            setattr(args, name, str(DEMO[name]))
    return True


def check_folder(folder, what):
    """A folder we are about to write into exists and is writable, or DrpError."""
    if folder.exists() and not folder.is_dir():
        raise DrpError(f"the {what} folder {folder} is a file, not a folder; choose another path.")
    if not folder.is_dir():
        raise DrpError(f"the {what} folder {folder} does not exist; create it or choose another.")
    if not os.access(folder, os.W_OK):
        raise DrpError(f"the {what} folder {folder} is not writable; choose another.")


def output_paths(out, seeds):
    """Where each image goes: <folder>/<seed>.png, or x.png (one image) / x-<k>.png (several)."""
    path = Path(out or DEFAULT_OUT)
    if path.suffix.lower() in (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"):
        raise DrpError(f"images are saved as PNG; give --out a name ending in .png or a folder, not {path}.")
    if path.suffix.lower() == ".png" and not path.is_dir():
        check_folder(path.parent, "output")
        if len(seeds) == 1:
            return [path]
        return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(len(seeds))]
    if out is None and not path.exists():
        check_folder(path.parent, "output")  # the default folder is made when saving
    else:
        check_folder(path, "output")
    return [path / f"{seed}.png" for seed in seeds]


def checked_settings(args):
    """All of the command's settings, checked; raises DrpError at the first bad one. Loads no weights."""
    check_settings(args.steps, args.guidance, args.height, args.width, args.eta)
    if args.num_images < 1:
        raise DrpError(f"--num-images must be a whole number ≥ 1, got {args.num_images}.")
    if not 0 <= args.seed <= MAX_SEED:
        raise DrpError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {args.seed}.")
    if args.no_masks and (args.content_mask or args.style_mask):
        raise DrpError("--no-masks gives every reference token to every query, so it cannot take --content-mask "
                       "or --style-mask; drop the mask or --no-masks.")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    for name in ("content", "style", "content_mask", "style_mask"):
        if getattr(args, name) is not None:
            what = name.replace("_", " ") if name.endswith("mask") else f"{name} image"
            load_image(getattr(args, name), what)  # unreadable, empty or huge -> DrpError
    for image in args.ip_image or []:
        load_image(image, "IP-Adapter image")
    if args.ip_image and (args.content or args.style):
        raise DrpError("--ip-image is a plain image prompt and cannot be combined with --content/--style; give the "
                       "pictures as --content and --style (the ip-adapter mode puts them in the cross-attention).")
    if args.ip_scale is not None and not args.ip_image:
        raise DrpError("--ip-scale is the scale of the --ip-image prompt, and no --ip-image was given; add one, or "
                       "drop --ip-scale (DRP-Diff's stages have --scale-early and --scale-late).")
    if args.ip_image and args.ip_scale is not None:
        resolve_scale(args.ip_scale, unet_layer_names(args.weights))  # a block the UNet does not have: DrpError
    fetching = first_run_downloads(args)  # a first run's downloads count: they are there when the weights load
    mode, why = planned_mode(args, fetching)
    if mode == "ip-adapter" and (args.content_mask or args.style_mask):
        raise DrpError("the ip-adapter mode splits foreground from background spectrally and takes no masks; "
                       "drop --content-mask/--style-mask or add --mode self-attention.")
    missing = ip_files_missing(args.weights, fetching)
    needs_ip = "--ip-image" if args.ip_image else "--mode ip-adapter" if args.mode == "ip-adapter" and mode else None
    if needs_ip and missing:  # (without references --mode ip-adapter is plain text-to-image)
        raise DrpError(f"{needs_ip} needs IP-Adapter's files, and {args.weights} lacks {', '.join(missing)}; "
                       "add them with `python convert_weights.py --download ip-adapter` (or ip-adapter-plus).")
    check_mode_settings(args, mode, why)
    if args.attention_maps:  # the prompt's words are known from its text alone: no weights needed
        vocab = Path(args.weights) / VOCAB
        check_names(Tokenizer(vocab if vocab.is_file() else None), [args.prompt], args.attention_maps,
                    args.content is not None, args.style is not None)
    if args.report:
        if Path(args.report).suffix.lower() != ".png":
            raise DrpError(f"the report is a PNG picture; give --report a name ending in .png, not {args.report}.")
        check_folder(Path(args.report).parent, "report")
    paths = output_paths(args.out, [args.seed + k for k in range(args.num_images)])
    return device, dtype, paths


def first_run_downloads(args):
    """What this run downloads into --weights before loading: some of "sd15" and "ip-adapter" (drp/first_run.py)."""
    return [] if args.no_download else first_run.downloads(args.weights, args.mode)


def download_weights(folder, what, progress):
    """The first run: `what` downloaded into `folder` and converted there, saying first what, how big and where."""
    for line in first_run.announcement(folder, what):
        print(line)
    kept = first_run.fetch_and_convert(folder, what, progress=progress)
    names = " and ".join(first_run.NAMES[w] for w in what)
    print(f"converted {names} into {folder}; the downloads ({', '.join(map(str, kept))}) can be deleted")


def generate_settings(args, mode):
    """The keyword arguments of drp.generate for this command line, with the knobs of the chosen mode."""
    settings = dict(
        negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance, height=args.height,
        width=args.width, seed=args.seed, eta=args.eta, num_images=args.num_images, progress=not args.no_progress,
        content=args.content, style=args.style, subject=args.subject, content_mask=args.content_mask,
        style_mask=args.style_mask, switch_step=args.switch_step, tiled_decode=args.tiled_decode,
        ip_image=args.ip_image, ip_scale=IP_SCALE if args.ip_scale is None else args.ip_scale, mode=mode,
    )
    if not (args.content or args.style):
        return settings
    return settings | (ip_knobs(args) if mode == "ip-adapter" else self_attention_knobs(args))


def first_line(args, mode, demo):
    """What the run does, said first: the mode (and the demo's inputs)."""
    if args.content or args.style:
        what = {"ip-adapter": "DRP-Diff on IP-Adapter (cross-attention, SVD-split image keys)",
                "self-attention": "DRP-Diff in self-attention (SD 1.5 alone, inverted references)"}[mode]
        line = f"mode: {mode}: {what}"
    else:
        line = "mode: text-to-image" + (" with an IP-Adapter image prompt" if args.ip_image else "")
    if demo:
        line += f"; demo: {args.prompt!r} with {args.content} (content) and {args.style} (style)"
    return line


class WarnOnce:
    """warnings.showwarning for the command line: `warning: …` on stderr, each text once."""

    def __init__(self):
        self.shown = set()

    def __call__(self, message, *where):
        if str(message) not in self.shown:
            self.shown.add(str(message))
            print(f"warning: {message}", file=sys.stderr)


def run(args):
    demo = with_demo(args)
    fetching = first_run_downloads(args)
    device, dtype, paths = checked_settings(args)
    folder, references = Path(args.weights), bool(args.content or args.style)
    if "sd15" not in fetching:
        read_model_json(folder)  # no (complete) converted weights and --no-download: said before anything else
    planned, _ = planned_mode(args, fetching)
    print(first_line(args, planned, demo))  # the mode that will run, before any download
    if references and args.mode == "auto" and planned == "self-attention":
        print(f"(IP-Adapter's files are not in {folder}, so --mode auto runs the self-attention mode; "
              "`python convert_weights.py --download ip-adapter` adds them, 2.6 GB, for the paper's mode)")
    if fetching:
        download_weights(folder, fetching, progress=not args.no_progress)
    sd = drp.load(args.weights, device=device, dtype=dtype)  # a missing or broken folder: DrpError
    mode = resolve_mode(sd, args.mode, references=references)  # as planned_mode said: by the files there now
    if references and mode != planned:  # the folder changed under us (another process converted into it)
        check_mode_settings(args, mode, f"--mode auto chose {mode} with the weights in {args.weights}")
    if args.compile:  # compiled on its first call of each shape and kind of hook, then reused
        print("--compile: the first steps compile the UNet (about a minute on a GPU, more with references)")
        sd.unet.compile()
    if args.clear_cache:
        folder = args.cache_dir or cache.default_cache_dir()
        print(f"cache cleared: {folder} ({cache.clear(folder)} removed)")
    result = drp.generate(sd, args.prompt, attention_maps=args.attention_maps, **generate_settings(args, mode))

    paths[0].parent.mkdir(exist_ok=True)  # only the default folder can be missing here
    for k, (image, path) in enumerate(zip(result.images, paths)):
        save_png(image, path, parameters_text(result.info, k))
        print(f"saved {path} (seed {result.info['seeds'][k]})")
        if result.attention_maps:
            print(f"saved {heatmaps.save_picture(heatmaps.picture_path(path), image, result.attention_maps, k)} "
                  "(attention maps)")
    if args.report:
        save_report(args.report, result, args.content, args.style)
        print(f"saved {args.report} (report)")


def main(argv=None):
    args = parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every warning reaches WarnOnce, which drops repeats
        warnings.showwarning = WarnOnce()
        try:
            run(args)
        except DrpError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130  # 128 + SIGINT, the shell's convention
    return 0


if __name__ == "__main__":
    sys.exit(main())
