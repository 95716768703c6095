"""The spectral split of IP-Adapter's image keys (ALGORITHM_IP_ADAPTER.md B1, invariants B4.3)."""

import gc

import pytest
import torch

from drp import svd_keys
from drp.errors import DrpError

# relative to the largest magnitude of the expected matrix: float32 SVD factors multiplied back, sums of up to
# 192 products (1.9e-6 measured on an AMD EPYC, AVX-512 and AVX2 kernels, 1 and 2 threads)
SVD_TOL = 5e-5
# the properties do not depend on the size; small matrices keep the SVDs quick (one (1280, 768) takes ~1 s
# on two busy cores). Both aspect ratios of SD 1.5's attn2 layers: d < 768 (320, 640) and d > 768 (1280).
SHAPES = [(80, 192), (320, 192)]


def weight(shape=(80, 192), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def assert_near(got, want):
    assert (got - want).abs().max() <= SVD_TOL * want.abs().max()


def with_spectrum(sigma, seed=0, shape=(64, 96)):
    """A matrix with the given singular values and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(shape[0], len(sigma), generator=g))
    V, _ = torch.linalg.qr(torch.randn(shape[1], len(sigma), generator=g))
    return (U * torch.tensor(sigma)) @ V.T


@pytest.mark.parametrize("shape", SHAPES)
def test_the_foreground_and_the_rest_add_up_to_the_weight(shape):
    w = weight(shape)
    spec = svd_keys.spectrum(w)
    split = svd_keys.split_keys(w, spec=spec)
    background = (spec.U[:, split.k:] * spec.S[split.k:]) @ spec.Vh[split.k:]  # the directions left out
    assert_near(split.fg + background, w)
    assert torch.linalg.norm(background) > 0.5 * torch.linalg.norm(split.fg)  # a real split, not W and 0


@pytest.mark.parametrize("energy", [0.1, 0.5, 0.9])
def test_the_foreground_matrix_has_rank_k_and_holds_the_asked_energy(energy):
    w = weight()
    split = svd_keys.split_keys(w, rank_energy=energy)
    assert 1 <= split.k < min(w.shape)
    assert torch.linalg.matrix_rank(split.fg).item() == split.k
    s2 = split.sigma.double() ** 2
    assert s2[: split.k].sum() >= energy * s2.sum() > s2[: split.k - 1].sum()


def test_the_full_energy_keeps_every_direction_and_the_weight_itself():
    w = weight()
    split = svd_keys.split_keys(w, rank_energy=1.0)
    assert split.k == min(w.shape)
    assert split.fg is w


def test_the_gavish_donoho_rule_keeps_the_signal_of_a_low_rank_matrix_plus_noise():
    g = torch.Generator().manual_seed(1)
    signal = with_spectrum([40.0, 30.0, 20.0, 15.0, 10.0], shape=(160, 384))
    noisy = signal + torch.randn(160, 384, generator=g) * 0.05  # noise σ ≤ 0.05·(√384 + √160) ≈ 1.6, threshold ≈ 2
    assert svd_keys.split_keys(noisy, rank_rule="gd").k == 5
    assert svd_keys.split_keys(noisy, rank_energy=0.5).k == 2  # 40² + 30² ≥ half of the energy


def test_the_style_matrix_has_the_weights_singular_vectors_and_norm():
    w = weight()
    spec = svd_keys.spectrum(w)
    style = svd_keys.split_keys(w, spec=spec).style
    assert torch.linalg.norm(style).item() == pytest.approx(torch.linalg.norm(w).item(), rel=1e-5)
    # Uᵀ W̄ V is diagonal, with the weights w_i of the 1/σ re-weighting on its diagonal
    inner = spec.U.T @ style @ spec.Vh.T
    w_i = svd_keys.style_weights(spec.S)
    assert_near(inner, torch.diag(w_i))
    assert torch.all(w_i[1:] >= w_i[:-1])  # p = 2 reverses the order: small σ, large weight


def test_flipping_the_sign_of_a_singular_vector_pair_changes_nothing():
    w = weight()
    spec = svd_keys.spectrum(w)
    flip = torch.ones(len(spec.S))
    flip[[0, 3, 50]] = -1
    flipped = svd_keys.Spectrum(spec.U * flip, spec.S, spec.Vh * flip[:, None])
    assert_near(flipped.U * flipped.S @ flipped.Vh, w)  # still W's SVD
    k = svd_keys.split_rank(spec.S, tuple(w.shape))
    assert_near(svd_keys.foreground_matrix(flipped, k), svd_keys.foreground_matrix(spec, k))
    assert_near(svd_keys.style_matrix(flipped), svd_keys.style_matrix(spec))
    assert not torch.allclose(flipped.U, spec.U)  # the factors did change


@pytest.mark.parametrize("floor, power", [(0.05, 2), (0.2, 2), (0.05, 1), (0.1, 3)])
def test_the_floor_bounds_the_tilt(floor, power):
    sigma = [1.0, 0.5, 0.1, 0.05, 0.01, 1e-4]  # reaches far below the floor
    spec = svd_keys.spectrum(with_spectrum(sigma))
    w_i = svd_keys.style_weights(spec.S, floor, power)
    gain = (w_i / spec.S) / (w_i[0] / spec.S[0])  # each direction's weight relative to W's, against the top one
    assert gain.max().item() == pytest.approx(floor ** -power, rel=1e-4)  # reached by the floored directions
    assert torch.all(gain <= floor ** -power * (1 + 1e-4))
    unbounded = spec.S ** (1 - power) / spec.S[0] ** (1 - power) / (spec.S / spec.S[0])
    assert unbounded.max() > 10 * floor ** -power  # without the floor the tilt would be far larger


def test_power_zero_gives_the_weight_and_power_one_the_polar_factor():
    w = weight()
    spec = svd_keys.spectrum(w)
    assert svd_keys.split_keys(w, spec=spec, power=0).style is w
    assert_near(svd_keys.style_matrix(spec, power=0), w)
    polar = spec.U @ spec.Vh
    style = svd_keys.style_matrix(spec, power=1)  # the floor does not bite: σ_min/σ_max ≈ 0.2 here
    assert spec.S[-1] > 0.05 * spec.S[0]
    scale = torch.linalg.norm(w) / torch.linalg.norm(polar)
    assert_near(style, scale * polar)


def test_bad_split_options_are_refused_with_one_sentence():
    for bad in (dict(rank_energy=0), dict(rank_energy=1.5), dict(rank_rule="median"), dict(floor=0),
                dict(power=-1), dict(rank_energy=True), dict(power=False)):
        kw = dict(rank_energy=0.5, rank_rule="energy", floor=0.05, power=2) | bad
        with pytest.raises(DrpError, match=next(iter(bad))):
            svd_keys.check_split_options(**kw)


class Adapter(torch.nn.Module):
    """Just enough of an IPAdapter for the spectrum cache: key weights by layer name."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.ParameterDict({"a": torch.nn.Parameter(weight(seed=1), requires_grad=False)})

    def key_weight(self, name):
        return self.w[name]


def test_spectra_are_computed_once_per_adapter_kept_off_it_and_redone_after_an_edit():
    adapter = Adapter()
    before = (dict(vars(adapter)), list(adapter.state_dict()))
    first = svd_keys.spectra(adapter, ["a"])["a"]
    assert svd_keys.spectra(adapter, ["a"])["a"] is first  # kept
    assert (dict(vars(adapter)), list(adapter.state_dict())) == before  # nothing on the module
    with torch.no_grad():
        adapter.w["a"].mul_(2)
    again = svd_keys.spectra(adapter, ["a"])["a"]
    assert again is not first and torch.allclose(again.S, 2 * first.S)
    n = len(svd_keys._SPECTRA)
    del adapter
    gc.collect()
    assert len(svd_keys._SPECTRA) == n - 1  # freed with the adapter
