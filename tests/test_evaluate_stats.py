"""The bootstrap over units (drp/evaluate/stats.py), against the same draws computed by hand in plain Python,
and against intervals that follow from the definition alone."""

import numpy as np

from drp.evaluate.stats import DRAWS, SEED, difference, estimate, units_of

TOL = 1e-12  # float64 means of a few numbers, summed in another order


def by_hand(labels, values, factors):
    """The bootstrap's draw means with plain loops: the draws of stats.py's header, one factor after the other."""
    rng = np.random.default_rng(SEED)
    levels = {f: sorted({label[f] for label in labels}) for f in factors}
    picks = {f: rng.integers(0, len(levels[f]), size=(DRAWS, len(levels[f]))) for f in factors}
    means = []
    for d in range(DRAWS):
        total = count = 0.0
        for label, value in zip(labels, values):
            times = 1
            for f in factors:  # how often this image's units were drawn
                times *= sum(1 for k in picks[f][d] if levels[f][k] == label[f])
            total, count = total + times * value, count + times
        means.append(total / count)
    return np.array(means)


def quantiles(means):
    return np.quantile(means, [0.025, 0.975])


def test_the_interval_over_subjects_equals_the_draws_computed_by_hand():
    table = [("a", 0.10), ("a", 0.30), ("b", 0.60), ("c", 0.20), ("c", 0.25), ("c", 0.45)]  # unequal images
    labels = [dict(subject=s) for s, _ in table]
    values = [v for _, v in table]
    got = estimate(units_of(labels), values)
    assert abs(got["mean"] - sum(values) / len(values)) < TOL and got["images"] == 6
    want = quantiles(by_hand(labels, values, ["subject"]))
    assert np.allclose(got["ci"], want, rtol=0, atol=TOL)


def test_two_subjects_give_the_interval_from_one_subject_alone_to_the_other():
    # the draws are aa, ab, ba, bb: a quarter of them hold one subject only, so the 2.5th percentile is
    # subject a's mean (0.2) and the 97.5th subject b's (0.6); the mean weighs images, not subjects
    labels = [dict(subject="a"), dict(subject="a"), dict(subject="b")]
    got = estimate(units_of(labels), [0.1, 0.3, 0.6])
    assert abs(got["mean"] - 1.0 / 3) < TOL
    assert np.allclose(got["ci"], [0.2, 0.6], rtol=0, atol=TOL)


def test_subjects_and_styles_are_drawn_independently_for_the_dual_benchmark():
    rng = np.random.RandomState(1)
    labels = [dict(subject=s, style=t) for s in ("cat", "dog", "vase") for t in ("scream", "starry") for _ in range(2)]
    values = list(rng.uniform(0, 1, len(labels)))
    units = units_of(labels)
    assert units.count() == {"subject": 3, "style": 2}
    got = estimate(units, values)
    want = quantiles(by_hand(labels, values, ["subject", "style"]))
    assert np.allclose(got["ci"], want, rtol=0, atol=TOL)


def test_a_paired_difference_resamples_the_same_units_for_both_runs():
    labels = [dict(subject=s) for s in ("a", "a", "b", "b", "c")]
    first = [0.20, 0.40, 0.10, 0.30, 0.50]
    second = [0.25, 0.42, 0.30, 0.31, 0.49]
    got = difference(units_of(labels), second, first)
    draws = by_hand(labels, second, ["subject"]) - by_hand(labels, first, ["subject"])
    assert abs(got["mean"] - (np.mean(second) - np.mean(first))) < TOL
    assert np.allclose(got["ci"], quantiles(draws), rtol=0, atol=TOL)
    assert got["excludes_zero"] == (got["ci"][0] > 0 or got["ci"][1] < 0)
    shifted = difference(units_of(labels), [v + 0.01 for v in first], first)  # the same shift on every image
    assert np.allclose(shifted["ci"], [0.01, 0.01], rtol=0, atol=TOL) and shifted["excludes_zero"]
    same = difference(units_of(labels), first, first)
    assert same["ci"] == [0.0, 0.0] and not same["excludes_zero"]


def test_images_without_a_metric_are_left_out_and_a_metric_nobody_has_is_none():
    labels = [dict(style=s) for s in ("x", "x", "y")]
    got = estimate(units_of(labels), [0.5, None, 0.7])
    assert got["images"] == 2 and abs(got["mean"] - 0.6) < TOL and np.allclose(got["ci"], [0.5, 0.7], atol=TOL)
    assert estimate(units_of(labels), [None, None, None]) is None
