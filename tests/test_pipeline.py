"""The whole pipeline equals diffusers' StableDiffusionPipeline; inversion, batching, seeds and errors behave."""

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from checkpoints import file_state_dict, reference_models
from drp import ddim, vae
from drp.errors import DrpError
from drp.images import to_pil
from drp.pipeline import generate
from drp.sampling import decode, invert
from tiny import reference_tokenizer, tiny_sd

PIXEL_TOL = 1e-3  # absolute, in [0, 1] pixel space: the bound for whole-pipeline parity
LATENT_TOL = 1e-5  # relative to the largest latent value: fp32 rounding through 6 steps
BATCH_TOL = 1e-6  # relative: a batched row against the same row alone, fp64 model (see the `sd` fixture)
HEIGHT, WIDTH = 64, 80  # non-square, the smallest height the pipeline accepts
PROMPT = "a red fox sitting in the snow, oil painting"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Our tiny SD and diffusers' pipeline holding the same random weights, none of them zero or one."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    models = reference_models(seed=0)  # diffusers/transformers models, every parameter randomized
    scheduler = DDIMScheduler(  # SD 1.5's scheduler_config.json, read by DDIM
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        set_alpha_to_one=False, clip_sample=False)
    reference = StableDiffusionPipeline(**models, tokenizer=reference_tokenizer(tmp_path_factory.mktemp("tok")),
                                        scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    assert reference.vae_scale_factor == 8

    sd = tiny_sd()
    for component, model in models.items():
        getattr(sd, component).load_state_dict(file_state_dict(component, model), strict=True)
    return sd, reference


def noise(batch=1, seed=0):
    return torch.randn(batch, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(seed))


def ours_and_reference(pair, negative_prompt, steps=6):
    """(our latents, diffusers' latents, our image, diffusers' image) from the same noise; images (B, H, W, 3)."""
    sd, reference = pair
    ours = generate(sd, PROMPT, negative_prompt, steps=steps, guidance=7.5, height=HEIGHT, width=WIDTH,
                    latents=noise(), progress=False)
    settings = dict(negative_prompt=negative_prompt or None, num_inference_steps=steps, guidance_scale=7.5,
                    height=HEIGHT, width=WIDTH)
    ref_latents = reference(PROMPT, latents=noise(), output_type="latent", **settings).images
    ref_image = reference(PROMPT, latents=noise(), output_type="np", **settings).images  # in [0, 1]
    return ours.latents, ref_latents, decode(sd, ours.latents).permute(0, 2, 3, 1).numpy(), ref_image


@pytest.mark.parametrize("negative_prompt", ["", "blurry, low quality"])
def test_image_equals_diffusers_pipeline_after_six_steps_at_a_non_square_size(pair, negative_prompt):
    """Measured on the CPU in fp32: both the latents and the pixels are identical to the last bit."""
    latents, ref_latents, image, ref_image = ours_and_reference(pair, negative_prompt)
    assert image.shape == ref_image.shape == (1, HEIGHT, WIDTH, 3)
    inside = ((ref_image > 0.02) & (ref_image < 0.98)).mean()
    assert inside > 0.5, "the test image is saturated, so the comparison would prove little"
    assert abs(image - ref_image).max() <= PIXEL_TOL
    assert (latents - ref_latents).abs().max() <= LATENT_TOL * ref_latents.abs().max()


def test_the_negative_prompt_moves_the_result_far_beyond_the_tolerances(pair):
    """The parity above is meaningful: the negative prompt moves latents by about half their range and
    pixels by up to 0.9, far beyond the tolerances."""
    sd, _ = pair
    latents = [generate(sd, PROMPT, negative, steps=6, height=HEIGHT, width=WIDTH, latents=noise(),
                        progress=False).latents for negative in ("", "blurry, low quality")]
    images = [decode(sd, x) for x in latents]
    assert (latents[0] - latents[1]).abs().max() > 0.1 * latents[0].abs().max()
    assert (images[0] - images[1]).abs().max() > 100 * PIXEL_TOL


def test_info_records_every_setting_and_the_timings(pair):
    sd, _ = pair
    result = generate(sd, PROMPT, "blurry", steps=2, guidance=5.0, height=HEIGHT, width=WIDTH, seed=7,
                      progress=False)
    info = result.info
    assert (info["prompt"], info["negative_prompt"], info["steps"], info["guidance"]) == ([PROMPT], "blurry", 2, 5.0)
    assert (info["height"], info["width"], info["seed"], info["seeds"]) == (HEIGHT, WIDTH, 7, [7])
    assert info["sampler"] == "DDIM"
    assert {"text", "sampling", "decoding"} <= set(info["timings"])
    assert result.images[0].size == (WIDTH, HEIGHT)
    assert result.latents.shape == (1, 4, HEIGHT // 8, WIDTH // 8)


# --- DDIM inversion ----------------------------------------------------------------------------------------


class GaussianDenoiser(nn.Module):
    """A UNet stand-in: the exact noise prediction when the clean latents are Gaussian, N(0, Σ) per pixel.

    For x_t = √ᾱ·x0 + √(1-ᾱ)·ε with x0 ~ N(0, Σ), the best guess of ε is linear in x_t:
    ε̂ = √(1-ᾱ)·(ᾱΣ + (1-ᾱ)I)⁻¹·x_t. It is as smooth as a noise predictor gets, and inverting it
    lands on unit-variance noise, as a trained model does. Σ mixes the 4 channels (rotation Q).
    """

    def __init__(self, stds=(0.3, 0.6, 1.0, 1.5), seed=0):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)))
        self.register_buffer("root", q @ torch.diag(torch.tensor(stds)))  # Σ = root·rootᵀ
        self.alphas = ddim.alphas_cumprod()
        self.timesteps = []  # every timestep the pipeline asked about, in order

    def forward(self, x, t, context, hook=None):
        self.timesteps.append(int(t))
        a = self.alphas[int(t)]
        m = (1 - a) ** 0.5 * torch.linalg.inv(a * self.root @ self.root.T + (1 - a) * torch.eye(4))
        return torch.einsum("ij,bjhw->bihw", m, x)

    def sample(self, seed=1, size=(8, 8)):
        """A clean latent (1, 4, h, w) drawn from the Gaussian this denoiser was made for."""
        z = torch.randn(1, 4, *size, generator=torch.Generator().manual_seed(seed))
        return torch.einsum("ij,bjhw->bihw", self.root, z)


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_inversion_trajectory_is_aligned_with_the_sampler_timesteps(steps):
    denoiser = GaussianDenoiser()
    sd, x0 = dataclasses.replace(tiny_sd(), unet=denoiser), denoiser.sample()
    trajectory = invert(sd, x0, "", steps=steps, progress=False)
    assert trajectory.timesteps == ddim.ddim_timesteps(steps)
    assert trajectory.latents.shape == (steps, 1, 4, 8, 8)
    assert denoiser.timesteps == trajectory.timesteps[::-1]  # the UNet was asked at 1, 21, …, 981
    assert torch.equal(trajectory.x0, x0)
    # latents[-1] is one inversion step up from the clean latent, at timesteps[-1] = 1
    t_clean, t_first = ddim.ddim_inversion_pairs(steps)[0]
    first = ddim.ddim_invert_step(x0, denoiser(x0, t_first, None), t_clean, t_first, ddim.alphas_cumprod())
    assert (trajectory.latents[-1] - first).abs().max() <= LATENT_TOL * first.abs().max()


