"""Make images from the command line: Stable Diffusion 1.x text-to-image, with DRP-Diff's two references.

    python sample.py                                           # the demo (see DEMO below)
    python sample.py --prompt "a lighthouse at dusk" --seed 7 --out lighthouse.png
    python sample.py --prompt "a cat on a beach" --content cat.jpg --subject cat --style painting.jpg
    python sample.py --mode self-attention                     # the demo without IP-Adapter, even where it is converted
    python sample.py --prompt "a cat, best quality" --ip-image cat.jpg --ip-scale 0.6   # IP-Adapter image prompt
    python sample.py --attention-maps cat,beach,content,style   # the demo, and where each acts: 42-attention.png

On a fresh machine (no converted weights in --weights) it first downloads the SD 1.5 checkpoint and
converts it, as `python convert_weights.py --download` does; `--no-download` stops with an error instead.
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
from drp import cache, heatmaps
from drp.attention_maps import check_names
from drp.convert import convert
from drp.convert import output_paths as converted_paths
from drp.devices import resolve_device, resolve_dtype
from drp.download import checkpoint_path, download, pinned, weights_url
from drp.dual_reference import Options
from drp.dual_reference_ip import Options as IPOptions
from drp.errors import DrpError
from drp.images import load_image
from drp.ip_adapter import attn2_layers, resolve_scale
from drp.method_common import MODES, resolve_mode
from drp.model_io import VOCAB
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


def number(text):
    """argparse type: a float that is a real number (not nan or inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def ip_scale(text):
    """argparse type: a number, or BLOCK=NUMBER pairs separated by commas (a per-block scale)."""
    try:
        return number(text)
    except ValueError:
        pass
    pairs = [part.partition("=") for part in text.split(",")]
    if not all(eq and block.strip() for block, eq, _ in pairs):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor BLOCK=NUMBER pairs")
    return {block.strip(): number(value) for block, _, value in pairs}


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
                   help="the step where the late stage starts (default: from the references' entropies)")
    d.add_argument("--report", metavar="FILE.png", help="also draw the masks, the numbers and the result into FILE.png")
    d.add_argument("--cache-dir", metavar="DIR",
                   help="where reference inversions are kept (default: $DRP_CACHE_DIR, else ~/.cache/drp)")
    d.add_argument("--no-cache", action="store_true", help="invert the references again, and keep nothing")
    d.add_argument("--clear-cache", action="store_true", help="empty the cache folder first")
    d.add_argument("--no-masks", action="store_true", help="ablation: every reference token everywhere")
    d.add_argument("--fixed-switch", action="store_true", help="ablation: switch at half the steps")
    d.add_argument("--layers", default=",".join(Options().layers), metavar="BLOCKS",
                   help="comma-separated UNet blocks whose self-attention sees the references (default: %(default)s)")
    d.add_argument("--style-caption", default="", metavar="TEXT", help="caption to invert --style with (default: none)")
    d.add_argument("--mode", choices=MODES, default="auto",
                   help="how the references enter the image: self-attention (SD 1.5 alone, masks from inverted "
                        "references), ip-adapter (the paper's: image tokens in the cross-attention, an SVD split of "
                        "the image keys; needs `python convert_weights.py --download ip-adapter`), or auto "
                        "(default): ip-adapter when its files are in --weights")

    m = p.add_argument_group("DRP-Diff on IP-Adapter (--mode ip-adapter; see docs/ALGORITHM_IP_ADAPTER.md)")
    ip_defaults = IPOptions()
    m.add_argument("--rank-energy", type=number, default=ip_defaults.rank_energy, metavar="E",
                   help="share of the singular values' energy that counts as foreground (default: %(default)s)")
    m.add_argument("--rank-rule", choices=("energy", "gd"), default=ip_defaults.rank_rule,
                   help="split the spectrum by --rank-energy or by the Gavish-Donoho threshold (default: %(default)s)")
    m.add_argument("--scale-early", type=number, default=ip_defaults.scale_early, metavar="S",
                   help="image-attention scale of the early stage (default: %(default)s)")
    m.add_argument("--scale-late", type=number, default=ip_defaults.scale_late, metavar="S",
                   help="image-attention scale of the late stage (default: %(default)s)")
    m.add_argument("--late", choices=("both", "style-only"), default=ip_defaults.late,
                   help="late-stage image tokens: both references, or the style's alone (default: %(default)s)")
    m.add_argument("--no-bg-prompt", action="store_true",
                   help="ablation: keep the subject's words in the early stage's text")

    i = p.add_argument_group("IP-Adapter image prompt (after `python convert_weights.py --download ip-adapter`)")
    i.add_argument("--ip-image", action="append", metavar="IMG",
                   help="a picture to prompt with; repeat for several (they share one attention)")
    i.add_argument("--ip-scale", type=ip_scale, default=0.6, metavar="S",
                   help="how strongly the picture counts: a number (default: %(default)s), or per block, "
                        "e.g. up_blocks.1=1.0 (style only) or down_blocks.2=1,mid_block=1 (layout); "
                        "blocks not named get 0")

    o = p.add_argument_group("output and machine")
    o.add_argument("--out", metavar="PATH", help=f"a folder (images named <seed>.png) or a file x.png "
                                                 f"(x-0.png, x-1.png, … for several; default: {DEFAULT_OUT}/)")
    o.add_argument("--weights", default="weights", metavar="DIR", help="converted weights (default: %(default)s)")
    o.add_argument("--no-download", action="store_true",
                   help="if DIR holds no converted weights, stop with an error instead of downloading the SD 1.5 "
                        "checkpoint (about 4 GB, or $DRP_WEIGHTS_URL) into DIR and converting it")
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
    if args.ip_image:
        resolve_scale(args.ip_scale, list(attn2_layers()))  # a block SD 1.5 does not have: DrpError
    missing = [f for f in ("ip_adapter.json", "image_encoder.json") if not (Path(args.weights) / f).is_file()]
    ip_mode = args.mode == "ip-adapter" or args.mode == "auto" and not missing  # as drp.generate will choose
    if ip_mode and (args.content or args.style) and (args.content_mask or args.style_mask):
        raise DrpError("the ip-adapter mode splits foreground from background spectrally and takes no masks; "
                       "drop --content-mask/--style-mask or add --mode self-attention.")
    needs_ip = "--ip-image" if args.ip_image else "--mode ip-adapter" if args.mode == "ip-adapter" and (
        args.content or args.style) else None  # (without references --mode ip-adapter is plain text-to-image)
    if needs_ip and missing:
        raise DrpError(f"{needs_ip} needs IP-Adapter's files, and {args.weights} lacks {', '.join(missing)}; "
                       "add them with `python convert_weights.py --download ip-adapter` (or ip-adapter-plus).")
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


