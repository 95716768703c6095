"""bf16 on the CPU (and fp16 on CUDA) give what fp32 gives, within stated bounds, on tiny random models.

Which places stay fp32, and why nothing in the model files has to force it:
- the timestep's sinusoids are computed from `t.float()` (in bf16, 999 would round to 1000);
- GroupNorm and LayerNorm statistics: PyTorch's CPU kernels accumulate bf16 inputs in fp32 (checked here);
- the softmax of the fused attention kernel accumulates in fp32 (checked here); `attention_probs` upcasts.
bf16 then costs about 0.4 % per rounding: measured on these models, the UNet's output is 1.7 % off fp32
(half of that from rounding the weights alone), the VAE decode 2.3 % (0.6/255 on average in pixels).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from drp.attention import attend
from drp.model_io import load
from drp.pipeline import generate
from tiny import tiny_sd, tiny_weights_dir

ROOT = Path(__file__).resolve().parent.parent
BF16_TOL = 0.02  # relative to the fp32 output's largest magnitude: the bound for bf16
VAE_TOL = 0.03  # the VAE's deep stacks of convolutions: decode 2.3 % measured here, encode 2.15 % with AMX
PIPELINE_TOL = 0.08  # final latents after 4 steps: each step's 2 % feeds the next (4.8 % measured)
PIXEL_MEAN_TOL = 4 / 255  # mean pixel difference of the whole pipeline's images (2.4/255 measured)
NORM_TOL = 0.02  # bf16 norms vs fp32 on the same bf16 inputs: bf16 output rounding only (≈ 2⁻⁸ × |y|)
FP16_TOL = 0.01  # CUDA fp16 has 3 more mantissa bits than bf16


def rel_error(got, expected):
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


@pytest.fixture(scope="module")
def models():
    return tiny_sd(torch.float32), tiny_sd(torch.bfloat16)


@pytest.mark.parametrize("t", [1, 500, 999])
def test_bf16_unet_output_is_within_2_percent_of_fp32(models, t):
    fp32, bf16 = models
    g = torch.Generator().manual_seed(t)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g)
    with torch.no_grad():
        expected = fp32.unet(x, t, context)
        got = bf16.unet(x.bfloat16(), t, context.bfloat16())
    assert got.dtype == torch.bfloat16
    assert rel_error(got, expected) <= BF16_TOL


def test_bf16_vae_encode_and_decode_are_close_to_fp32(models):
    fp32, bf16 = models
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    latent = 3 * torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        assert rel_error(bf16.vae.encode(image.bfloat16()), fp32.vae.encode(image)) <= VAE_TOL
        assert rel_error(bf16.vae.decode(latent.bfloat16()), fp32.vae.decode(latent)) <= VAE_TOL


def test_bf16_text_encoder_is_within_2_percent_of_fp32(models):
    fp32, bf16 = models
    tokens = fp32.tokenizer(["", "a photo of a cat on the beach"])
    with torch.no_grad():
        assert rel_error(bf16.text_encoder(tokens), fp32.text_encoder(tokens)) <= BF16_TOL


def test_bf16_pipeline_gives_nearly_the_fp32_image(models):
    fp32, bf16 = models
    a = generate(fp32, "a cat", steps=4, height=64, width=64, progress=False)
    b = generate(bf16, "a cat", steps=4, height=64, width=64, progress=False)
    assert b.info["dtype"] == "bfloat16" and b.latents.dtype == torch.float32
    assert rel_error(b.latents, a.latents) <= PIPELINE_TOL
    pixels = np.abs(np.asarray(a.images[0], dtype=float) - np.asarray(b.images[0], dtype=float)) / 255
    assert pixels.mean() <= PIXEL_MEAN_TOL


def test_load_in_bf16_gives_bf16_models_that_generate_nearly_the_fp32_image(tmp_path):
    folder = tiny_weights_dir(tmp_path / "weights")
    fp32, bf16 = load(folder, dtype=torch.float32), load(folder, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    for model in (bf16.unet, bf16.vae, bf16.text_encoder):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    a = generate(fp32, "a cat", steps=2, height=64, width=64, progress=False)
    b = generate(bf16, "a cat", steps=2, height=64, width=64, progress=False)
    assert rel_error(b.latents, a.latents) <= PIPELINE_TOL


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_bf16_norm_statistics_are_accumulated_in_fp32(norm):
    # Inputs far from zero over 40,960 values per group: a bf16 running sum would lose the mean entirely.
    g = torch.Generator().manual_seed(0)
    x = (100 + torch.randn(2, 320, 32, 40, generator=g)).bfloat16()
    if norm == "group":
        expected, got = F.group_norm(x.float(), 32, eps=1e-5), F.group_norm(x, 32, eps=1e-5)
    else:
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C), LayerNorm over C as in the transformer blocks
        expected, got = F.layer_norm(tokens.float(), (320,)), F.layer_norm(tokens, (320,))
    assert got.dtype == torch.bfloat16
    assert rel_error(got, expected) <= NORM_TOL


def test_bf16_attention_softmax_over_4096_keys_is_accumulated_in_fp32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4096, 40, generator=g).bfloat16() for _ in range(3))
    expected = F.scaled_dot_product_attention(3 * q.float(), k.float(), v.float())
    got = attend(3 * q, k, v)
    assert rel_error(got, expected) <= BF16_TOL


# The peak as the benchmark reads it (VmHWM: `ru_maxrss` would start at the parent's peak, which Linux
# carries over into a child across exec).
PEAK_SCRIPT = """
    import sys, torch
    from drp.attention import attend, attend_explicit
    from drp.bench.timing import peak_rss_mb
    torch.set_num_threads(2)  # the fused kernel's buffers are per thread: the same bound on any machine
    q = torch.randn(1, 2, 4096, 40).to(getattr(torch, sys.argv[1]))
    def peak():
        return round(peak_rss_mb() * 2**20)  # bytes
    before = peak(); attend(q, q, q); fused = peak() - before
    before = peak(); attend_explicit(q, q, q); explicit = peak() - before
    print(fused, explicit)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from Linux's /proc/self/status")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_attention_over_4096_tokens_never_holds_the_score_matrix(dtype):
    # A fresh process, so that its peak resident memory belongs to these two calls; fused first, as the
    # peak only grows. The explicit path shows that the measurement sees a materialised score matrix.
    scores = 2 * 4096 * 4096 * 4  # bytes of the (1, 2, 4096, 4096) fp32 scores
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(PEAK_SCRIPT), dtype], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    fused, explicit = map(int, out.split())
    assert explicit >= scores
    assert fused <= scores / 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 is a CUDA dtype here; no CUDA device")
