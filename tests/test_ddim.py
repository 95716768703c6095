"""Parity of drp.ddim with diffusers' DDIMScheduler / DDIMInverseScheduler configured as SD 1.5's.

What aligns with DDIMInverseScheduler (same SD 1.5 config): its timesteps for n steps are
[1, 21, …, 981] (n = 50) and `step(eps, T, x)` moves x from level T - 1000//n (ᾱ[0] when negative,
because set_alpha_to_one=False) up to level T. That is exactly `ddim_invert_step(x, eps, t, t_next)`
over `ddim_inversion_pairs(n)` = [(T - 1000//n, T) for T in its timesteps], so the two are compared
step by step. Which timestep the UNet is evaluated at during inversion is the caller's business and
is not tested here.
"""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from drp.ddim import (
    alphas_cumprod,
    ddim_invert_step,
    ddim_inversion_pairs,
    ddim_pairs,
    ddim_step,
    ddim_timesteps,
)
from drp.errors import DrpError

TOL = 1e-5  # relative: max |ours - reference| / max |reference|
SHAPE = (2, 4, 8, 8)  # a small batch of latents
SD15 = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    timestep_spacing="leading",
)


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def test_schedule_equals_diffusers_scaled_linear_bit_for_bit():
    ref = DDIMScheduler(**SD15).alphas_cumprod
    ours = alphas_cumprod()
    assert ours.dtype == torch.float32
    assert torch.equal(ours, ref)


def test_fifty_steps_run_from_981_down_to_1_with_the_plus_one_offset():
    assert ddim_timesteps(50) == list(range(981, 0, -20))
    assert ddim_pairs(50)[0] == (981, 961)
    assert ddim_pairs(50)[-1] == (1, -19)


@pytest.mark.parametrize("n", [1, 7, 10, 25, 30, 50, 999])
def test_timesteps_equal_diffusers_leading_spacing(n):
    ref = DDIMScheduler(**SD15)
    ref.set_timesteps(n)
    assert ddim_timesteps(n) == ref.timesteps.tolist()


def test_last_step_lands_on_alpha_bar_zero_not_on_one():
    torch.manual_seed(0)
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    alphas = alphas_cumprod()
    a1, a0 = alphas[1], alphas[0]
    x0 = (x - (1 - a1) ** 0.5 * eps) / a1**0.5
    expected = a0**0.5 * x0 + (1 - a0) ** 0.5 * eps
    out = ddim_step(x, eps, 1, -19, alphas)
    assert rel_err(out, expected) < TOL
    assert rel_err(out, x0) > 100 * TOL  # the set_alpha_to_one=True rule would have returned x0


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("n", [10, 25, 50])
def test_sampling_steps_match_diffusers_ddim_scheduler(n, eta):
    ref = DDIMScheduler(**SD15)
    ref.set_timesteps(n)
    alphas = alphas_cumprod()
    torch.manual_seed(1)
    x_ref = x_ours = torch.randn(SHAPE)
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    pairs = ddim_pairs(n)
    assert [t for t, _ in pairs] == ref.timesteps.tolist()
    for t, t_prev in pairs:
        eps = torch.randn(SHAPE)  # stands in for the UNet's prediction, the same for both
        x_ref = ref.step(eps, t, x_ref, eta=eta, generator=g_ref).prev_sample
        x_ours = ddim_step(x_ours, eps, t, t_prev, alphas, eta=eta, generator=g_ours)
        assert rel_err(x_ours, x_ref) < TOL, f"step t={t}"


def test_explicit_noise_matches_diffusers_variance_noise():
    ref = DDIMScheduler(**SD15)
    ref.set_timesteps(25)
    alphas = alphas_cumprod()
    torch.manual_seed(2)
    x, eps, z = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    for t, t_prev in ddim_pairs(25):
        expected = ref.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        assert rel_err(ddim_step(x, eps, t, t_prev, alphas, eta=1.0, noise=z), expected) < TOL


def test_eta_noise_comes_from_the_given_generator_only():
    torch.manual_seed(3)
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    alphas = alphas_cumprod()
    a = ddim_step(x, eps, 501, 481, alphas, eta=0.5, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the global RNG must not matter
    b = ddim_step(x, eps, 501, 481, alphas, eta=0.5, generator=torch.Generator().manual_seed(5))
    c = ddim_step(x, eps, 501, 481, alphas, eta=0.5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_eta_zero_draws_no_random_numbers():
    torch.manual_seed(4)
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    g = torch.Generator().manual_seed(9)
    state = g.get_state()
    ddim_step(x, eps, 501, 481, alphas_cumprod(), eta=0.0, generator=g)
    assert torch.equal(g.get_state(), state)


def test_passing_both_generator_and_noise_is_an_error():
    x = torch.zeros(SHAPE)
    with pytest.raises(DrpError):
        ddim_step(x, x, 501, 481, alphas_cumprod(), eta=0.5, generator=torch.Generator(), noise=x)


@pytest.mark.parametrize("n", [0, 1000])
def test_step_counts_outside_the_schedule_are_refused(n):
    with pytest.raises(DrpError):
        ddim_timesteps(n)


@pytest.mark.parametrize("n", [10, 50])
def test_inversion_step_is_the_exact_inverse_of_a_sampling_step(n):
    alphas = alphas_cumprod()
    torch.manual_seed(5)
    for t, t_prev in ddim_pairs(n):
        x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
        back = ddim_invert_step(ddim_step(x, eps, t, t_prev, alphas), eps, t_prev, t, alphas)
        assert rel_err(back, x) < TOL, f"step back from t_prev={t_prev}"
        forth = ddim_step(ddim_invert_step(x, eps, t_prev, t, alphas), eps, t, t_prev, alphas)
        assert rel_err(forth, x) < TOL, f"step forth from t={t}"


@pytest.mark.parametrize("n", [10, 25, 50])
def test_inversion_matches_diffusers_ddim_inverse_scheduler(n):
    ref = DDIMInverseScheduler(**SD15)
    ref.set_timesteps(n)
    pairs = ddim_inversion_pairs(n)
    assert [t_next for _, t_next in pairs] == ref.timesteps.tolist()
    assert [t_next for _, t_next in pairs] == ddim_timesteps(n)[::-1]  # lands on the sampler's levels
    assert pairs[0][0] < 0  # the first step leaves the clean latent at ᾱ[0]
    alphas = alphas_cumprod()
    torch.manual_seed(6)
    x_ref = x_ours = torch.randn(SHAPE)
    for t, t_next in pairs:
        eps = torch.randn(SHAPE)
        x_ref = ref.step(eps, t_next, x_ref).prev_sample
        x_ours = ddim_invert_step(x_ours, eps, t, t_next, alphas)
        assert rel_err(x_ours, x_ref) < TOL, f"step to t={t_next}"
