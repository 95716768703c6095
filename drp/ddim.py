"""The DDIM sampler of Stable Diffusion 1.x as pure functions: schedule, timesteps, one step each way.

Where it sits in SD: the pipeline's loop asks the UNet for the noise `eps` in the latent `x` at
timestep `t`, and `ddim_step` moves `x` from noise level `t` to the lower level `t_prev`. Inverting a
reference image (DRP-Diff's reference trajectories) runs the same deterministic update the other way
with `ddim_invert_step`, from the clean latent up to pure noise.

Notation: `alphas` is the table ᾱ[0..999] of `alphas_cumprod`; a latent at level t is
x_t = √ᾱ[t]·x0 + √(1-ᾱ[t])·ε. One DDIM step (https://arxiv.org/abs/2010.02502, eq. 12 and 16):

    x0     = (x_t - √(1-ᾱ_t)·ε) / √ᾱ_t                      the clean latent the UNet implies
    x_prev = √ᾱ_prev·x0 + √(1-ᾱ_prev-σ²)·ε + σ·z            z ~ N(0, I), σ = η·σ_DDPM

Follows CompVis/stable-diffusion: the schedule of `ldm/modules/diffusionmodules/util.py`
(`make_beta_schedule`) with the numbers of `configs/stable-diffusion/v1-inference.yaml`, and the
sampler of `ldm/models/diffusion/ddim.py` (`make_ddim_timesteps`, `p_sample_ddim`). Numerically it
matches diffusers' `DDIMScheduler` as SD 1.5's `scheduler_config.json` configures it (scaled_linear,
steps_offset=1, set_alpha_to_one=False, clip_sample=False, "leading" spacing); tests/test_ddim.py
checks this step by step.
"""

import torch

from .errors import DrpError

NUM_TRAIN_STEPS = 1000  # T: SD was trained on noise levels t = 0 … 999


def alphas_cumprod(num_train_steps=NUM_TRAIN_STEPS, beta_start=0.00085, beta_end=0.012):
    """ᾱ[t] = Π_{s≤t} (1 - β_s) for SD's "scaled linear" schedule, a float32 tensor of length T.

    β is linear in √β between √0.00085 and √0.012 (v1-inference.yaml's linear_start/linear_end), so
    the noise is added gently at first. Computed in float32 like diffusers; CompVis computes it in
    float64 and stores float32, which differs by under 1e-6 relative.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_steps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(n, num_train_steps=NUM_TRAIN_STEPS):
    """The n timesteps the sampler visits, from noisy to clean: 50 steps -> [981, 961, …, 21, 1].

    "Leading" spacing: a uniform grid 0, s, 2s, … with stride s = T // n, shifted by +1. The +1 is
    CompVis' `steps_out = ddim_timesteps + 1` ("to get the final alpha values right"): the last step
    then starts at t = 1 and ends on ᾱ[0] (see `ddim_pairs`), and the first starts at 981, nearer to
    the pure-noise end 999 than 980 would be. SD 1.5's diffusers config says the same (steps_offset=1).
    """
    if not 1 <= n < num_train_steps:  # n = T would put the first step at t = T, outside the table
        raise DrpError(f"the number of sampling steps must be from 1 to {num_train_steps - 1}, got {n}.")
    stride = num_train_steps // n
    return [i * stride + 1 for i in reversed(range(n))]


def ddim_pairs(n, num_train_steps=NUM_TRAIN_STEPS):
    """The sampler's steps as (t, t_prev) pairs, t_prev = t - T // n: [(981, 961), …, (21, 1), (1, -19)].

    A negative t_prev means "the level below the first training step": its ᾱ is ᾱ[0] = 1 - β_0, not 1
    (SD 1.5's set_alpha_to_one=False, CompVis' `alphas_prev = [alphacums[0]] + …`). So the sampler
    stops at the least noisy level SD was trained on, and the VAE decodes that latent as is.
    """
    stride = num_train_steps // n
    return [(t, t - stride) for t in ddim_timesteps(n, num_train_steps)]


def ddim_inversion_pairs(n, num_train_steps=NUM_TRAIN_STEPS):
    """The inversion's steps as (t, t_next) pairs: the sampler's pairs reversed and each one flipped.

    50 steps -> [(-19, 1), (1, 21), …, (961, 981)]. The first step leaves the clean latent, which sits
    at level ᾱ[0] by the rule of `ddim_pairs`, and each step lands on one of `ddim_timesteps(n)`, so
    the inverted latent after step k is the one the sampler meets at `ddim_timesteps(n)[-1 - k]`.
    """
    return [(t_prev, t) for t, t_prev in reversed(ddim_pairs(n, num_train_steps))]


def _alpha_bar(alphas, t):
    """ᾱ at level t, with ᾱ[0] for the levels below the table (the set_alpha_to_one=False rule)."""
    return alphas[t] if t >= 0 else alphas[0]


def _predicted_x0(x, eps, alpha_t):
    """The clean latent implied by the noise prediction; SD 1.5 does not clip it (clip_sample=False)."""
    return (x - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5


def ddim_step(x, eps, t, t_prev, alphas, eta=0.0, generator=None, noise=None):
    """One sampling step: the latent x at level t and the UNet's noise eps -> the latent at t_prev.

    With eta = 0 (SD's default) the step is deterministic. With eta > 0 it adds σ·z with
    σ = eta·√((1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev)) (eta = 1 is DDPM's posterior noise); z is `noise`
    if given, else drawn from `generator` on the generator's device (a CPU generator gives the same
    images on every device) and moved to x's device.
    """
    if generator is not None and noise is not None:
        raise DrpError("ddim_step takes either a generator or the noise itself, not both; pass one of them.")
    alpha_t, alpha_prev = _alpha_bar(alphas, t), _alpha_bar(alphas, t_prev)
    x0 = _predicted_x0(x, eps, alpha_t)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    sigma = eta * variance**0.5
    x_prev = alpha_prev**0.5 * x0 + (1 - alpha_prev - sigma**2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            device = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_invert_step(x, eps, t, t_next, alphas):
    """One inversion step: the latent x at level t, the UNet's noise eps -> the latent at level t_next > t.

    It is the deterministic DDIM step run backwards: given the same eps, `ddim_step(·, t_next, t)`
    returns x exactly (up to rounding). A negative t is the clean latent at ᾱ[0] (see
    `ddim_inversion_pairs` for the order of the steps). The latent at t_next is not known yet, so the
    caller evaluates eps on x, conventionally at timestep t_next (as diffusers' inversion pipelines
    do); that approximation, not this update, is why inversion does not reconstruct images exactly.
    """
    alpha_t, alpha_next = _alpha_bar(alphas, t), _alpha_bar(alphas, t_next)
    x0 = _predicted_x0(x, eps, alpha_t)
    return alpha_next**0.5 * x0 + (1 - alpha_next) ** 0.5 * eps
