"""Converting a public SD 1.x checkpoint into drp's weights folder (what `convert_weights.py` runs).

Two layouts are read:
  * the original single file (`v1-5-pruned-emaonly.safetensors` / `.ckpt`): the `state_dict` of
    CompVis `LatentDiffusion`, UNet under `model.diffusion_model.`, VAE under `first_stage_model.`,
    CLIP under `cond_stage_model.transformer.`; renamed by the declarative maps of drp/keymaps.py
    (https://github.com/CompVis/stable-diffusion/blob/main/ldm/models/diffusion/ddpm.py);
  * the diffusers folder (`unet/`, `vae/`, `text_encoder/`): already our names.

Before a byte is written the conversion is *planned* on shapes alone and proven a bijection: every
parameter of our models (built on the meta device) is filled exactly once, every source tensor is
used or on the declared ignore list, and every shape agrees after the declared transforms. Then
each model is written tensor by tensor into a temporary file, and the finished set replaces the old
one with `os.replace`, so an interrupted conversion leaves nothing half-written.

Checkpoints are never unpickled with arbitrary code: `.ckpt`/`.bin` go through drp/torch_files.py
(`torch.load(weights_only=True)`; plain pickles are refused unread), `.safetensors` through `safe_open`
(lazily, one tensor at a time).
"""

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from . import keymaps
from .clip import CLIPConfig
from .errors import DrpError
from .model_io import FILE_DTYPES, FORMAT, MODELS, build_on_meta
from .torch_files import kind_of, read_state_dict
from .unet import UNetConfig
from .vae import VAEConfig

OUT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
SAFETENSORS_DTYPES = {dtype: name for name, dtype in FILE_DTYPES.items()}  # what drp.load reads back
# Weight files of a diffusers folder, best first: the plain file, then the `.fp16.` variant.
FOLDER_FILES = {
    "unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"],
    "text_encoder": ["model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"],
}
FOLDER_FILES["vae"] = FOLDER_FILES["unet"]
SD1_ONLY = "drp implements SD 1.x only, so convert an SD 1.4/1.5 checkpoint instead"


class Move(NamedTuple):
    """Where one of our parameters comes from."""

    source: str  # key in the source file
    transform: Optional[Callable]  # declared reshaping (keymaps.conv1x1_to_linear) or None
    shape: tuple  # our shape, checked after the transform


@dataclass
class Source:
    """Read access to a checkpoint's tensors: shapes up front, data one tensor at a time."""

    shapes: dict  # key -> shape tuple
    read: Callable  # key -> tensor


@dataclass
class Plan:
    """A proven conversion: configs and, per model, our key -> Move."""

    layout: str  # "single-file" | "diffusers"
    configs: dict
    moves: dict
    ignored: list = field(default_factory=list)


# ---- reading -----------------------------------------------------------------------------------

def open_tensors(path):
    """A Source for a single checkpoint file, telling the file kinds apart by their first bytes."""
    path = Path(path)
    if not path.is_file():
        raise DrpError(f"{path} does not exist; give the path of an SD 1.x checkpoint file or diffusers folder.")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise DrpError(f"{path} cannot be read ({e.strerror or e}); check the path and its permissions.") from None
    size = path.stat().st_size
    # safetensors: an 8-byte little-endian header length, then the JSON header
    is_safetensors = len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size
    if is_safetensors:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except SafetensorError as e:
            # 0x80 starts a pickle (torch.save's legacy format), whose bytes can pass the test above; but it is
            # also the first byte of a safetensors file whose header length is 128 more than a multiple of 256:
            # only bytes that decode as a pickle go on to torch_files, the others are a damaged safetensors file
            if head[:1] != b"\x80" or kind_of(path) is None:
                raise DrpError(f"{path} is a truncated or damaged safetensors file ({e}); download it again.") from None
        else:
            return Source(shapes, handle.get_tensor)
    return _open_torch(path)  # torch.save's zip or legacy format; anything else is refused there


