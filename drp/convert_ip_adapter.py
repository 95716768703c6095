"""Converting an IP-Adapter file and its CLIP image encoder into drp's weights folder.

What `convert_weights.py` runs when SRC is one of these (drp/convert.py hands them here):

  * an IP-Adapter file of h94/IP-Adapter (`models/ip-adapter_sd15.safetensors`, `_light`, `-plus_sd15`,
    or the `.bin` forms, read only with `torch.load(weights_only=True)`): the safetensors form holds flat
    keys `image_proj.*` / `ip_adapter.<i>.to_{k,v}_ip.weight`, the `.bin` form the same keys nested as
    {"image_proj": {...}, "ip_adapter": {...}}. The projection (base/light or plus) is told from the
    keys; `<i>` becomes our attn2 module name (drp/ip_adapter.py `file_index`). Written: `ip_adapter.safetensors`
    and `ip_adapter.json` (config and provenance).
  * an image-encoder folder (`config.json` + `model.safetensors`, `pytorch_model.bin` or their `.fp16.`
    variants), transformers' `CLIPVisionModelWithProjection`: our names are its names, only
    `vision_model.embeddings.position_ids` is dropped. Written: `image_encoder.safetensors` and
    `image_encoder.json`.

Each is a *component* added next to whatever the folder holds (the SD weights, the other component),
without --force; only replacing the same component needs it. As for SD, the conversion is planned on
shapes and proven a bijection before a byte is written, and the files appear by `os.replace` only when
complete, the JSON last: `drp.load` takes a component only when its JSON is there.

`convert_weights.py --download ip-adapter` and sample.py's first run fetch h94/IP-Adapter's files (or
those under `--ip-adapter-url` / $DRP_IP_ADAPTER_URL, in the same layout) into `<weights>/h94-IP-Adapter/`
with drp/download.py, all of them before converting any: `planned_downloads`, then `convert_downloads`.
"""

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from .download import Planned, fetch
from .errors import DrpError
from .ip_adapter import IPAdapter, IPAdapterConfig, attn2_layers, file_index
from .model_io import build_module_on_meta
from .unet import UNetConfig
from .weight_files import OUT_DTYPES, Move, open_tensors, sha256_of, write_safetensors

FORMAT = 1
ADAPTER = ("ip_adapter.safetensors", "ip_adapter.json")
ENCODER = ("image_encoder.safetensors", "image_encoder.json")
ENCODER_FILES = ["model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"]
# What SD 1.5's IP-Adapters were trained with (h94/IP-Adapter models/image_encoder/config.json).
VIT_H14 = {"hidden_size": 1280, "projection_dim": 1024, "num_hidden_layers": 32, "patch_size": 14}
# Where `--download ip-adapter` and sample.py's first run fetch from: another base address in the same
# layout (models/ip-adapter_sd15.safetensors, models/image_encoder/…) by --ip-adapter-url or this variable.
REPO = "https://huggingface.co/h94/IP-Adapter/resolve/main/"
URL_ENV = "DRP_IP_ADAPTER_URL"
KEEP = "h94-IP-Adapter"  # the downloads are kept in <weights>/h94-IP-Adapter/, in the repository's layout
DOWNLOADS = {"ip-adapter": "models/ip-adapter_sd15.safetensors",
             "ip-adapter-plus": "models/ip-adapter-plus_sd15.safetensors"}
ENCODER_DOWNLOAD = ["models/image_encoder/config.json", "models/image_encoder/model.safetensors"]
# REPO's files as published: (sha256, size in bytes). The encoder's sha256 (its Git LFS pointer) is checked
# whatever the server states; the others are checked against what the server states (drp/download.py).
# The sizes say how big a download is before it starts: the encoder's is its LFS pointer's; the adapters'
# are the safetensors layout of their manifests' fp16 tensors (36 and 83 of them, tests/data/manifests),
# the 44.6 and 98.2 MB Hugging Face lists; config.json is the published file of 560 bytes.
PINNED = {"models/ip-adapter_sd15.safetensors": (None, 44_642_768),
          "models/ip-adapter-plus_sd15.safetensors": (None, 98_183_288),
          "models/image_encoder/config.json": (None, 560),
          "models/image_encoder/model.safetensors":
              ("6ca9667da1ca9e0b0f75e46bb030f7e011f44f86cbfb8d5a36590fcd7507b030", 2_528_373_448)}
