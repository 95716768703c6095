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

The files are opened, written and hashed by drp/weight_files.py, which drp/convert_ip_adapter.py (an
IP-Adapter file or image encoder given as SRC) shares. Checkpoints are never unpickled with arbitrary
code: `.ckpt`/`.bin` go through drp/torch_files.py (`torch.load(weights_only=True)`; plain pickles are
refused unread), `.safetensors` through `safe_open` (lazily, one tensor at a time).
"""

import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from tqdm import tqdm

from . import keymaps
from .clip import CLIPConfig
from .convert_ip_adapter import convert_component
from .errors import DrpError
from .model_io import FORMAT, MODELS, build_on_meta
from .unet import UNetConfig
from .vae import VAEConfig
from .weight_files import OUT_DTYPES, Move, open_tensors, sha256_of, write_safetensors

# Weight files of a diffusers folder, best first: the plain file, then the `.fp16.` variant.
FOLDER_FILES = {
    "unet": ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"],
    "text_encoder": ["model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"],
}
FOLDER_FILES["vae"] = FOLDER_FILES["unet"]
SD1_ONLY = "drp implements SD 1.x only, so convert an SD 1.4/1.5 checkpoint instead"


@dataclass
class Plan:
    """A proven conversion: configs and, per model, our key -> Move."""

    layout: str  # "single-file" | "diffusers"
    configs: dict
    moves: dict
    ignored: list = field(default_factory=list)


# ---- what a checkpoint is ------------------------------------------------------------------------

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
    added = convert_component(src, out, dtype, force, progress)  # IP-Adapter's files go next to the SD weights
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
