"""The spectral split of IP-Adapter's image keys: DRP-Diff's two "disentangled matrices" (ALGORITHM_IP_ADAPTER.md B1).

Where it sits: IP-Adapter gives every cross-attention layer (attn2) its own image-key projection
`W = to_k_ip` (d × 768). The logit of a query q and an image token c is

    qᵀ W c = Σ_i σ_i (qᵀ u_i)(v_iᵀ c)          with  W = U diag(σ) Vᵀ  (thin SVD, σ descending)

so each singular direction v_i of the token space carries its own weight σ_i. DRP-Diff reads the
large-σ directions as the foreground (the subject's texture) and the small-σ ones as the background:

    W_fg = U_k diag(σ_1…σ_k) V_kᵀ                         customized texture-disentangled matrix
    W̄   = c · U diag(w) Vᵀ,  w_i = σ_i · max(σ_i, ε σ_1)^(−p)   style-disentangled matrix (1/σ for p = 2)

k is the smallest rank holding a fraction e of the energy Σσ², or the Gavish–Donoho threshold;
c keeps ‖W̄‖_F = ‖W‖_F so the softmax temperature stays that of the adapter. The floor ε bounds the
re-weighting: a direction's gain relative to W's (w_i/σ_i against w_1/σ_1) grows by at most ε^(−p), so
for p = 2 no weight w_i exceeds 1/ε = 20 times w_1. Values (`to_v_ip`) are left as they are, except
under the ablation `filter_values`: `W_v (I − V_bg V_bgᵀ)` with V_bg = V_{k+1…r}, the directions W_fg
leaves out (`filtered_values`), so that values, like keys, see only the tokens' foreground components.

Where a knob keeps W as it is (k = r, or p = 0), W itself is returned, not its reconstruction from
the factors, so "e = 1, p = 0" is plain IP-Adapter to the last bit.

The SVDs (16 layers, float32, thin) run on the CPU whatever the model's device (LAPACK's SVD is the
same everywhere; Apple's MPS backend has had wrong SVDs), under the process's own thread setting, which
they leave untouched; the matrices made from them then move to the weight's device and dtype. They are
computed once per loaded adapter and kept in memory beside it
in a `WeakKeyDictionary` keyed by the adapter module: nothing is stored on the module (its
parameters, buffers and attributes stay as loaded, so `state_dict` and the next run are untouched),
and the entry goes when the adapter is freed. An entry remembers the version counters of the weights
it came from, so weights changed in place are decomposed again.
"""

import weakref
from dataclasses import dataclass

import torch

from .errors import DrpError

RANK_RULES = ("energy", "gd")


@dataclass(frozen=True)
class Spectrum:
    """The thin SVD of one layer's key projection, float32, on the CPU: W = U diag(S) Vh."""

    U: torch.Tensor  # (d, r)
    S: torch.Tensor  # (r,) descending
    Vh: torch.Tensor  # (r, 768)


@dataclass(frozen=True)
class KeySplit:
    """One attn2 layer's two key matrices and the split that made them."""

    k: int  # the foreground rank
    sigma: torch.Tensor  # (r,) the singular values, for the report
    fg: torch.Tensor  # (d, 768) W_fg, in W's dtype and device
    style: torch.Tensor  # (d, 768) W̄


def spectrum(weight):
    """The thin SVD of a (d, 768) weight, in float32 on the CPU whatever the weight's device and dtype.

    The global thread count is left alone: changing it for the call is not undone on every build
    (PyTorch's native thread pool accepts one setting per process), and threads set by the user or by
    torchrun are theirs to choose.
    """
    w = weight.detach().to("cpu", torch.float32)
    return Spectrum(*torch.linalg.svd(w, full_matrices=False))