WHAT = {"models/ip-adapter_sd15.safetensors": "IP-Adapter ip-adapter_sd15",
        "models/ip-adapter-plus_sd15.safetensors": "IP-Adapter ip-adapter-plus_sd15",
        "models/image_encoder/config.json": "its image encoder's config (CLIP ViT-H/14)",
        "models/image_encoder/model.safetensors": "its image encoder (CLIP ViT-H/14)"}
ELSEWHERE = f"set {URL_ENV} (convert_weights.py: --ip-adapter-url) to another address of h94/IP-Adapter's files"
GET_ADAPTER = "get SD 1.5's with `python convert_weights.py --download ip-adapter`"


def component_of(src):
    """"ip-adapter", "image-encoder", or None (then it is an SD checkpoint) for the path `src`."""
    src = Path(src)
    if src.is_dir():
        try:
            config = json.loads((src / "config.json").read_text())
        except (OSError, ValueError):
            return None
        is_clip = isinstance(config, dict) and config.get("model_type") in ("clip_vision_model", "clip")
        return "image-encoder" if is_clip else None
    if not src.is_file() or src.stat().st_size > 2**30:  # IP-Adapter files are 44-200 MB, SD files ≥ 2 GB
        return None
    keys = open_tensors(src).shapes
    return "ip-adapter" if any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys) else None


def unet_config_of(out):
    """The UNet the adapter must fit: the converted one in `out`, else SD 1.5's."""
    try:
        return UNetConfig(**json.loads((Path(out) / "model.json").read_text())["unet"])
    except (OSError, ValueError, KeyError, TypeError):
        return UNetConfig()


# ---- planning: which kind, which config, the bijection -------------------------------------------

def refuse_other_adapters(shapes, name):
    """DrpError with one sentence for adapters that are not SD 1.5's base/light/plus."""
    widths = {s[1] for k, s in shapes.items() if k.endswith("to_k_ip.weight") and len(s) == 2}
    if widths & {1024, 2048}:
        model = "SDXL" if 2048 in widths else "Stable Diffusion 2.x"
        raise DrpError(f"{name} is an IP-Adapter for {model} (image keys {max(widths)} wide); drp implements "
                       "SD 1.x only, so convert an SD 1.5 adapter such as ip-adapter_sd15.safetensors.")
    keys = list(shapes)
    if any("perceiver_resampler" in k or "lora" in k for k in keys) or (
            "image_proj.proj.0.weight" in shapes and "image_proj.norm.weight" in shapes):
        raise DrpError(f"{name} is an IP-Adapter FaceID file, which needs a face-recognition model drp does not "
                       "have; convert ip-adapter_sd15 or ip-adapter-plus_sd15 instead.")
    if "image_proj.proj.3.weight" in shapes:
        raise DrpError(f"{name} is the full-face IP-Adapter (257 image tokens), which drp does not implement; "
                       "convert ip-adapter_sd15 or ip-adapter-plus_sd15 instead.")
    if "image_proj.proj.weight" not in shapes and "image_proj.latents" not in shapes:
        raise DrpError(f"{name} is not an IP-Adapter file (no image_proj.proj or image_proj.latents); "
                       "convert ip-adapter_sd15 or ip-adapter-plus_sd15 from h94/IP-Adapter.")


