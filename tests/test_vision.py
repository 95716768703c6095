"""The vision transformer equals transformers' CLIP and DINO image models on the same random weights, at
the real sizes, and loads their files by name (DINO's through its two key maps)."""

import gc
import json

import pytest
import torch
from safetensors.torch import load_file

from drp.errors import DrpError
from drp.vision import (VisionConfig, VisionTransformer, dino_from_original, dino_from_transformers,
                        load_state)
from manifests import MANIFESTS, read_manifest

TOL = 1e-4  # largest error relative to the reference's largest magnitude, fp32 on the CPU


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def h14_config():
    """h94/IP-Adapter's `models/image_encoder/config.json`, as published (it says float16; the file is
    float32, and so is the reference here)."""
    config = json.loads((MANIFESTS / "clip_vit_h14_vision_config.json").read_text())
    return {k: v for k, v in config.items() if k != "torch_dtype"}


def fill_random_(model, seed):
    """Seeded random weights in place (what checkpoints.randomize_ gives, without its copies: 632M values
    matter here): N(0, 1/fan_in) matrices, LayerNorm scales near 1, small biases and embeddings."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            else:
                p.normal_(1 if name.endswith("weight") else 0, 0.1, generator=g)
    return model


def random_reference(model_class, config, seed, **kwargs):
    """A transformers model with seeded random weights, built on the meta device (no slow default init)."""
    with torch.device("meta"):
        ref = model_class(config, **kwargs)
    ref.to_empty(device="cpu")
    with torch.no_grad():
        for name, buf in ref.named_buffers():  # to_empty leaves buffers unset; the only ones are positions
            assert name.endswith("position_ids"), name
            buf.copy_(torch.arange(buf.shape[-1])[None])
    return fill_random_(ref, seed).eval()


def load_encoder_folder(folder):
    """An image-encoder folder in the published layout (config.json + model.safetensors) -> our model.
    The step that drp's converter (the IP-Adapter work) takes over."""
    cfg = VisionConfig.from_transformers(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    return load_state(model, load_file(str(folder / "model.safetensors"))).eval()


def pixels(batch, seed, size=224):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_ip_adapter_image_encoder_equals_transformers_at_full_vit_h14_size_through_a_published_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    x = pixels(1, seed=1)
    ref = random_reference(CLIPVisionModelWithProjection, CLIPVisionConfig(**h14_config()), seed=0)
    ref.save_pretrained(tmp_path)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
    want_embeds, want_penultimate, n_states = out.image_embeds, out.hidden_states[-2], len(out.hidden_states)
    del ref, out  # one full-size model in memory at a time
    gc.collect()

    ours = load_encoder_folder(tmp_path)
    assert ours.cfg == VisionConfig.vit_h14()
    with torch.no_grad():
        got = ours(x)
    assert n_states == 33  # the embeddings, then each of the 32 layers: [-2] is layer 31's output
    assert got.image_embeds.shape == (1, 1024) and got.penultimate.shape == (1, 257, 1280)
    assert relative_error(got.image_embeds, want_embeds) < TOL
    assert relative_error(got.penultimate, want_penultimate) < TOL
