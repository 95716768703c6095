"""The whole pipeline equals diffusers' StableDiffusionPipeline; inversion, batching, seeds and errors behave."""

import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

from drp import ddim
from drp.clip import CLIPConfig
from drp.errors import DrpError
from drp.pipeline import decode, generate, invert
from drp.unet import UNetConfig
from drp.vae import VAEConfig
from test_clip import file_keys, reference_clip
from test_unet import reference_unet
from test_vae import reference_vae
from tiny import reference_tokenizer, tiny_sd

PIXEL_TOL = 1e-3  # absolute, in [0, 1] pixel space: the bound for whole-pipeline parity
BATCH_TOL = 1e-5  # a batched row against the same row alone: only the order of float sums differs
HEIGHT, WIDTH = 64, 80  # non-square, the smallest height the pipeline accepts
PROMPT = "a red fox sitting in the snow, oil painting"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Our tiny SD and diffusers' pipeline holding the same random weights, every one non-trivial."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    unet, vae = reference_unet(UNetConfig.tiny()), reference_vae(VAEConfig.tiny())
    text_encoder = reference_clip(CLIPConfig.tiny())
    with torch.no_grad():  # diffusers starts some layers at zero and norms at 1/0: move every weight
        for p in unet.parameters():
            p.normal_(0, 0.05)
        for p in [*vae.parameters(), *text_encoder.parameters()]:
            p.add_(0.1 * torch.randn_like(p)) if p.dim() == 1 else None
    scheduler = DDIMScheduler(  # SD 1.5's scheduler_config.json, read by DDIM
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        set_alpha_to_one=False, clip_sample=False)
    tokenizer = reference_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    reference = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                        scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    assert reference.vae_scale_factor == 8

    sd = tiny_sd()
    sd.unet.load_state_dict(unet.state_dict(), strict=True)
    sd.vae.load_state_dict(vae.state_dict(), strict=True)
    sd.text_encoder.load_state_dict(file_keys(text_encoder.state_dict()), strict=True)
    return sd, reference


def noise(batch=1, seed=0):
    return torch.randn(batch, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(seed))


def ours_and_reference(pair, negative_prompt, steps):
    sd, reference = pair
    latents = noise()
    ours = generate(sd, PROMPT, negative_prompt, steps=steps, guidance=7.5, height=HEIGHT, width=WIDTH,
                    latents=latents, progress=False)
    expected = reference(PROMPT, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                         guidance_scale=7.5, height=HEIGHT, width=WIDTH, latents=latents.clone(),
                         output_type="np").images  # (B, H, W, 3) in [0, 1]
    got = decode(sd, ours.latents).permute(0, 2, 3, 1).numpy()
    return got, expected


@pytest.mark.parametrize("negative_prompt", ["", "blurry, low quality"])
def test_image_equals_diffusers_pipeline_after_six_steps_at_a_non_square_size(pair, negative_prompt):
    got, expected = ours_and_reference(pair, negative_prompt, steps=6)
    assert got.shape == expected.shape == (1, HEIGHT, WIDTH, 3)
    inside = ((expected > 0.02) & (expected < 0.98)).mean()
    assert inside > 0.5, "the test image is saturated, so the comparison would prove little"
    assert abs(got - expected).max() <= PIXEL_TOL


def test_negative_prompt_changes_the_image_far_beyond_the_tolerance(pair):
    """The parity above is meaningful: the guidance term moves pixels by much more than PIXEL_TOL."""
    sd, _ = pair
    images = [decode(sd, generate(sd, PROMPT, neg, steps=6, height=HEIGHT, width=WIDTH, latents=noise(),
                                  progress=False).latents) for neg in ("", "blurry, low quality")]
    assert (images[0] - images[1]).abs().max() > 100 * PIXEL_TOL


def test_info_records_every_setting_and_the_timings(pair):
    sd, _ = pair
    result = generate(sd, PROMPT, "blurry", steps=2, guidance=5.0, height=HEIGHT, width=WIDTH, seed=7,
                      progress=False)
    info = result.info
    assert (info["prompt"], info["negative_prompt"], info["steps"], info["guidance"]) == ([PROMPT], "blurry", 2, 5.0)
    assert (info["height"], info["width"], info["seed"], info["seeds"], info["sampler"]) == (HEIGHT, WIDTH, 7, [7], "DDIM")
    assert {"text", "sampling", "decoding"} <= set(info["timings"])
    assert result.images[0].size == (WIDTH, HEIGHT)
    assert result.latents.shape == (1, 4, HEIGHT // 8, WIDTH // 8)


# --- DDIM inversion ----------------------------------------------------------------------------------------


class LinearNoise(nn.Module):
    """A UNet stand-in whose noise prediction is a fixed linear map of x: eps = scale · Q x (Q orthogonal)."""

    def __init__(self, scale, seed=0):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)))
        self.register_buffer("q", scale * q)
        self.timesteps = []

    def forward(self, x, t, context, hook=None):
        self.timesteps.append(int(t))
        return torch.einsum("ij,bjhw->bihw", self.q, x)


