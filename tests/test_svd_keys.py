"""The spectral split of IP-Adapter's image keys (ALGORITHM_IP_ADAPTER.md B1, invariants B4.3)."""

import gc
import math
import weakref

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
    n, alive = len(svd_keys._SPECTRA), weakref.ref(adapter)
    del adapter
    gc.collect()
    assert alive() is None  # the cache does not keep the adapter alive, so its entry goes with it
    assert len(svd_keys._SPECTRA) <= n - 1  # (other tests' adapters may be collected at the same time)


# --- the rules with numbers worked out by hand (ALGORITHM_IP_ADAPTER.md B1) ------------------------------


GD_SIGMA = [10.0, 7.0, 5.4, 3.0, 2.5, 1.0, 0.5, 0.2]  # 8 values: the median is (3 + 2.5) / 2 = 2.75


@pytest.mark.parametrize("shape", [(8, 20), (20, 8)])
def test_the_gavish_donoho_threshold_is_omega_of_beta_times_the_median_worked_by_hand(shape):
    # β = 8/20 = 0.4: ω = 0.56·0.064 − 0.95·0.16 + 1.82·0.4 + 1.43 = 2.04184; threshold 2.04184 · 2.75 = 5.61506,
    # so σ = 10 and 7 count and 5.4 does not. The lower middle value (2.5) would keep 5.4 (threshold 5.10);
    # β = 1 would drop 7 (7.87); no ω would keep 3 (2.75); the mean (3.7) would drop 7 (7.55).
    assert svd_keys.gavish_donoho_omega(0.4) == pytest.approx(2.04184, abs=1e-12)
    assert svd_keys.split_rank(torch.tensor(GD_SIGMA), shape, rank_rule="gd") == 2
    w = with_spectrum(GD_SIGMA, shape=shape)
    assert svd_keys.split_keys(w, rank_rule="gd").k == 2  # the same through a matrix's own SVD


def test_the_energy_split_takes_the_smallest_rank_reaching_the_share_exactly_at_its_boundary():
    sigma = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0])  # σ² = 9, 4, 1, 1, 1: shares 9/16, 13/16, 14/16, 15/16, 1
    rank = lambda e: svd_keys.split_rank(sigma, (5, 12), rank_energy=e)
    assert (rank(9 / 16), rank(13 / 16), rank(1.0)) == (1, 2, 5)  # exactly reached: that rank
    assert (rank(9 / 16 + 1e-6), rank(13 / 16 + 1e-6), rank(13 / 16 - 1e-6), rank(1e-3)) == (2, 3, 2, 1)


def test_the_floor_is_relative_to_the_largest_singular_value_worked_by_hand():
    sigma = [4.0, 2.0, 0.5, 0.1]  # σ_1 = 4 and ε = 0.2: σ below 0.8 count as 0.8
    w = [4 / 4**2, 2 / 2**2, 0.5 / 0.8**2, 0.1 / 0.8**2]  # σ_i · max(σ_i, ε σ_1)^(−2)
    c = math.sqrt(sum(s * s for s in sigma) / sum(x * x for x in w))  # ‖W̄‖_F = ‖W‖_F
    expected = torch.tensor([c * x for x in w])
    torch.testing.assert_close(svd_keys.style_weights(torch.tensor(sigma), floor=0.2, power=2), expected)
    spec = svd_keys.spectrum(with_spectrum(sigma, shape=(4, 9)))
    inner = spec.U.T @ svd_keys.style_matrix(spec, floor=0.2, power=2) @ spec.Vh.T
    torch.testing.assert_close(inner, torch.diag(expected), rtol=0, atol=1e-5 * c)


# --- where and how the SVDs run (ALGORITHM_IP_ADAPTER.md B1: float32, on the CPU, factors moved after) -------


class ElsewhereWeight:
    """A weight that says it lives on another device (meta) in fp16; its values come to the CPU when asked."""

    def __init__(self, values):
        self.values, self.shape = values, values.shape
        self.device, self.dtype = torch.device("meta"), torch.float16

    def detach(self):
        return self

    def to(self, device, dtype):
        assert torch.device(device).type == "cpu", "the SVD's input must come to the CPU"
        return self.values.to(device, dtype)


def test_a_weight_on_another_device_is_decomposed_on_the_cpu_in_float32_and_its_matrices_go_back(monkeypatch):
    seen, svd = [], torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda a, **kw: seen.append((a.device.type, a.dtype)) or svd(a, **kw))
    keys, values = ElsewhereWeight(weight()), ElsewhereWeight(weight(seed=1))
    split = svd_keys.split_keys(keys)
    assert seen == [("cpu", torch.float32)]
    for m in (split.fg, split.style, svd_keys.filtered_values(values, svd_keys.spectrum(keys), split.k)):
        assert (m.device.type, m.dtype, tuple(m.shape)) == ("meta", torch.float16, (80, 192))
    assert split.sigma.device.type == "cpu" and split.sigma.dtype == torch.float32


def test_a_half_precision_weight_is_decomposed_in_float32():
    w = weight().bfloat16()
    spec = svd_keys.spectrum(w)
    assert spec.S.dtype == torch.float32
    assert_near(spec.U * spec.S @ spec.Vh, w.float())
    split = svd_keys.split_keys(w)
    assert split.fg.dtype == split.style.dtype == torch.bfloat16


def test_the_svds_leave_the_thread_count_alone(monkeypatch):
    before = torch.get_num_threads()

    def refuse(n):
        raise AssertionError("the SVD changed the process's thread count")

    monkeypatch.setattr(torch, "set_num_threads", refuse)
    for shape in SHAPES:
        svd_keys.spectrum(weight(shape))
    assert torch.get_num_threads() == before


def test_the_filtered_values_leave_out_exactly_the_background_directions():
    w_k, w_v = weight(), weight(seed=1)
    spec = svd_keys.spectrum(w_k)
    k = svd_keys.split_rank(spec.S, tuple(w_k.shape))
    filtered = svd_keys.filtered_values(w_v, spec, k)
    v_bg = spec.Vh[k:]
    # blind to V_bg: what W_v reads along V_bg is gone, to float32 rounding of W_v's own size there
    assert (filtered @ v_bg.T).abs().max() <= SVD_TOL * (w_v @ v_bg.T).abs().max()
    kept = torch.randn(192, 192, generator=torch.Generator().manual_seed(2))
    kept = kept - v_bg.T @ (v_bg @ kept)  # vectors with no V_bg component: seen as W_v sees them
    assert_near(filtered @ kept, w_v @ kept)
    # the same projection on the keys gives W_fg (B1: W (I − V_bg V_bgᵀ) = W_fg)
    assert_near(w_k - (w_k @ v_bg.T) @ v_bg, svd_keys.foreground_matrix(spec, k))
    assert svd_keys.filtered_values(w_v, spec, len(spec.S)) is w_v  # k = r: nothing left out
