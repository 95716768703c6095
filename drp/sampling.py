"""The sampler's building blocks: settings checks, text and image encoding, noise, decoding, DDIM inversion.

    prompt ──tokenizer──► ids ──text_encoder──► context (B, 77, 768)        encode_text
    picture ──VAE encoder──► latent (1, 4, H/8, W/8) × LATENT_SCALE          encode_image
    latent ──[UNet with guidance 1 + backward DDIM step] × steps──► Trajectory   invert
    latent / LATENT_SCALE ──VAE decoder──► image in [0, 1]                   decode

The loop that samples an image with them is `drp/pipeline.py`; DRP-Diff (`drp/dual_reference.py`)
uses `encode_text` and `invert` to prepare its references. This file imports neither of them, so the
arrows point one way: pipeline → dual_reference → sampling.

Follows CompVis/stable-diffusion ldm/models/diffusion/ddim.py and the DDIM-inversion pipelines of
diffusers; `invert` is tested in tests/test_pipeline.py.
"""

import math
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import ddim
from .errors import DrpError
from .images import fit, load_image, to_tensor
from .vae import LATENT_SCALE

TRAJECTORY_DTYPE = torch.float32  # `invert` keeps its latents in float32 whatever the compute dtype


@dataclass
class Trajectory:
    """A DDIM inversion: the latent at each of the sampler's timesteps, noisiest first."""

    timesteps: list  # ddim_timesteps(steps): 981, 961, …, 1
    latents: torch.Tensor  # (steps, 1, 4, h, w): latents[i] is the latent the sampler meets at timesteps[i]
    x0: torch.Tensor  # (1, 4, h, w) the clean latent (VAE mean × LATENT_SCALE)


def check_settings(steps, guidance, height, width, eta=0.0):
    """Refuse impossible settings with one sentence each, before any work is done."""
    if not isinstance(steps, int) or steps < 1 or steps >= ddim.NUM_TRAIN_STEPS:
        raise DrpError(f"steps must be a whole number from 1 to {ddim.NUM_TRAIN_STEPS - 1}, got {steps!r}.")
    if not isinstance(guidance, (int, float)) or guidance != guidance or guidance < 0:
        raise DrpError(f"guidance must be a number ≥ 0 (7.5 is usual), got {guidance!r}.")
    if not math.isfinite(guidance):
        raise DrpError(f"guidance must be a finite number (7.5 is usual), got {guidance!r}.")
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v % 8 or not 64 <= v <= 2048:
            raise DrpError(f"{name} must be a multiple of 8 from 64 to 2048 pixels, got {v!r}.")
    if not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise DrpError(f"eta must be a number from 0 to 1, got {eta!r}.")


def encode_text(sd, prompts):
    """Prompts -> text context (B, 77, C); warns once per prompt that is longer than 77 tokens."""
    for p in dict.fromkeys(prompts):  # each distinct prompt once
        dropped = sd.tokenizer.truncated_words(p)
        if dropped:
            warnings.warn(f"the prompt is longer than 77 tokens; everything from {dropped[0]!r} on is ignored.",
                          stacklevel=3)
    tokens = sd.tokenizer(prompts).to(sd.device)
    with torch.no_grad():
        return sd.text_encoder(tokens).to(sd.dtype)


def initial_latents(seeds, shape):
    """One Gaussian latent per seed, drawn on the CPU so a seed gives the same image on every device."""
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def decode(sd, latents, tiled=False):
    """Scaled latents -> images (B, 3, H, W) in [0, 1], float32 (`tiled`: see VAE.decode)."""
    with torch.no_grad():
        images = sd.vae.decode((latents / LATENT_SCALE).to(sd.device, sd.dtype), tiled=tiled)
    return (images.float() / 2 + 0.5).clamp(0, 1)


def encode_image(sd, image, width, height):
    """A picture (path or PIL) -> its scaled latent (1, 4, h, w), centre-cropped to width×height."""
    pixels = to_tensor(fit(load_image(image), width, height)).to(sd.device, sd.dtype)
    with torch.no_grad():
        return sd.vae.encode(pixels).float() * LATENT_SCALE


def invert(sd, image, prompt="", steps=50, height=512, width=512, hook_for_step=None, progress=True,
           context=None):
    """DDIM inversion of an image (path, PIL, or a (1, 4, h, w) scaled latent): its `Trajectory`.

    Runs the sampler's steps backwards with guidance 1 (the prompt alone, no negative), from the clean
    latent up to the noisiest timestep. `hook_for_step(k, t)` may give an attention hook per step
    (DRP-Diff records attention maps this way). `context`: the prompt already encoded, if the caller has it.
    """
    check_settings(steps, 1.0, height, width)
    x = (image if torch.is_tensor(image) else encode_image(sd, image, width, height)).to(sd.device, TRAJECTORY_DTYPE)
    x0, context = x, encode_text(sd, [prompt]) if context is None else context
    alphas = ddim.alphas_cumprod().to(sd.device)
    path = []
    for k, (t, t_next) in enumerate(tqdm(ddim.ddim_inversion_pairs(steps), desc="inverting", disable=not progress)):
        hook = hook_for_step(k, t_next) if hook_for_step else None
        with torch.no_grad():  # the noise is estimated at the level we go to (see ddim_invert_step)
            eps = sd.unet(x.to(sd.dtype), t_next, context, hook).to(TRAJECTORY_DTYPE)
        x = ddim.ddim_invert_step(x, eps, t, t_next, alphas)
        path.append(x)
    return Trajectory(ddim.ddim_timesteps(steps), torch.stack(path[::-1]), x0)