def test_fp16_on_cuda_unet_and_vae_are_within_1_percent_of_fp32(models):
    fp32, _ = models
    fp16 = tiny_sd(torch.float32)
    for model in (fp16.unet, fp16.vae):
        model.to("cuda", torch.float16)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g)
    with torch.no_grad():
        got = fp16.unet(x.cuda().half(), 500, context.cuda().half())
        assert rel_error(got.cpu(), fp32.unet(x, 500, context)) <= FP16_TOL
        latent = torch.randn(1, 4, 16, 16, generator=g)
        assert rel_error(fp16.vae.decode(latent.cuda().half()).cpu(), fp32.vae.decode(latent)) <= FP16_TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 is a CUDA dtype here; no CUDA device")
def test_fp16_on_cuda_generates_nearly_the_fp32_image_and_runs_both_references(tmp_path):
    folder = tiny_weights_dir(tmp_path / "weights")
    fp32, fp16 = load(folder, device="cpu", dtype="fp32"), load(folder, device="cuda", dtype="fp16")
    a = generate(fp32, "a cat", steps=4, height=64, width=64, progress=False)
    b = generate(fp16, "a cat", steps=4, height=64, width=64, progress=False)
    assert b.info["dtype"] == "float16" and b.latents.dtype == torch.float32
    assert rel_error(b.latents.cpu(), a.latents) <= PIPELINE_TOL / 2  # fp16: 3 more mantissa bits than bf16
    content = Image.effect_mandelbrot((96, 96), (-2, -1.5, 1, 1.5), 100).convert("RGB")
    style = Image.linear_gradient("L").resize((96, 96)).convert("RGB")
    both = generate(fp16, "a cat on the beach", steps=4, height=64, width=64, content=content, style=style,
                    subject="cat", cache_dir=tmp_path / "cache", progress=False)
    assert torch.isfinite(both.latents).all() and both.images[0].size == (64, 64)
    assert both.info["drp"]["cached"] == {"content": False, "style": False} and 0 < both.info["drp"]["alpha"] < 1
