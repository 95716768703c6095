"""What the DRP-Diff tests share: a tiny model with far-from-uniform attention, and synthetic reference pictures.

`drp_sd()` is a tiny random SD whose UNet weights are scaled up so that attention maps (and so the
automatic masks) have structure; `picture(seed)` is a noisy picture with a dark "subject" in the middle,
in a 112×96 frame that the pipeline centre-crops, as it does real photos. For tests of the attention
hooks without a model: `fake_method` (a DualReference with given masks), `qkv` (random queries, keys
and values), and the grid `HW` with the foreground mask `FG`.
"""

import numpy as np
import torch
from PIL import Image

from drp import dual_reference as dr
from drp.clip import CLIPConfig, CLIPTextModel
from drp.model_io import StableDiffusion
from drp.tokenizer import Tokenizer
from drp.unet import UNet, UNetConfig
from drp.vae import VAE, VAEConfig

PROMPT = "a cat on the beach, in the style of a painting"


def drp_sd(dtype=torch.float32):
    """The tiny SD of the DRP-Diff tests (seed 0, UNet weights × 3), in `dtype`, with a fixed weights id."""
    torch.manual_seed(0)
    models = [CLIPTextModel(CLIPConfig.tiny()), UNet(UNetConfig.tiny()), VAE(VAEConfig.tiny())]
    with torch.no_grad():  # larger weights than the default init, so attention is far from uniform
        for p in models[1].parameters():
            p.mul_(3.0)
    for m in models:
        m.to(dtype).eval().requires_grad_(False)
    return StableDiffusion(Tokenizer(), *models, torch.device("cpu"), dtype, {"file": "tiny", "sha256": "tiny"})


def picture(seed, size=96):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size + 16, 3), dtype=np.uint8)
    arr[24:72, 30:80] = rng.integers(0, 60, 3, dtype=np.uint8)  # a dark "subject" in the middle
    return Image.fromarray(arr)


def fake_method(kinds, masks, rule="test", batch=1, subject_tokens=((2,),), **options):
    """A DualReference with given (H, W) masks and no trajectories, for hook-level tests; `options`: Options'."""
    refs = {k: dr.Reference(k, None, torch.zeros(1, 77, 128), masks[k], 5.0, rule, False) for k in kinds}
    return dr.DualReference(refs, dr.Options(**options), batch, [list(t) for t in subject_tokens], 1,
                            {"mask_rule": {k: rule for k in kinds}})


def qkv(rows, n, seed, heads=2, d=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, heads, n, d, generator=g) for _ in range(3)]


HW = (4, 4)
FG = torch.zeros(8, 8)
FG[:4, :4] = 1  # foreground: the top-left quarter (at 4×4 tokens: rows 0–1, columns 0–1)
