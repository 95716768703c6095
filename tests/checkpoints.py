"""Random checkpoints in the real SD 1.x layouts, for the conversion and loading tests (and any other).

* `tiny_models` / `reference_models`: our three models, or diffusers' `UNet2DConditionModel`,
  `AutoencoderKL` and transformers' `CLIPTextModel`, at the tiny configs with seeded random weights.
* `to_single_file`: a state dict in our (= diffusers file) names -> the original single-file layout,
  through the inverse of drp/keymaps.py's maps, with the schedule buffers and `position_ids` added.
* `tiny_checkpoint`, `save_checkpoint`, `write_diffusers_folder`: files as users have them.
* `random_ldm_checkpoint`: a full-size random checkpoint with the keys and shapes of a manifest.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from drp import keymaps
from drp.clip import CLIPConfig, CLIPTextModel
from drp.unet import UNet, UNetConfig
from drp.vae import VAE, VAEConfig

TINY = {"unet": UNetConfig.tiny(), "vae": VAEConfig.tiny(), "text_encoder": CLIPConfig.tiny()}
OURS = {"unet": UNet, "vae": VAE, "text_encoder": CLIPTextModel}
LEGACY_VAE_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def random_like(key, shape, generator, dtype=torch.float32):
    """Distinct random values of a sensible size: N(0, 1/fan_in) weights, norms near 1, small biases."""
    if len(shape) >= 2:
        fan_in = int(torch.Size(shape[1:]).numel())
        t = torch.randn(shape, generator=generator) / fan_in ** 0.5
    elif key.endswith("weight"):  # 1-D weights are norm scales
        t = 1 + 0.1 * torch.randn(shape, generator=generator)
    else:
        t = 0.1 * torch.randn(shape, generator=generator)
    return t.to(dtype)


def randomize_(model, seed):
    """Gives every parameter of `model` new seeded random values (no zero-initialised layer stays)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(random_like(name, tuple(p.shape), g))
    return model


def tiny_models(seed=0, configs=TINY):
    """Our UNet, VAE and CLIPTextModel at `configs`, random, in eval mode."""
    return {c: randomize_(OURS[c](configs[c]), seed + i).eval() for i, c in enumerate(OURS)}


def diffusers_unet_config(cfg):
    levels = len(cfg.channels)
    return dict(
        sample_size=8, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=list(cfg.channels), layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.heads, cross_attention_dim=cfg.context_dim, norm_num_groups=cfg.groups,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attn_levels][:levels],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attn_levels)][:levels],
    )


def diffusers_vae_config(cfg):
    levels = len(cfg.channels)
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels, latent_channels=cfg.latent_channels,
        block_out_channels=list(cfg.channels), layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.groups, down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
    )


def transformers_clip_config(cfg):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_len, hidden_size=cfg.dim,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_dim,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
    )


def reference_models(seed=0, configs=TINY):
    """diffusers/transformers models at `configs`, random, in eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel as ReferenceCLIP

    models = {
        "unet": UNet2DConditionModel(**diffusers_unet_config(configs["unet"])),
        "vae": AutoencoderKL(**diffusers_vae_config(configs["vae"])),
        "text_encoder": ReferenceCLIP(transformers_clip_config(configs["text_encoder"])),
    }
    return {c: randomize_(m, seed + i).eval() for i, (c, m) in enumerate(models.items())}


def file_state_dict(component, model):
    """A model's tensors under the names of our files (CLIP: with `text_model.`, no position_ids)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if component == "text_encoder":
        sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
    return sd


def to_single_file(state_dicts, configs=TINY, extras=True):
    """{component: our state dict} -> one state dict in the original single-file layout."""
    rules = {"unet": keymaps.unet_rules(configs["unet"]), "vae": keymaps.vae_rules(configs["vae"]),
             "text_encoder": keymaps.clip_rules(configs["text_encoder"])}
    ldm = {}
    for component, sd in state_dicts.items():
        inverse = {ours: (src, transform) for src, (ours, transform) in rules[component].items()}
        for key, t in sd.items():
            prefix = keymaps.longest_prefix(key, inverse)
            assert prefix is not None, f"no single-file name for {component}:{key}"
            src, transform = inverse[prefix]
            if transform is keymaps.conv1x1_to_linear:
                t = t[:, :, None, None]  # the original holds these linears as 1×1 convolutions
            ldm[src + key[len(prefix):]] = t.contiguous()
    if extras:  # what a real file carries besides the models
        g = torch.Generator().manual_seed(1234)
        for name in sorted(keymaps.SCHEDULE_BUFFERS):
            ldm[name] = torch.rand(1000, generator=g)
        ldm[keymaps.CLIP + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return ldm


def ema_keys(ldm, seed=99):
    """The `model_ema.*` entries of a training checkpoint: a dot-less copy of each UNet key, other values."""
    g = torch.Generator().manual_seed(seed)
    ema = {"model_ema." + k[len("model."):].replace(".", ""): torch.randn(v.shape, generator=g).to(v.dtype)
           for k, v in ldm.items() if k.startswith(keymaps.UNET)}
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return ema


def save_checkpoint(path, sd, wrap=True):
    """`.safetensors` (flat) or `.ckpt`/`.pt` (torch.save, inside {"state_dict": ...} when `wrap`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 840000} if wrap else sd, path)
    return path


def tiny_checkpoint(path, seed=0, dtype=torch.float32):
    """Writes a tiny random SD 1.x single-file checkpoint (of our tiny models) at `path`; returns `path`."""
    models = tiny_models(seed)
    ldm = to_single_file({c: file_state_dict(c, m) for c, m in models.items()})
    return save_checkpoint(path, {k: v.to(dtype) if v.is_floating_point() else v for k, v in ldm.items()})


def write_diffusers_folder(folder, models, vae_spelling="current", text_prefix=True, variant=None,
                           safe_serialization=True):
    """A diffusers folder written by the reference libraries' `save_pretrained`, then adjusted.

    vae_spelling "legacy" renames the mid-attention to query/key/value/proj_attn (the published SD 1.5
    file); text_prefix puts `text_model.` back (published files have it, transformers >= 5 drops it);
    variant "fp16" saves fp16 tensors under the `.fp16.` file names.
    """
    folder = Path(folder)
    for component, model in models.items():
        model.save_pretrained(folder / component, safe_serialization=safe_serialization, variant=variant)
    for component in models:
        for path in (folder / component).glob("*.safetensors"):
            sd = load_file(str(path))
            if component == "vae" and vae_spelling == "legacy":
                for new, old in LEGACY_VAE_ATTENTION.items():
                    sd = {k.replace(f"attentions.0.{new}.", f"attentions.0.{old}."): v for k, v in sd.items()}
            if component == "text_encoder" and text_prefix:
                sd = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}
                sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
            if variant == "fp16":
                sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
            if component == "text_encoder" and not safe_serialization:  # transformers 5 writes only safetensors
                path.unlink()
                torch.save(sd, path.with_name(path.name.replace("model", "pytorch_model").replace(".safetensors", ".bin")))
            else:
                save_file(sd, str(path))
    return folder


def random_ldm_checkpoint(shapes, dtype=torch.float16, seed=0):
    """A full-size random checkpoint: every key of `shapes` ({key: shape}), distinct seeded values each."""
    sd = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        if key.endswith("position_ids"):
            sd[key] = torch.arange(shape[-1])[None]
        else:
            sd[key] = random_like(key, shape, torch.Generator().manual_seed(seed * 100_000 + i), dtype)
    return sd
