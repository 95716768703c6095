"""Confidence intervals that count what was sampled: a bootstrap over subjects and style pictures, not images.

Where it sits: `report`. A benchmark's images are not independent draws: the 100 images of one
DreamBench subject share its photos, and a method that fails on one subject fails on all of its
images. What the benchmark samples are its *units* (docs/EVALUATION.md): the subjects (DreamBench),
the style pictures (style benchmark), and both for the dual benchmark, whose items cross every subject
with every style picture. So the interval comes from a bootstrap over units: draw as many units as
there are, with replacement, keep all their images, take the mean; repeat `DRAWS` times; the 2.5th and
97.5th percentiles of those means are the 95 % interval. For two factors (dual) subjects and style
pictures are drawn independently and every image of a drawn (subject, style) pair is kept: the
two-way bootstrap of crossed designs, which counts the variation of both.

A paired difference between two runs over the same items resamples the same units for both runs, so
what the runs share (an easy subject) cancels. The seed is fixed: the same table gives the same digits.

The draws, exactly (tests/test_evaluate_stats.py repeats them by hand): `rng = numpy.random.default_rng(SEED)`;
for each factor in order (subject, then style), `rng.integers(0, U, size=(DRAWS, U))` picks the units
of every draw; a draw's mean weighs each image by how often its units were drawn.
"""

from dataclasses import dataclass

import numpy as np

DRAWS = 2000
SEED = 0
LEVEL = 0.95
FACTORS = ("subject", "style")  # the units of the benchmarks, in the order they are drawn


@dataclass
class Units:
    """Which units each image belongs to, and the bootstrap's draws of them."""

    factors: tuple  # the factors that vary: ("subject",), ("style",) or ("subject", "style")
    levels: dict  # {factor: sorted unit names}
    index: np.ndarray  # (images, factors): each image's unit numbers
    weights: list  # per factor, (DRAWS, units): how often each unit is in each draw

    def count(self):
        """{factor: number of units}."""
        return {f: len(self.levels[f]) for f in self.factors}


def units_of(labels, draws=DRAWS, seed=SEED):
    """`Units` of images labelled [{factor: unit name}], drawn with a fixed seed."""
    factors = tuple(f for f in FACTORS if any(label.get(f) for label in labels))
    levels = {f: sorted({label[f] for label in labels}) for f in factors}
    index = np.array([[levels[f].index(label[f]) for f in factors] for label in labels], dtype=np.int64)
    rng = np.random.default_rng(seed)
    weights = []
    for f in factors:
        n = len(levels[f])
        picks = rng.integers(0, n, size=(draws, n))
        counts = np.zeros((draws, n))
        np.add.at(counts, (np.arange(draws)[:, None], picks), 1)
        weights.append(counts)
    return Units(factors, levels, index.reshape(len(labels), len(factors)), weights)


def cell_sums(units, values):
    """(sum, count) of the values (NaN: missing) per cell of units: arrays shaped by the factors' levels."""
    shape = tuple(len(units.levels[f]) for f in units.factors)
    sums, counts = np.zeros(shape), np.zeros(shape)
    ok = ~np.isnan(values)
    where = tuple(units.index[ok, j] for j in range(len(units.factors)))
    np.add.at(sums, where, values[ok])
    np.add.at(counts, where, 1)
    return sums, counts


def draw_means(units, values):
    """The mean of `values` in each bootstrap draw: (DRAWS,), NaN for a draw with no image."""
    sums, counts = cell_sums(units, values)
    if len(units.factors) == 0:  # nothing varies: every draw is the whole set
        return np.full(DRAWS, sums.sum() / counts.sum() if counts.sum() else np.nan)
    if len(units.factors) == 1:
        num, den = units.weights[0] @ sums, units.weights[0] @ counts
    else:
        a, b = units.weights
        num, den = np.einsum("ds,st,dt->d", a, sums, b), np.einsum("ds,st,dt->d", a, counts, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def interval(means):
    """The central `LEVEL` interval of the draws' means, ignoring draws without images; None without any."""
    means = means[~np.isnan(means)]
    if not len(means):
        return None
    lo, hi = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return [float(lo), float(hi)]


def estimate(units, values):
    """{mean, ci, images} of `values` (a list with None for images without this metric), or None."""
    values = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    n = int((~np.isnan(values)).sum())
    if not n:
        return None
    return dict(mean=float(np.nanmean(values)), ci=interval(draw_means(units, values)), images=n)


def difference(units, values, first):
    """The paired difference `values` − `first` (the same images in the same order): {mean, ci, excludes_zero}."""
    a = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    b = np.array([np.nan if v is None else v for v in first], dtype=np.float64)
    both = ~np.isnan(a) & ~np.isnan(b)
    if not both.any():
        return None
    a[~both], b[~both] = np.nan, np.nan  # the images both runs have this metric for
    ci = interval(draw_means(units, a) - draw_means(units, b))
    return dict(mean=float(np.nanmean(a) - np.nanmean(b)), ci=ci, excludes_zero=bool(ci and (ci[0] > 0 or ci[1] < 0)))