def _open_torch(path):
    obj = read_state_dict(path)
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning wraps it, maybe twice
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise DrpError(f"{path} holds a {type(obj).__name__}, not a state dict; give an SD 1.x checkpoint.")
    tensors = {}

    def flatten(d, prefix):  # nested dicts (as in textual-inversion files) become dotted keys
        for k, v in d.items():
            if isinstance(v, dict):
                flatten(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                tensors[f"{prefix}{k}"] = v

    flatten(obj, "")
    return Source({k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__)


def refuse_other_kinds(shapes, name):
    """Raises DrpError with one sentence if `shapes` is a checkpoint of some other kind than SD 1.x."""
    keys = list(shapes)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("string_to_param") or has("emb_params"):
        raise DrpError(f"{name} is a textual-inversion embedding, not a model; {SD1_ONLY}.")
    if any(part.startswith("lora") for k in keys for part in k.split(".")):
        raise DrpError(f"{name} is a LoRA (low-rank adapter), not a full model; {SD1_ONLY}.")
    if has("conditioner.embedders."):
        raise DrpError(f"{name} is an SDXL checkpoint; {SD1_ONLY}.")
    if has("cond_stage_model.model."):
        raise DrpError(f"{name} is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); {SD1_ONLY}.")
    if not has(keymaps.UNET):
        if has(keymaps.VAE) or has("encoder.conv_in.") or has("decoder.conv_in."):
            raise DrpError(f"{name} holds only a VAE, not a full model; {SD1_ONLY}.")
        raise DrpError(f"{name} is not a Stable Diffusion checkpoint (it has no model.diffusion_model.* tensors); "
                       f"{SD1_ONLY}.")
    refuse_unet_variants(
        in_channels=shapes.get(keymaps.UNET + "input_blocks.0.0.weight", (0, 4))[1],
        context_dim=max((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), default=768),
        linear_proj=any(len(s) == 2 for k, s in shapes.items() if k.endswith(".proj_in.weight")),
        name=name,
    )


def refuse_unet_variants(in_channels, context_dim, linear_proj, name):
    if context_dim == 1024 or linear_proj:  # SD 2.x: OpenCLIP-H width, linear proj_in/proj_out
        raise DrpError(f"{name} is a Stable Diffusion 2.x checkpoint (1024-wide text conditioning); {SD1_ONLY}.")
    if in_channels != 4:  # 4 latent channels, plus a masked image and a mask (9) or an image (8)
        kind = {9: "an inpainting", 8: "an InstructPix2Pix"}.get(in_channels, f"a {in_channels}-channel")
        raise DrpError(f"{name} is {kind} UNet ({in_channels} input channels instead of 4); {SD1_ONLY}.")


# ---- configs of a folder -------------------------------------------------------------------------

def folder_configs(folder):
    """UNet, VAE and CLIP configs of a diffusers folder from its config.json files."""
    raw = {}
    for component in MODELS:
        path = folder / component / "config.json"
        try:
            raw[component] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DrpError(f"{path} is missing or not JSON ({e}); a diffusers folder needs it.") from None
    u, v, t = raw["unet"], raw["vae"], raw["text_encoder"]
    if u.get("addition_embed_type") == "text_time":
        raise DrpError(f"{folder} is an SDXL folder; {SD1_ONLY}.")
    heads = u.get("num_attention_heads") or u.get("attention_head_dim", 8)  # SD 1.x's "head dim" is the count
    if isinstance(heads, list):
        if len(set(heads)) != 1:
            raise DrpError(f"{folder} is a Stable Diffusion 2.x folder (heads {heads}); {SD1_ONLY}.")
        heads = heads[0]
    refuse_unet_variants(u.get("in_channels", 4), u.get("cross_attention_dim", 768),
                         bool(u.get("use_linear_projection")), str(folder))
    if t.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise DrpError(f"{folder}'s text encoder uses {t['hidden_act']}, not CLIP ViT-L/14's quick_gelu; {SD1_ONLY}.")
    try:
        return {
            "unet": UNetConfig(
                in_channels=u.get("in_channels", 4), out_channels=u.get("out_channels", 4),
                channels=tuple(u["block_out_channels"]), layers_per_block=u.get("layers_per_block", 2),
                heads=heads, context_dim=u.get("cross_attention_dim", 768), groups=u.get("norm_num_groups", 32),
                attn_levels=tuple(b.startswith("CrossAttn") for b in u["down_block_types"]),
            ),
            "vae": VAEConfig(
                in_channels=v.get("in_channels", 3), latent_channels=v.get("latent_channels", 4),
                channels=tuple(v["block_out_channels"]), layers_per_block=v.get("layers_per_block", 2),
                groups=v.get("norm_num_groups", 32),
            ),
            "text_encoder": CLIPConfig(
                vocab_size=t["vocab_size"], max_len=t["max_position_embeddings"], dim=t["hidden_size"],
                layers=t["num_hidden_layers"], heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
            ),
        }
    except KeyError as e:
        raise DrpError(f"a config.json in {folder} lacks {e}; a diffusers SD 1.x folder states it.") from None


# ---- planning: the bijection -------------------------------------------------------------------

@lru_cache(maxsize=None)
def target_shapes(component, cfg):
    """Our parameter names and shapes, from the model built on the meta device."""
    return {k: tuple(t.shape) for k, t in build_on_meta(component, cfg).state_dict().items()}


def connect(shapes, rules, configs, name):
    """Moves for each model from one key/shape table; DrpError unless it is a bijection.

    `rules` maps each model to its prefix map; a source key is claimed by the model whose map matches.
    """
    moves = {component: {} for component in rules}
    unexpected, mismatched, ignored = [], [], []
    targets = {component: target_shapes(component, configs[component]) for component in rules}
    for key in sorted(shapes):
        if keymaps.is_ignored(key):
            ignored.append(key)
            continue
        for component, table in rules.items():
            hit = keymaps.rename(key, table)
            if hit is not None:
                break
        else:
            unexpected.append(key)
            continue
        ours, transform = hit
        want = targets[component].get(ours)
        if want is None or ours in moves[component]:  # no such parameter, or a second source for it
            unexpected.append(key)
            continue
        stand_in = torch.empty(shapes[key], device="meta")  # shapes only: the transform costs nothing
        got = tuple((transform(stand_in) if transform else stand_in).shape)
        if got != want:
            mismatched.append(f"{key} {list(got)} for {ours} {list(want)}")
        moves[component][ours] = Move(key, transform, want)
    missing = [f"{c}:{k}" for c in rules for k in targets[c] if k not in moves[c]]
    if missing or unexpected or mismatched:
        def first(items):
            return "none" if not items else items[0] + (f" and {len(items) - 1} more" if len(items) > 1 else "")

        raise DrpError(f"{name} does not fit SD 1.x's models: missing {first(missing)}, unexpected "
                       f"{first(unexpected)}, wrong shape {first(mismatched)}; convert an SD 1.4/1.5 checkpoint.")
    return moves, ignored


def plan_single_file(shapes, name="checkpoint"):
    """The proven conversion of an original single-file checkpoint, from its key/shape table."""
    refuse_other_kinds(shapes, name)
    configs = keymaps.infer_configs(shapes, name)
    rules = {"unet": keymaps.unet_rules(configs["unet"]), "vae": keymaps.vae_rules(configs["vae"]),
             "text_encoder": keymaps.clip_rules(configs["text_encoder"])}
    moves, ignored = connect(shapes, rules, configs, name)
    return Plan("single-file", configs, moves, ignored)


def plan_folder(shapes, configs, name="folder"):
    """The proven conversion of a diffusers folder: `shapes` = {model: {key: shape}} of its three files."""
    moves, ignored = {}, []
    for component, table in shapes.items():
        rules = {component: keymaps.folder_rules(component, target_shapes(component, configs[component]))}
        m, i = connect(table, rules, configs, f"{name}/{component}")
        moves.update(m)
        ignored += i
    return Plan("diffusers", configs, moves, ignored)


def find_folder_file(folder, component):
    for candidate in FOLDER_FILES[component]:
        if (folder / component / candidate).is_file():
            return folder / component / candidate
    raise DrpError(f"{folder / component} has no weights file ({FOLDER_FILES[component][0]} or a variant); "
                   "give a complete diffusers SD 1.x folder.")


# ---- writing -----------------------------------------------------------------------------------

def write_safetensors(path, moves, read, dtype, bar=None):
    """Writes a safetensors file one tensor at a time: header from the plan, then each tensor's bytes."""
    keys = sorted(moves)
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key in keys:
        n = itemsize * int(torch.Size(moves[key].shape).numel())
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(moves[key].shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes so tensor data stays aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key in keys:
            move = moves[key]
            t = read(move.source)
            t = (move.transform(t) if move.transform else t).to(dtype).contiguous()
            f.write(memoryview(t.numpy()).cast("B"))
            if bar is not None:
                bar.update()
        f.flush()
        os.fsync(f.fileno())


def sha256_of(files, progress):
    """sha256 of the files' bytes, read one after another."""
    digest = hashlib.sha256()
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256", disable=not progress) as bar:
        for path in files:
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    bar.update(len(block))
    return digest.hexdigest()


def output_paths(out):
    return [out / MODELS[c][2] for c in MODELS] + [out / "model.json"]


def check_can_write(out, force):
    """The output paths in `out`; DrpError if a converted set is there and `force` is not given."""
    outputs = output_paths(Path(out))
    existing = [p.name for p in outputs if p.exists()]
    if existing and not force:
        raise DrpError(f"{out} already holds converted weights ({', '.join(existing)}); "
                       "pass --force (force=True) to replace them.")
    return outputs


def convert(src, out="weights", dtype="fp16", force=False, progress=True):
    """Converts the checkpoint file or diffusers folder `src` into `out`; returns the paths written.

    An IP-Adapter file or image-encoder folder is added to `out` instead (drp/convert_ip_adapter.py).
    """
    src, out = Path(src), Path(out)
    if dtype not in OUT_DTYPES:
        raise DrpError(f"unknown output dtype {dtype!r}; choose fp16 or fp32.")
    if not src.exists():
        raise DrpError(f"{src} does not exist; give the path of an SD 1.x checkpoint file or diffusers folder.")
    from .convert_ip_adapter import convert_component  # IP-Adapter's files are added next to the SD weights

    added = convert_component(src, out, dtype, force, progress)
    if added is not None:
        return added
    outputs = check_can_write(out, force)
    if src.is_dir():
        if (src / "model.json").is_file() and (src / "unet.safetensors").is_file():
            raise DrpError(f"{src} is already a converted drp weights folder; load it with drp.load({str(src)!r}).")
        files = {c: find_folder_file(src, c) for c in MODELS}
        sources = {c: open_tensors(f) for c, f in files.items()}
        plan = plan_folder({c: s.shapes for c, s in sources.items()}, folder_configs(src), str(src))
    else:
        source = open_tensors(src)
        files = {"single": src}
        sources = {c: source for c in MODELS}
        plan = plan_single_file(source.shapes, str(src))

    out.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT,
        **{c: asdict(plan.configs[c]) for c in MODELS},
        "source": {"file": src.name, "layout": plan.layout,
                   "sha256": sha256_of(list(files.values()), progress), "dtype": dtype},
    }
    if plan.layout == "diffusers":
        info["source"]["sha256_of"] = "the concatenated bytes of " + ", ".join(
            str(f.relative_to(src)) for f in files.values())

    temps = {p: p.with_name(p.name + ".tmp") for p in outputs}
    try:
        total = sum(len(m) for m in plan.moves.values())
        with tqdm(total=total, unit="tensor", desc="converting", disable=not progress) as bar:
            for c in MODELS:
                write_safetensors(temps[out / MODELS[c][2]], plan.moves[c], sources[c].read, OUT_DTYPES[dtype], bar)
        temps[out / "model.json"].write_text(json.dumps(info, indent=2) + "\n")
        # All written: retire the old set's model.json first, so a crash while renaming leaves a set
        # that drp.load reports as incomplete rather than a mix of old and new files.
        (out / "model.json").unlink(missing_ok=True)
        for final, temp in temps.items():
            os.replace(temp, final)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    return outputs
