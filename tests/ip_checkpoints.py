"""Random IP-Adapter files and image encoders in the h94/IP-Adapter layout, for the IP-Adapter tests.

* `adapter_config(kind)`: an IPAdapterConfig that fits the tiny UNet (tests/checkpoints.py TINY) and
  the tiny image encoder (drp.vision.VisionConfig.tiny(): image_embeds 32 wide, hidden states 64).
* `adapter_file(kind, seed)`: its tensors under the public file's names (`ip_adapter.<i>.to_k_ip.weight`),
  every value random, none zero or one.
* `save_adapter(path, tensors)`: `.safetensors` (flat) or `.bin` (torch.save of the nested dict).
* `reference_encoder(seed)`: transformers' CLIPVisionModelWithProjection at that tiny config, random.
* `write_h94_folder(folder, ...)`: models/ip-adapter_sd15.*, models/ip-adapter-plus_sd15.* and
  models/image_encoder/ as the repository has them.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoints import TINY, randomize_
from drp.ip_adapter import IPAdapter, IPAdapterConfig, attn2_layers, file_index
from drp.vision import VisionConfig

ENCODER = VisionConfig.tiny()
FILES = {"base": "ip-adapter_sd15", "plus": "ip-adapter-plus_sd15"}


def adapter_config(kind, unet_cfg=TINY["unet"]):
    layers = tuple(attn2_layers(unet_cfg).items())
    if kind == "base":
        return IPAdapterConfig(image_dim=ENCODER.projection_dim, context_dim=unet_cfg.context_dim, layers=layers)
    # diffusers reads the heads as to_q's rows / 64, so the Resampler keeps 64-wide heads: 2 of them
    return IPAdapterConfig.plus(image_dim=ENCODER.dim, context_dim=unet_cfg.context_dim, layers=layers,
                                dim=128, heads=2)


def to_file_names(state_dict, layer_names):
    """Our names -> the public file's: ip_adapter.<attn2 name>.x -> ip_adapter.<i>.x."""
    number = {name: i for i, name in file_index(layer_names).items()}
    renamed = {}
    for key, t in state_dict.items():
        if key.startswith("ip_adapter."):
            name, _, leaf = key[len("ip_adapter."):].rpartition(".to_")
            key = f"ip_adapter.{number[name]}.to_{leaf}"
        renamed[key] = t.detach().clone()
    return renamed


def adapter_file(kind, seed=0, unet_cfg=TINY["unet"]):
    cfg = adapter_config(kind, unet_cfg)
    adapter = randomize_(IPAdapter(cfg), seed)
    return to_file_names(adapter.state_dict(), adapter.layer_names)


def save_adapter(path, tensors):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        nested = {"image_proj": {}, "ip_adapter": {}}
        for key, t in tensors.items():
            part, _, rest = key.partition(".")
            nested[part][rest] = t
        torch.save(nested, path)
    return path


def transformers_encoder_config(cfg=ENCODER):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.layers,
                            num_attention_heads=cfg.heads, projection_dim=cfg.projection_dim,
                            image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="gelu",
                            layer_norm_eps=cfg.eps)


def reference_encoder(seed=0, cfg=ENCODER):
    from transformers import CLIPVisionModelWithProjection

    return randomize_(CLIPVisionModelWithProjection(transformers_encoder_config(cfg)), seed).eval()


def write_h94_folder(folder, encoder, seed=0, forms=(".safetensors", ".bin")):
    """The repository's `models/` folder: both adapters in the given forms, and the image encoder."""
    models = Path(folder) / "models"
    for i, (kind, name) in enumerate(FILES.items()):
        tensors = adapter_file(kind, seed + i)
        for form in forms:
            save_adapter(models / f"{name}{form}", tensors)
    encoder.save_pretrained(models / "image_encoder")
    return models
