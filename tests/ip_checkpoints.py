"""Random IP-Adapter files and image encoders in the h94/IP-Adapter layout, for the IP-Adapter tests.

* `adapter_config(kind)`: an IPAdapterConfig that fits the tiny UNet (tests/checkpoints.py TINY) and
  the tiny image encoder (drp.vision.VisionConfig.tiny(): image_embeds 32 wide, hidden states 64).
* `adapter_file(kind, seed)`: its tensors under the public file's names (`ip_adapter.<i>.to_k_ip.weight`),
  every value random, none zero or one.
* `save_adapter(path, tensors)`: `.safetensors` (flat) or `.bin` (torch.save of the nested dict).
* `reference_encoder(seed)`: transformers' CLIPVisionModelWithProjection at that tiny config, random.
* `write_h94_folder(folder, ...)`: models/ip-adapter_sd15.*, models/ip-adapter-plus_sd15.* and
  models/image_encoder/ as the repository has them.
* `tiny_ip_sd()`: the tiny SD of tests/tiny.py with a tiny random base adapter and image encoder, in memory.
* `parity_world(root)` and `reference_pipeline(...)`: what the parity tests against diffusers share — the
  same random models as a converted drp folder (with the base adapter and encoder) and as diffusers'
  `StableDiffusionPipeline` with the DDIM scheduler drp samples with.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoints import TINY, randomize_, reference_models, write_diffusers_folder
from drp.convert import convert
from drp.ip_adapter import IPAdapter, IPAdapterConfig, attn2_layers, file_index
from drp.vision import VisionConfig, VisionTransformer
from tiny import reference_tokenizer, tiny_sd

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


def tiny_ip_sd():
    """The tiny SD of tests/tiny.py with a tiny random base IP-Adapter and image encoder set on it, in memory."""
    sd = tiny_sd()
    sd.image_encoder = randomize_(VisionTransformer(ENCODER), 1).eval().requires_grad_(False)
    sd.ip_adapter = randomize_(IPAdapter(adapter_config("base")), 2).eval().requires_grad_(False)
    return sd


def parity_world(root, forms=(".safetensors",)):
    """The reference models (seed 0), their h94 folder, and our weights folder converted from both (the base
    adapter and the image encoder added): (models, h94 `models/` folder, weights folder) under `root`."""
    root = Path(root)
    models = reference_models(seed=0)
    write_diffusers_folder(root / "sd", models)
    convert(root / "sd", root / "weights", dtype="fp32", progress=False)
    h94 = write_h94_folder(root / "h94", reference_encoder(seed=5), forms=forms)
    convert(h94 / f"{FILES['base']}{forms[0]}", root / "weights", dtype="fp32", progress=False)
    convert(h94 / "image_encoder", root / "weights", dtype="fp32", progress=False)
    return models, h94, root / "weights"


def reference_pipeline(models, tokenizer_folder, h94=None):
    """diffusers' StableDiffusionPipeline of `models` with SD 1.5's DDIM scheduler, as drp samples; with an
    h94 folder, its base IP-Adapter and image encoder loaded (the reference preprocesses with transformers'
    PIL CLIPImageProcessor, the one the weights were trained with)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessorPil

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              set_alpha_to_one=False, clip_sample=False)
    pipe = StableDiffusionPipeline(**models, tokenizer=reference_tokenizer(tokenizer_folder), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=CLIPImageProcessorPil(),
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if h94 is not None:
        pipe.load_ip_adapter(str(h94), subfolder="", weight_name=f"{FILES['base']}.safetensors",
                             image_encoder_folder="image_encoder")
    return pipe