def clean_latent(seed=1, size=(8, 8)):
    return torch.randn(1, 4, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_inversion_trajectory_is_aligned_with_the_sampler_timesteps(steps):
    sd = dataclasses.replace(tiny_sd(), unet=LinearNoise(0.5))
    x0 = clean_latent()
    trajectory = invert(sd, x0, "", steps=steps, progress=False)
    assert trajectory.timesteps == ddim.ddim_timesteps(steps)
    assert trajectory.latents.shape == (steps, 1, 4, 8, 8)
    assert sd.unet.timesteps == trajectory.timesteps[::-1]  # the UNet was asked at 1, 21, …, 981
    assert torch.equal(trajectory.x0, x0)
    # latents[-1] is one inversion step from the clean latent, landing on timesteps[-1] = 1
    alphas = ddim.alphas_cumprod()
    eps = torch.einsum("ij,bjhw->bihw", sd.unet.q, x0)
    t_clean, t_first = ddim.ddim_inversion_pairs(steps)[0]
    first = ddim.ddim_invert_step(x0, eps, t_clean, t_first, alphas)
    assert torch.allclose(trajectory.latents[-1], first, atol=1e-6)


@pytest.mark.parametrize("steps, bound", [(50, 0.02), (10, 0.1)])
def test_inverting_then_sampling_back_returns_the_clean_latent_on_a_smooth_model(steps, bound):
    """eps = 0.5·Qx: the largest error |x̂0 - x0| is 0.009 (50 steps) and 0.05 (10 steps) for x0 ~ N(0, 1).

    Inversion evaluates eps at the latent it leaves rather than the one it reaches, so the error shrinks
    with the step size; the bounds leave a factor 2.
    """
    sd = dataclasses.replace(tiny_sd(), unet=LinearNoise(0.5))
    x0 = clean_latent()
    trajectory = invert(sd, x0, "", steps=steps, progress=False)
    back = generate(sd, "", steps=steps, guidance=1.0, height=64, width=64, latents=trajectory.latents[0],
                    progress=False).latents
    assert (back - x0).abs().max() <= bound
    assert (trajectory.latents[0] - x0).abs().max() > 10 * bound  # the start latent was really noised


def test_inverting_then_sampling_back_with_the_tiny_unet_at_small_weights_stays_close():
    """The real UNet with weights × 0.1 (a smooth eps): max error 0.004 over 50 steps; bound 0.01."""
    sd = tiny_sd()
    with torch.no_grad():
        for p in sd.unet.parameters():
            p.mul_(0.1)
    x0 = clean_latent()
    trajectory = invert(sd, x0, "a photo of a cat", steps=50, progress=False)
    back = generate(sd, "a photo of a cat", steps=50, guidance=1.0, height=64, width=64,
                    latents=trajectory.latents[0], progress=False).latents
    assert (back - x0).abs().max() <= 0.01


# --- seeds, batches, eta -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd():
    return tiny_sd()


def run(sd, prompt, **kw):
    return generate(sd, prompt, steps=3, height=64, width=64, progress=False, **kw)


def test_eta_above_zero_is_reproducible_with_the_same_seed_and_follows_the_seed(sd):
    latents = noise(1, seed=5)[..., :8, :8]
    a = run(sd, "a cat", eta=0.5, seed=3, latents=latents).latents
    b = run(sd, "a cat", eta=0.5, seed=3, latents=latents).latents
    c = run(sd, "a cat", eta=0.5, seed=4, latents=latents).latents  # same start, other step noise
    d = run(sd, "a cat", eta=0.0, seed=4, latents=latents).latents
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    assert (a - d).abs().max() > 1e-2


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_each_image_of_a_batch_equals_a_single_run_with_its_own_seed(sd, eta):
    prompts = ["a red cube", "a blue ball"]
    batch = run(sd, prompts, num_images=2, seed=10, eta=eta)
    assert len(batch.images) == 4 and batch.info["seeds"] == [10, 11, 12, 13]
    assert batch.info["prompt"] == ["a red cube", "a red cube", "a blue ball", "a blue ball"]
    for k in range(4):
        single = run(sd, prompts[k // 2], seed=10 + k, eta=eta)
        assert (batch.latents[k] - single.latents[0]).abs().max() <= BATCH_TOL, f"image {k}"


def test_images_of_one_batch_differ(sd):
    batch = run(sd, "a cat", num_images=2, seed=0)
    assert (batch.latents[0] - batch.latents[1]).abs().max() > 1e-2


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, message", [
    (dict(steps=0), "steps must be a whole number from 1 to 999"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(guidance=-1.0), "guidance must be a number ≥ 0"),
    (dict(guidance=math.nan), "guidance must be a number ≥ 0"),
    (dict(guidance="7"), "guidance must be a number ≥ 0"),
    (dict(height=100), "height must be a multiple of 8 from 64 to 2048"),
    (dict(height=56), "height must be a multiple of 8 from 64 to 2048"),
    (dict(width=2056), "width must be a multiple of 8 from 64 to 2048"),
    (dict(eta=1.5), "eta must be a number from 0 to 1"),
    (dict(num_images=0), "num_images must be a whole number ≥ 1"),
    (dict(prompt=3), "prompt must be a string or a list of strings"),
    (dict(latents=torch.zeros(1, 4, 8, 9)), "latents must have shape (1, 4, 8, 8)"),
])
def test_bad_settings_raise_drp_error_with_one_sentence(sd, setting, message):
    kw = dict(prompt="a cat", steps=3, height=64, width=64, progress=False) | setting
    with pytest.raises(DrpError) as e:
        generate(sd, **kw)
    assert str(e.value).startswith(message)
    assert str(e.value).endswith(".") and "\n" not in str(e.value)


def test_a_prompt_past_77_tokens_warns_naming_the_first_dropped_word(sd):
    prompt = " ".join(["cat"] * 75 + ["zebra", "moon"])  # "cat" is one token: 75 fill the context
    with pytest.warns(UserWarning, match="everything from 'zebra' on is ignored"):
        run(sd, prompt)


def test_a_prompt_of_exactly_75_tokens_gives_no_warning(sd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(sd, " ".join(["cat"] * 75))
