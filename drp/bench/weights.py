"""What the benchmark's measurements run on: random weights with SD 1.5's shapes, written the way users
have them (a diffusers folder in fp16, converted by drp.convert); the reference (diffusers/transformers
models holding the converted files' tensors, and their pipeline); our models loaded from the same files;
the prompt and the two reference pictures.

Below tasks.py, ip_adapter.py and drp_ip.py, which run in child processes, and run.py, which writes the
folders before starting them.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model_io import MODELS, build_on_meta

PROMPT = "a cat sitting on a bench, in the style of a painting"
ASSETS = Path(__file__).resolve().parents[2] / "assets"


# ---- random weights, written the way users have them ------------------------------------------------

def folder_configs(configs, dtype="float16"):
    """config.json of each component of a diffusers folder for our configs (what drp.convert reads)."""
    u, v, t = configs["unet"], configs["vae"], configs["text_encoder"]
    levels = len(u.channels)
    return {
        "unet": {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": u.in_channels,
                 "out_channels": u.out_channels, "block_out_channels": list(u.channels),
                 "layers_per_block": u.layers_per_block, "attention_head_dim": u.heads,
                 "cross_attention_dim": u.context_dim, "norm_num_groups": u.groups,
                 "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attn_levels],
                 "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attn_levels)]},
        "vae": {"_class_name": "AutoencoderKL", "in_channels": v.in_channels, "out_channels": v.in_channels,
                "latent_channels": v.latent_channels, "block_out_channels": list(v.channels),
                "layers_per_block": v.layers_per_block, "norm_num_groups": v.groups, "sample_size": 512,
                "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels},
        "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                         "vocab_size": t.vocab_size, "max_position_embeddings": t.max_len, "hidden_size": t.dim,
                         "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                         "intermediate_size": t.mlp_dim, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                         "projection_dim": t.dim, "torch_dtype": dtype},
    }



def random_tensor(key, shape, generator):
    """Seeded values of a sensible size: N(0, 1/fan_in) weights, norm scales near 1, small biases."""
    if len(shape) >= 2:
        return torch.randn(shape, generator=generator) / int(torch.Size(shape[1:]).numel()) ** 0.5
    if key.endswith("weight"):
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    return 0.1 * torch.randn(shape, generator=generator)



def write_random_folders(workdir, configs, seed=0):
    """A random fp16 diffusers folder and its drp conversion in `workdir`; returns their paths."""
    from ..convert import FOLDER_FILES, convert

    source, weights = Path(workdir) / "diffusers", Path(workdir) / "weights"
    for i, (component, config) in enumerate(folder_configs(configs).items()):
        folder = source / component
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(seed * 10 + i)
        shapes = {k: tuple(v.shape) for k, v in build_on_meta(component, configs[component]).state_dict().items()}
        tensors = {k: random_tensor(k, s, generator).half() for k, s in sorted(shapes.items())}
        file = folder / FOLDER_FILES[component][0]  # the plain file of a diffusers folder
        save_file(tensors, str(file) + ".tmp", metadata={"format": "pt"})
        os.replace(str(file) + ".tmp", file)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        del tensors
    convert(source, weights, dtype="fp16", progress=False)
    return source, weights



# ---- the reference: diffusers models holding our tensors -------------------------------------------

def reference_models(spec, dtype, components=("unet", "vae", "text_encoder")):
    """diffusers' UNet and VAE and transformers' CLIP built on meta, then given the converted files' tensors.

    Read as plain contiguous tensors, one copy, whatever layout drp.load chooses: the reference runs as
    users run it, and a child holding it holds nothing else.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    source, models = Path(spec["source"]), {}
    with torch.device("meta"):
        if "unet" in components:
            models["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source / "unet"))
        if "vae" in components:
            models["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(source / "vae"))
        if "text_encoder" in components:
            models["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(source / "text_encoder"))
    for name, model in models.items():
        keys = set(model.state_dict())
        with safe_open(str(Path(spec["weights"]) / MODELS[name][2]), framework="pt") as f:
            state = {(k if k in keys else k.removeprefix("text_model.")): f.get_tensor(k).to(spec["device"], dtype)
                     for k in f.keys()}
        model.load_state_dict(state, assign=True, strict=False)
        for key, buffer in list(model.named_buffers()):
            if buffer.is_meta and key.endswith("position_ids"):  # a non-persistent buffer of transformers
                owner = model.get_submodule(key.rsplit(".", 1)[0])
                owner.register_buffer("position_ids", torch.arange(buffer.shape[-1], device=spec["device"])[None],
                                      persistent=False)
        leftover = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"the reference {name} got no value for {leftover[0]}")
        model.eval().requires_grad_(False)
    return models



def reference_pipeline(models, workdir):
    """diffusers' StableDiffusionPipeline with SD 1.5's DDIM scheduler and a CLIP tokenizer of our vocabulary."""
    import gzip

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from ..tokenizer import DEFAULT_VOCAB, NUM_MERGES, bytes_to_unicode

    with gzip.open(DEFAULT_VOCAB, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 1 + NUM_MERGES]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(workdir) / "tokenizer"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer,
                                   unet=models["unet"], scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe



# ---- ours, and the inputs ------------------------------------------------------------------------------

def load_ours(spec, dtype):
    from ..model_io import load

    return load(spec["weights"], device=spec["device"], dtype=dtype)



def pictures(px):
    """The content and style pictures of the DRP measurements: the repository's, or two made-up ones."""
    from PIL import Image

    content, style = ASSETS / "chelsea.png", ASSETS / "starry_night.jpg"
    if not (content.is_file() and style.is_file()):  # outside a checkout: two made-up pictures
        content = Image.effect_mandelbrot((px, px), (-2, -1.5, 1, 1.5), 100).convert("RGB")
        style = Image.linear_gradient("L").resize((px, px)).convert("RGB")
    return content, style