def download_weights(folder, progress):
    """A fresh machine: the SD 1.5 checkpoint downloaded into `folder` (or resumed) and converted there,
    as `python convert_weights.py --download` does, saying first what is fetched and where."""
    url = weights_url()
    sha256, size = pinned(url)
    dest = checkpoint_path(folder, url)
    how_big = f"{size / 2**30:.1f} GiB" if size else "size as the server states"
    print(f"{folder} holds no converted weights: downloading {dest.name} ({how_big}) from {url} into {dest}, "
          f"then converting it into {folder} (--no-download stops instead)")
    download(url, dest, progress=progress, sha256=sha256)
    convert(dest, folder, dtype="fp16", progress=progress)
    print(f"converted {dest} into {folder}; the downloaded file can be deleted")


def generate_settings(args, mode):
    """The keyword arguments of drp.generate for this command line, with the options of the chosen mode."""
    settings = dict(
        negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance, height=args.height,
        width=args.width, seed=args.seed, eta=args.eta, num_images=args.num_images, progress=not args.no_progress,
        content=args.content, style=args.style, subject=args.subject, content_mask=args.content_mask,
        style_mask=args.style_mask, switch_step=args.switch_step, tiled_decode=args.tiled_decode,
        ip_image=args.ip_image, ip_scale=args.ip_scale, mode=mode, fixed_switch=args.fixed_switch,
    )
    if mode == "ip-adapter":  # drp/dual_reference_ip.py, Options
        return settings | dict(rank_energy=args.rank_energy, rank_rule=args.rank_rule, scale_early=args.scale_early,
                               scale_late=args.scale_late, late=args.late, bg_prompt=not args.no_bg_prompt)
    return settings | dict(  # drp/dual_reference.py, Options
        layers=args.layers, use_masks=not args.no_masks, style_caption=args.style_caption, cache_dir=args.cache_dir,
        use_cache=not args.no_cache)


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
    device, dtype, paths = checked_settings(args)
    if not args.no_download and not any(p.exists() for p in converted_paths(Path(args.weights))):
        download_weights(Path(args.weights), progress=not args.no_progress)
    sd = drp.load(args.weights, device=device, dtype=dtype)  # a missing or broken folder: DrpError
    mode = resolve_mode(sd, args.mode, references=bool(args.content or args.style))  # auto: by the files there
    print(first_line(args, mode, demo))
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
