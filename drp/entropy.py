"""The entropy switch of DRP-Diff: when the early stage hands over to the late stage (ALGORITHM.md §4).

Where it sits in DRP-Diff: sampling runs N DDIM steps; steps i < N_e are the *early stage*
(the generated image borrows the foreground texture of both references), steps i ≥ N_e the *late
stage* (the style reference's background restyles the subject). N_e is chosen before sampling from
the grey-level entropies of the two references:

    H   = −Σ p log₂ p over the 256-bin grey histogram            (bits, 0 … 8)
    ρ   = H_cu / H_st                                             customized vs style reference
    α   = 0.2 + 0.6 · ρ^κ / (1 + ρ^κ)                             κ = 6
    N_e = clamp(round(α · N), 1, N − 1)

A detailed (high-entropy) subject photo next to a plain painting gives ρ > 1: the early stage lasts
longer so the subject's texture settles before the style takes over; a busy painting next to a plain
subject gives ρ < 1 and an earlier switch. α stays in [0.2, 0.8], so each stage keeps at least a fifth
of the steps.

Why κ = 6: on real photo/painting pairs ρ lies between about 0.86 and 1.22 for 90 % of pairs. The
plain ratio (κ = 1) maps that range to α ≈ 0.48–0.53, a switch that hardly moves; ρ^κ/(1+ρ^κ) is
the logistic function of κ·ln ρ, and κ = 6 spreads the same range to α ≈ 0.37–0.66 while ρ = 1
still gives the middle, α = 0.5.
"""

import math

import numpy as np

from .errors import DrpError
from .images import fit, load_image

ENTROPY_SIZE = 512  # every image is measured at 512×512, so entropies of different sizes compare
ALPHA_CONTENT_ONLY = 0.5  # only a customized reference: switch half way
ALPHA_STYLE_ONLY = 0.3  # only a style reference: its background restyles the subject from 30 % of the steps on


def image_entropy(img):
    """Grey-level entropy of a picture (PIL image or path) in bits: 0 (constant) … 8 (all levels equally often).

    Centre-crop to a square and resize to 512², then 8-bit grey with PIL's convert("L"), which is
    ITU-R 601-2 luma L = (299·R + 587·G + 114·B) / 1000 (tests/test_entropy.py checks the weights).
    """
    img = load_image(img, "reference image")
    if img.size != (ENTROPY_SIZE, ENTROPY_SIZE):
        img = fit(img, ENTROPY_SIZE, ENTROPY_SIZE)
    counts = np.bincount(np.asarray(img.convert("L")).ravel(), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns −0.0 (a constant image) into 0.0


def switch_fraction(h_cu=None, h_st=None, kappa=6):
    """α, the fraction of the steps spent in the early stage; None when there is no reference at all.

    Both entropies: α = 0.2 + 0.6·ρ^κ/(1+ρ^κ) with ρ = H_cu/H_st (H_st = 0 counts as ρ = ∞, and both 0
    as ρ = 1). Only the customized reference: 0.5. Only the style reference: 0.3.
    """
    if not isinstance(kappa, (int, float)) or not kappa >= 0 or math.isinf(kappa):
        raise DrpError(f"kappa must be a finite number ≥ 0 (6 is the default), got {kappa!r}.")
    for name, h in (("h_cu", h_cu), ("h_st", h_st)):
        if h is not None and not h >= 0:
            raise ValueError(f"{name} must be an entropy ≥ 0 in bits, got {h!r}")
    if h_cu is None and h_st is None:
        return None
    if h_st is None:
        return ALPHA_CONTENT_ONLY
    if h_cu is None:
        return ALPHA_STYLE_ONLY
    if h_st == 0:
        return 0.5 if h_cu == 0 else 0.8  # ρ = 1 (two constant images) or ρ = ∞
    if h_cu == 0:
        return 0.2  # ρ = 0
    # ρ^κ / (1 + ρ^κ) written as the logistic function of κ·ln ρ, which cannot overflow.
    z = kappa * math.log(h_cu / h_st)
    s = 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))
    return 0.2 + 0.6 * s


def switch_step(alpha, steps):
    """N_e = clamp(round(α·N), 1, N − 1): the first late-stage step (halves round up); 1 when N = 1."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number ≥ 1, got {steps!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if steps == 1:
        return 1
    return min(max(math.floor(alpha * steps + 0.5), 1), steps - 1)