def adapter_config(shapes, unet_cfg, name):
    """The IPAdapterConfig a key/shape table describes, for the UNet of `unet_cfg`."""
    try:
        if "image_proj.proj.weight" in shapes:  # base / light
            context = shapes["image_proj.norm.weight"][0]
            out_dim, image_dim = shapes["image_proj.proj.weight"]
            extra = dict(kind="base", num_tokens=out_dim // context, image_dim=image_dim)
        else:  # plus: the Resampler
            context = shapes["image_proj.proj_out.weight"][0]
            _, tokens, dim = shapes["image_proj.latents"]
            depth = len({k.split(".")[2] for k in shapes if re.match(r"image_proj\.layers\.\d+\.", k)})
            extra = dict(kind="plus", num_tokens=tokens, image_dim=shapes["image_proj.proj_in.weight"][1], dim=dim,
                         depth=depth, heads=shapes["image_proj.layers.0.0.to_q.weight"][0] // 64,
                         ff_mult=shapes["image_proj.layers.0.1.1.weight"][0] // dim)
    except KeyError as e:
        raise DrpError(f"{name} lacks the IP-Adapter tensor {e}; download the file again.") from None
    except (ValueError, IndexError):  # a tensor of another rank than the layout's
        raise DrpError(f"{name} holds an image projection tensor of an unexpected shape; download the file "
                       "again.") from None
    if context != unet_cfg.context_dim:
        raise DrpError(f"{name} makes {context}-wide image tokens but the UNet's cross-attention reads "
                       f"{unet_cfg.context_dim}-wide ones; convert an adapter made for this model.")
    return IPAdapterConfig(context_dim=context, layers=tuple(attn2_layers(unet_cfg).items()), **extra)


def bijection(shapes, targets, rename, ignored, name):
    """{our key: Move}; DrpError naming the first missing/unexpected/mis-shaped key unless a bijection."""
    moves, unexpected, mismatched = {}, [], {}
    for key in sorted(shapes):
        if key in ignored:
            continue
        ours = rename(key)
        if ours not in targets or ours in moves or ours in mismatched:
            unexpected.append(key)
        elif tuple(shapes[key]) != targets[ours]:
            mismatched[ours] = f"{key} {list(shapes[key])} for {list(targets[ours])}"
        else:
            moves[ours] = Move(key, None, targets[ours])
    missing = [k for k in targets if k not in moves and k not in mismatched]
    mismatched = list(mismatched.values())
    if missing or unexpected or mismatched:
        first = [(what, items) for what, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if items]
        what, items = first[0]
        raise DrpError(f"{name} does not fit the expected model ({what}: {items[0]}"
                       f"{f' and {len(items) - 1} more' if len(items) > 1 else ''}); "
                       "give an unmodified file of the model.")
    return moves


def plan_adapter(shapes, unet_cfg=UNetConfig(), name="IP-Adapter file"):
    """(config, {our key: Move}) for an IP-Adapter's key/shape table, proven a bijection."""
    refuse_other_adapters(shapes, name)
    cfg = adapter_config(shapes, unet_cfg, name)
    numbered = file_index([layer for layer, _ in cfg.layers])  # {i: attn2 name}

    def rename(key):  # ip_adapter.<i>.to_k_ip.weight -> ip_adapter.<attn2 name>.to_k_ip.weight
        m = re.fullmatch(r"ip_adapter\.(\d+)\.(.+)", key)
        return f"ip_adapter.{numbered[int(m[1])]}.{m[2]}" if m and int(m[1]) in numbered else key

    targets = {k: tuple(t.shape) for k, t in build_module_on_meta(IPAdapter, cfg).state_dict().items()}
    return cfg, bijection(shapes, targets, rename, (), name)


def encoder_config(config, name, adapter=None):
    """Our VisionConfig of a transformers config.json; DrpError unless SD 1.5's adapters can read it.

    What must fit is the adapter in the folder (the width of image_embeds for base, of the hidden
    states for plus), else ViT-H/14, the encoder all SD 1.5 IP-Adapters were trained with.
    """
    from .vision import VisionConfig

    vision = config.get("vision_config", config)  # a full CLIPModel config nests it
    if vision.get("hidden_act", "gelu") != "gelu":
        raise DrpError(f"{name} is an image encoder with {vision['hidden_act']} (an OpenAI CLIP), not the "
                       "OpenCLIP ViT-H/14 of SD 1.5's IP-Adapters; convert h94/IP-Adapter's models/image_encoder.")
    if adapter is not None:
        width = vision.get("projection_dim") if adapter.kind == "base" else vision.get("hidden_size")
        if width != adapter.image_dim:
            raise DrpError(f"{name} gives {width}-wide features but the {adapter.kind} IP-Adapter in the folder "
                           f"reads {adapter.image_dim}-wide ones; convert h94/IP-Adapter's models/image_encoder.")
    elif any(vision.get(k) != v for k, v in VIT_H14.items()):
        got = ", ".join(f"{k} {vision.get(k)}" for k in VIT_H14)
        raise DrpError(f"{name} is not the ViT-H/14 image encoder SD 1.5's IP-Adapters use ({got}; ViT-H/14 has "
                       f"1280, 1024, 32, 14); convert h94/IP-Adapter's models/image_encoder.")
    return VisionConfig.from_transformers(vision)


def plan_encoder(shapes, cfg, name="image encoder"):
    from .vision import IGNORED, VisionTransformer

    targets = {k: tuple(t.shape) for k, t in build_module_on_meta(VisionTransformer, cfg).state_dict().items()}
    return bijection(shapes, targets, lambda key: key, IGNORED, name)


def read_adapter_config(out):
    """The IPAdapterConfig converted into `out`, or None."""
    try:
        return IPAdapterConfig(**json.loads((Path(out) / ADAPTER[1]).read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- writing -------------------------------------------------------------------------------------

def check_can_add(out, files, force, what):
    existing = [f for f in files if (Path(out) / f).exists()]
    if existing and not force:
        raise DrpError(f"{out} already holds a converted {what} ({', '.join(existing)}); "
                       "pass --force (force=True) to replace it.")


def write_component(out, files, moves, read, dtype, info, progress):
    """Writes `files` = (weights, json) into `out` through temporary files; the JSON appears last."""
    out.mkdir(parents=True, exist_ok=True)
    weights, meta = (out / f for f in files)
    temps = {p: p.with_name(p.name + ".tmp") for p in (weights, meta)}
    try:
        with tqdm(total=len(moves), unit="tensor", desc="converting", disable=not progress) as bar:
            write_safetensors(temps[weights], moves, read, OUT_DTYPES[dtype], bar)
        temps[meta].write_text(json.dumps(info, indent=2) + "\n")
        meta.unlink(missing_ok=True)  # a crash between the renames leaves no JSON: the component is absent
        os.replace(temps[weights], weights)
        os.replace(temps[meta], meta)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    return [weights, meta]


def convert_adapter(src, out, dtype="fp16", force=False, progress=True):
    """An IP-Adapter file -> `out`/ip_adapter.safetensors + ip_adapter.json; returns the paths written."""
    src, out = Path(src), Path(out)
    check_can_add(out, ADAPTER, force, "IP-Adapter")
    source = open_tensors(src)
    cfg, moves = plan_adapter(source.shapes, unet_config_of(out), str(src))
    encoder = out / ENCODER[1]
    if encoder.is_file():  # the encoder already there must be able to feed this adapter
        try:
            transformers_config = json.loads(encoder.read_text())["transformers_config"]
        except (ValueError, KeyError, TypeError):
            raise DrpError(f"{encoder} was not written by this version of drp; convert the image encoder "
                           "again with --force.") from None
        encoder_config(transformers_config, str(encoder), cfg)
    info = {"format": FORMAT, "config": asdict(cfg),
            "source": {"file": src.name, "kind": cfg.kind, "sha256": sha256_of([src], progress), "dtype": dtype}}
    return write_component(out, ADAPTER, moves, source.read, dtype, info, progress)


def find_encoder_file(folder):
    for name in ENCODER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise DrpError(f"{folder} has no weights file ({ENCODER_FILES[0]} or a variant); give the complete "
                   "image_encoder folder.")


def convert_encoder(src, out, dtype="fp16", force=False, progress=True):
    """An image-encoder folder -> `out`/image_encoder.safetensors + image_encoder.json; returns the paths."""
    src, out = Path(src), Path(out)
    check_can_add(out, ENCODER, force, "image encoder")
    config = json.loads((src / "config.json").read_text())
    cfg = encoder_config(config, str(src), read_adapter_config(out))
    path = find_encoder_file(src)
    source = open_tensors(path)
    moves = plan_encoder(source.shapes, cfg, str(path))
    info = {"format": FORMAT, "config": asdict(cfg), "transformers_config": config.get("vision_config", config),
            "source": {"file": f"{src.name}/{path.name}", "sha256": sha256_of([path], progress), "dtype": dtype}}
    return write_component(out, ENCODER, moves, source.read, dtype, info, progress)


def convert_component(src, out, dtype="fp16", force=False, progress=True):
    """The paths written if `src` is an IP-Adapter file or image-encoder folder, else None.

    Called by drp/convert.py `convert`, which has checked `dtype` and that `src` exists.
    """
    kind = component_of(src)
    if kind == "ip-adapter":
        return convert_adapter(src, out, dtype, force, progress)
    if kind == "image-encoder":
        return convert_encoder(src, out, dtype, force, progress)
    return None


def ip_adapter_url(url=None):
    """The base address of h94/IP-Adapter's files: `url` (--ip-adapter-url), else $DRP_IP_ADAPTER_URL, else REPO."""
    base = url or os.environ.get(URL_ENV) or REPO
    return base if base.endswith("/") else base + "/"


def components_due(out, force=False):
    """Which components a download into `out` converts: the adapter unless converted (or `force`), and the
    encoder unless converted (one encoder serves base and plus, so it is never fetched again)."""
    out = Path(out)
    return {"ip_adapter": force or not (out / ADAPTER[1]).is_file(), "image_encoder": not (out / ENCODER[1]).is_file()}


def planned_downloads(which, out, base_url=None, force=False):
    """The drp.download.Planned files a download of `which` into `out` fetches, kept in `out`/h94-IP-Adapter/.

    REPO's files carry their pins; another base address (`base_url`, $DRP_IP_ADAPTER_URL) has none, so
    its files are checked against what its server states, as for the SD checkpoint's --url.
    """
    if which not in DOWNLOADS:
        raise DrpError(f"download {which!r} is not offered; choose {' or '.join(DOWNLOADS)}.")
    base, todo = ip_adapter_url(base_url), components_due(out, force)
    files = ([DOWNLOADS[which]] if todo["ip_adapter"] else []) + (ENCODER_DOWNLOAD if todo["image_encoder"] else [])
    pins = {f: PINNED[f] if base == REPO else (None, None) for f in files}
    return [Planned(WHAT[f], base + f, Path(out) / KEEP / f, *pins[f], ELSEWHERE) for f in files]


def unfinished(out):
    """Whether a download of ip-adapter_sd15 into `out` (sample.py's first run, `--download ip-adapter`)
    stopped before both components were converted: its file, or its `.part`, is there and one is missing."""
    out = Path(out)
    kept = out / KEEP / DOWNLOADS["ip-adapter"]
    return any(components_due(out).values()) and (kept.is_file() or kept.with_name(kept.name + ".part").is_file())


def convert_downloads(which, out, dtype="fp16", force=False, progress=True):
    """Converts what `planned_downloads(which, out, …, force)` fetched into `out`; returns the paths written.

    The adapter goes first, so that the encoder is checked against it (`encoder_config`).
    """
    out, todo = Path(out), components_due(out, force)
    written = []
    if todo["ip_adapter"]:
        written += convert_adapter(out / KEEP / DOWNLOADS[which], out, dtype, force, progress)
    if todo["image_encoder"]:  # force: an encoder's weights without their JSON are a crashed write, not a choice
        written += convert_encoder((out / KEEP / ENCODER_DOWNLOAD[1]).parent, out, dtype, True, progress)
    return written


def download_and_convert(which, out, dtype="fp16", force=False, progress=True, base_url=None):
    """`convert_weights.py --download ip-adapter|ip-adapter-plus`: fetch from h94/IP-Adapter (or `base_url`,
    $DRP_IP_ADAPTER_URL), then convert; returns the paths written.

    Every file is fetched before any is converted, so a refused download leaves the folder as it was; the
    2.5 GB encoder is fetched only when the folder does not hold a converted one yet.
    """
    if which not in DOWNLOADS or dtype not in OUT_DTYPES:
        raise DrpError(f"download {which!r} as {dtype!r} is not offered; choose {' or '.join(DOWNLOADS)} "
                       "as fp16 or fp32.")
    check_can_add(out, ADAPTER, force, "IP-Adapter")  # before, not after, the download
    for planned in planned_downloads(which, out, base_url, force):
        fetch(planned, progress=progress)
    return convert_downloads(which, out, dtype, force, progress)