def gavish_donoho_omega(beta):
    """ω(β) of Gavish & Donoho (2014), the optimal hard threshold over the median singular value,
    for noise of unknown level and aspect ratio β ≤ 1 (their cubic fit, exact to about 2 %)."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def split_rank(sigma, shape, rank_energy=0.5, rank_rule="energy"):
    """k: how many of the leading singular directions count as foreground (at least 1)."""
    r = len(sigma)
    s = sigma.double()
    if rank_rule == "gd":
        beta = min(shape) / max(shape)
        median = s.quantile(0.5)  # the mean of the two middle values for an even count (torch's median takes the lower)
        k = int((s > gavish_donoho_omega(beta) * median).sum())
    else:  # the smallest k with Σ_{i≤k} σ_i² ≥ e · Σ σ_i²; the relative slack absorbs rounding at e = 1
        energy = (s**2).cumsum(0)
        k = int((energy < rank_energy * energy[-1] * (1 - 1e-9)).sum()) + 1
    return min(max(k, 1), r)


def foreground_matrix(spec, k):
    """W_fg = U_k diag(σ_1…σ_k) V_kᵀ, float32 (d, 768)."""
    return (spec.U[:, :k] * spec.S[:k]) @ spec.Vh[:k]


def style_weights(sigma, floor=0.05, power=2):
    """w_i = σ_i · max(σ_i, ε σ_1)^(−p), scaled so that ‖w‖ = ‖σ‖ (then ‖W̄‖_F = ‖W‖_F)."""
    w = sigma * sigma.clamp(min=floor * sigma[0]) ** (-power)
    return w * (sigma.norm() / w.norm())


def style_matrix(spec, floor=0.05, power=2):
    """W̄ = c · U diag(w) Vᵀ, float32 (d, 768)."""
    return (spec.U * style_weights(spec.S, floor, power)) @ spec.Vh


def filtered_values(value_weight, spec, k):
    """W_v (I − V_bg V_bgᵀ), V_bg = V_{k+1…r}: the values of the `filter_values` ablation, in W_v's device and dtype.

    As W (I − V_bg V_bgᵀ) = W_fg, keys and values then both ignore a token's components along the
    directions W_fg leaves out. Directions outside W's row space (768 − r of them when d < 768) are kept,
    as W_fg keeps them. With k = r nothing is left out, and W_v itself is returned.
    """
    if k == len(spec.S):
        return value_weight
    w_v, v_bg = value_weight.detach().to("cpu", torch.float32), spec.Vh[k:]  # (d, 768), (r − k, 768)
    return (w_v - (w_v @ v_bg.T) @ v_bg).to(value_weight.device, value_weight.dtype)


def is_number(value):
    """A real number, not True/False (which Python counts as 1 and 0)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_split_options(rank_energy, rank_rule, floor, power):
    """One sentence for the first bad knob of the split."""
    if rank_rule not in RANK_RULES:
        raise DrpError(f"rank_rule must be \"energy\" or \"gd\" (Gavish–Donoho), got {rank_rule!r}.")
    if not is_number(rank_energy) or not 0 < rank_energy <= 1:
        raise DrpError(f"rank_energy must be a number in (0, 1] (the share of Σσ² kept; 0.5 is the default), "
                       f"got {rank_energy!r}.")
    if not is_number(floor) or not 0 < floor <= 1:
        raise DrpError(f"floor must be a number in (0, 1] (0.05 bounds the tilt to 20×), got {floor!r}.")
    if not is_number(power) or not 0 <= power <= 4:
        raise DrpError(f"power must be a number from 0 to 4 (2 is the 1/σ re-weighting, 0 keeps W), got {power!r}.")


def split_keys(weight, spec=None, rank_energy=0.5, rank_rule="energy", floor=0.05, power=2):
    """`KeySplit` of one layer's `to_k_ip` weight (d, 768); `spec` its `spectrum` if already known."""
    spec = spectrum(weight) if spec is None else spec
    k = split_rank(spec.S, tuple(weight.shape), rank_energy, rank_rule)
    fg = weight if k == len(spec.S) else foreground_matrix(spec, k).to(weight.device, weight.dtype)
    style = weight if power == 0 else style_matrix(spec, floor, power).to(weight.device, weight.dtype)
    return KeySplit(k, spec.S, fg, style)


# adapter module -> {layer name: (weight version, Spectrum)}; see the header for why it lives here
_SPECTRA = weakref.WeakKeyDictionary()


def spectra(adapter, layers):
    """{layer: Spectrum} of the adapter's key projections, decomposed once per adapter and kept beside it."""
    known = _SPECTRA.setdefault(adapter, {})
    out = {}
    for name in layers:
        weight = adapter.key_weight(name)
        version = (weight.data_ptr(), weight._version)  # changes when the weight is replaced or edited in place
        if name not in known or known[name][0] != version:
            known[name] = (version, spectrum(weight))
        out[name] = known[name][1]
    return out
