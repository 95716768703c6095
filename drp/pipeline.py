"""From prompt to pixels: text-to-image with classifier-free guidance, DDIM inversion, and DRP-Diff.

    prompt ──tokenizer──► ids ──text_encoder──► context (B, 77, 768)
    noise (B, 4, H/8, W/8) ──[UNet + guidance + DDIM step] × steps──► latent ──VAE decoder──► image

With reference images (DRP-Diff, `drp/dual_reference.py`), each reference is first DDIM-inverted into
a trajectory of latents; during sampling its latent at the current step is *replayed* as extra rows
of the same UNet batch, and an attention hook lets the generated rows look at the references'
self-attention keys/values. Which stage the hook is in is decided here, in the loop, step by step.

Follows CompVis/stable-diffusion scripts/txt2img.py and ldm/models/diffusion/ddim.py; its numbers
equal diffusers' StableDiffusionPipeline with a DDIMScheduler (tests/test_pipeline.py).
"""

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import ddim
from .errors import DrpError
from .images import fit, load_image, to_pil, to_tensor
from .vae import LATENT_SCALE


@dataclass
class Result:
    """What `generate` returns: the images, the final latents, and a report of every setting."""

    images: list  # PIL images
    latents: torch.Tensor  # (B, 4, H/8, W/8), scaled by LATENT_SCALE, float32
    info: dict  # settings, seeds, timings; the DRP-Diff numbers when references were given
    masks: dict = field(default_factory=dict)  # DRP-Diff masks (reference foregrounds, generated subject)


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
    x = image.float() if torch.is_tensor(image) else encode_image(sd, image, width, height)
    x0, context = x, encode_text(sd, [prompt]) if context is None else context
    alphas = ddim.alphas_cumprod().to(sd.device)
    path = []
    for k, (t, t_next) in enumerate(tqdm(ddim.ddim_inversion_pairs(steps), desc="inverting", disable=not progress)):
        hook = hook_for_step(k, t_next) if hook_for_step else None
        with torch.no_grad():  # the noise is estimated at the level we go to (see ddim_invert_step)
            eps = sd.unet(x.to(sd.dtype), t_next, context, hook).float()
        x = ddim.ddim_invert_step(x, eps, t, t_next, alphas)
        path.append(x)
    return Trajectory(ddim.ddim_timesteps(steps), torch.stack(path[::-1]), x0)


def generate(sd, prompt, negative_prompt="", steps=50, guidance=7.5, height=512, width=512, seed=0, eta=0.0,
             latents=None, num_images=1, content=None, style=None, subject=None, content_mask=None,
             style_mask=None, switch_step=None, tiled_decode=False, progress=True, **drp_options):
    """Text (and optionally reference images) -> `Result`.

    prompt: a string or a list (one image each); `num_images` images per prompt, image k with seed
    `seed + k`. `latents` overrides the initial noise. `content`/`style`/`subject`/masks/`switch_step`
    turn on DRP-Diff (see ALGORITHM.md); further DRP-Diff knobs are listed in
    `dual_reference.Options` and passed by name. `tiled_decode`: decode images larger than 512 px in
    overlapping 512-px tiles, so that the decoder's memory does not grow with the image (VAE.decode).
    """
    from .dual_reference import prepare  # the method; imported here to keep the plain path readable

    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise DrpError("prompt must be a string or a list of strings.")
    if not isinstance(num_images, int) or num_images < 1:
        raise DrpError(f"num_images must be a whole number ≥ 1, got {num_images!r}.")
    check_settings(steps, guidance, height, width, eta)
    prompts = [p for p in prompts for _ in range(num_images)]
    negatives = [negative_prompt] * len(prompts)
    seeds = [seed + k for k in range(len(prompts))]
    batch, timings = len(prompts), {}
    shape = (1, 4, height // 8, width // 8)
    if latents is None:
        latents = initial_latents(seeds, shape)
    if tuple(latents.shape) != (batch, *shape[1:]):
        raise DrpError(f"latents must have shape {(batch, *shape[1:])} for these settings, got {tuple(latents.shape)}.")

    start = time.perf_counter()
    text = encode_text(sd, negatives + prompts)  # (2B, 77, C): unconditional rows first, then conditional
    timings["text"] = time.perf_counter() - start

    # DRP-Diff: invert the references (or read them from the cache), find their masks, pick the switch step.
    method = prepare(sd, prompts, content=content, style=style, subject=subject, content_mask=content_mask,
                     style_mask=style_mask, switch_step=switch_step, steps=steps, height=height, width=width,
                     progress=progress, timings=timings, **drp_options)

    start = time.perf_counter()
    alphas = ddim.alphas_cumprod().to(sd.device)
    # η > 0: each image draws its step noise from its own generator, so image k equals a run with seed + k
    generators = [torch.Generator().manual_seed(s) for s in seeds] if eta > 0 else []
    x = latents.to(sd.device, torch.float32)
    for i, (t, t_prev) in enumerate(tqdm(ddim.ddim_pairs(steps), desc="sampling", disable=not progress)):
        x_in, context, hook = torch.cat([x, x]), text, None
        if method is not None:  # the replayed reference rows join the batch; the hook of this step's stage
            late = i >= method.switch_step
            x_in = torch.cat([x_in, method.latents_at(i)])
            context = torch.cat([context, method.context])
            hook = method.hook(i, late)
        with torch.no_grad():
            eps = sd.unet(x_in.to(sd.dtype), t, context, hook)[: 2 * batch].float()
        eps_uncond, eps_text = eps.chunk(2)
        eps = eps_uncond + guidance * (eps_text - eps_uncond)  # classifier-free guidance
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(x.device) if eta > 0 else None
        x = ddim.ddim_step(x, eps, t, t_prev, alphas, eta=eta, noise=noise)
    timings["sampling"] = time.perf_counter() - start

    start = time.perf_counter()
    images = to_pil(decode(sd, x, tiled=tiled_decode))
    timings["decoding"] = time.perf_counter() - start

    info = dict(prompt=prompts, negative_prompt=negative_prompt, steps=steps, guidance=guidance, height=height,
                width=width, seed=seed, seeds=seeds, eta=eta, num_images=num_images, sampler="DDIM",
                tiled_decode=tiled_decode,
                model=(sd.source or {}).get("file", "unknown"), device=str(sd.device),
                dtype=str(sd.dtype).replace("torch.", ""), timings=timings)
    masks = {}
    if method is not None:
        info["drp"] = method.report()
        masks = method.masks()
    return Result(images, x.cpu(), info, masks)