def reconstruction_error(sd, x0, prompt, steps):
    """Invert x0, sample back from the noisiest latent with the same steps: the largest |x̂0 - x0|."""
    trajectory = invert(sd, x0, prompt, steps=steps, progress=False)
    back = generate(sd, prompt, steps=steps, guidance=1.0, height=64, width=64, latents=trajectory.latents[0],
                    progress=False).latents
    assert (trajectory.latents[0] - x0).abs().max() > 1.0  # the start latent was really noised
    return (back - x0).abs().max().item()


def test_inverting_then_sampling_back_returns_the_clean_latent_on_a_smooth_model():
    """Measured on GaussianDenoiser, x0 with |x0| ≤ 3.1: error 0.31 (10 steps), 0.14 (25), 0.070 (50).

    Inversion evaluates ε at the latent it leaves instead of the one it reaches: a first-order error,
    so doubling the steps halves it. The bounds leave about 40 %.
    """
    denoiser = GaussianDenoiser()
    sd, x0 = dataclasses.replace(tiny_sd(), unet=denoiser), denoiser.sample()
    errors = {steps: reconstruction_error(sd, x0, "", steps) for steps in (10, 25, 50)}
    assert errors[10] <= 0.45 and errors[25] <= 0.2 and errors[50] <= 0.1
    assert 1.6 <= errors[25] / errors[50] <= 2.4  # first order in the step size


def test_inverting_then_sampling_back_with_the_tiny_unet_at_small_weights_stays_close():
    """The real tiny UNet with its weights × 0.1 (a smooth ε) and a caption: error 0.014 in 10 steps."""
    sd = tiny_sd()
    with torch.no_grad():
        for p in sd.unet.parameters():
            p.mul_(0.1)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert reconstruction_error(sd, x0, "a photo of a cat", steps=10) <= 0.02


# --- seeds, batches, eta -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd():
    """In float64: a batched convolution sums in another order than a single one, and a random UNet
    amplifies fp32's 1e-5 differences over a few steps; in fp64 they vanish when ε is cast to fp32."""
    return tiny_sd(dtype=torch.float64)


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
        want = single.latents[0]
        assert (batch.latents[k] - want).abs().max() <= BATCH_TOL * want.abs().max(), f"image {k}"


def test_images_of_one_batch_differ(sd):
    batch = run(sd, "a cat", num_images=2, seed=0)
    assert (batch.latents[0] - batch.latents[1]).abs().max() > 1e-2


def test_tiled_decode_decodes_the_same_latents_in_tiles(sd, monkeypatch):
    monkeypatch.setattr(vae, "TILE", 4)  # 4-latent tiles every 3: an 8×12 latent is 3 rows of 4
    whole = generate(sd, "a cat", steps=1, height=64, width=96, progress=False)
    tiled = generate(sd, "a cat", steps=1, height=64, width=96, progress=False, tiled_decode=True)
    assert torch.equal(tiled.latents, whole.latents) and tiled.info["tiled_decode"] is True
    want = decode(sd, tiled.latents, tiled=True)
    assert want.shape == (1, 3, 64, 96) and (want - decode(sd, whole.latents)).abs().max() > 1e-3
    assert np.array_equal(np.asarray(tiled.images[0]), np.asarray(to_pil(want)[0]))


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
    (dict(guidance=math.inf), "guidance must be a finite number"),
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
