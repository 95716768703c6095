"""The entropy switch (drp/entropy.py, ALGORITHM.md §4 and invariant 3 of §6)."""

import numpy as np
import pytest
from PIL import Image

from drp.entropy import image_entropy, switch_fraction, switch_step
from drp.errors import DrpError

TOL = 1e-9


def uniform_levels(width=512, height=512):
    """A grey image in which every level 0…255 occurs equally often (width·height/256 times)."""
    return np.arange(256, dtype=np.uint8).repeat(width * height // 256).reshape(height, width)


def test_a_constant_image_has_zero_bits():
    assert image_entropy(Image.new("RGB", (300, 200), (40, 90, 200))) == 0.0


def test_every_grey_level_equally_often_gives_eight_bits():
    img = Image.fromarray(uniform_levels(), "L")  # each level 1024 times
    assert abs(image_entropy(img) - 8.0) < TOL


def test_two_equal_halves_give_one_bit():
    arr = np.zeros((512, 512, 3), np.uint8)
    arr[:, 256:] = 255
    assert abs(image_entropy(Image.fromarray(arr)) - 1.0) < TOL


def test_the_entropy_is_measured_on_the_centre_square():
    arr = np.zeros((512, 1024), np.uint8)  # constant sides …
    arr[:, 256:768] = uniform_levels()  # … around a square holding every level equally often
    assert abs(image_entropy(Image.fromarray(arr, "L")) - 8.0) < TOL


def test_grey_conversion_is_itu_r_601_luma():
    # 299/587/114 per mille; 709 weights (2126/7152/722) would give 54, 182, 18
    for rgb, luma in (((255, 0, 0), 76), ((0, 255, 0), 150), ((0, 0, 255), 29)):
        assert Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0)) == luma


def test_other_sizes_are_resized_before_measuring():
    small = Image.fromarray(np.tile(np.array([[0, 255], [255, 0]], np.uint8), (8, 8)), "L")  # 16×16: 1 bit as it is
    grey = np.asarray(small.resize((512, 512), Image.BICUBIC))  # the levels measured: in-between ones at the edges
    p = np.bincount(grey.ravel(), minlength=256) / grey.size
    p = p[p > 0]
    assert len(p) > 2
    assert abs(image_entropy(small) - float(-(p * np.log2(p)).sum())) < TOL


@pytest.mark.parametrize("kappa", [1, 6, 12])
def test_alpha_rises_with_rho_and_stays_within_point_two_and_point_eight(kappa):
    wide = [switch_fraction(h_cu=4.0 * r, h_st=4.0, kappa=kappa) for r in np.geomspace(1e-3, 1e3, 400)]
    assert all(0.2 <= a <= 0.8 for a in wide)
    assert all(b >= a for a, b in zip(wide, wide[1:]))  # far out, α saturates at 0.2 / 0.8
    usual = [switch_fraction(h_cu=4.0 * r, h_st=4.0, kappa=kappa) for r in np.geomspace(0.5, 2.0, 100)]
    assert all(b > a for a, b in zip(usual, usual[1:]))
    assert abs(switch_fraction(5.0, 5.0, kappa=kappa) - 0.5) < TOL  # ρ = 1: the middle


def test_kappa_six_spreads_the_usual_range_of_rho():
    assert abs(switch_fraction(0.86, 1.0) - 0.373) < 1e-3
    assert abs(switch_fraction(1.22, 1.0) - 0.660) < 1e-3


def test_single_reference_defaults_and_no_reference():
    assert switch_fraction(h_cu=7.1) == 0.5
    assert switch_fraction(h_st=6.3) == 0.3
    assert switch_fraction() is None


def test_zero_entropies_are_guarded():
    assert switch_fraction(h_cu=5.0, h_st=0.0) == 0.8  # ρ = ∞
    assert switch_fraction(h_cu=0.0, h_st=0.0) == 0.5  # ρ = 1
    assert switch_fraction(h_cu=0.0, h_st=5.0) == 0.2  # ρ = 0
    assert switch_fraction(h_cu=8.0, h_st=1e-300) == 0.8  # ρ^κ would overflow a float


def test_bad_kappa_or_entropy_is_refused():
    with pytest.raises(DrpError):
        switch_fraction(1.0, 2.0, kappa=-1)
    with pytest.raises(ValueError):
        switch_fraction(-1.0, 2.0)


def test_switch_step_stays_within_one_and_n_minus_one():
    for n in range(2, 101):
        for alpha in np.linspace(0, 1, 41):
            assert 1 <= switch_step(float(alpha), n) <= n - 1
    assert switch_step(0.5, 1) == 1


def test_switch_step_rounds_alpha_times_n():
    assert switch_step(0.5, 50) == 25
    assert switch_step(0.3, 50) == 15
    assert switch_step(0.373, 50) == 19  # 18.65
    assert switch_step(0.5, 5) == 3  # 2.5: halves round up
    assert switch_step(0.8, 3) == 2  # 2.4
    assert switch_step(0.2, 3) == 1  # 0.6 rounds to 1
    assert switch_step(0.0, 10) == 1 and switch_step(1.0, 10) == 9  # clamped
