"""Reference foreground masks (drp/masks.py, ALGORITHM.md §2) on synthetic attention maps.

The synthetic self-attention S is block-structured: a 16×16 token grid cut into five regions (a
square "object" in the middle and four background regions around it: top, bottom, left, right);
tokens of one region attend to their own region far more than to the others, with a little noise.
"""

import pytest
import torch

from drp.masks import foreground_mask, kmeans, normalise, resize_mask, upsample_mask

GRID = (16, 16)
TOL = 1e-6


def regions(h=16, w=16):
    """(h, w) long map: 0 = object (rows/cols 4..11), 1 top, 2 bottom, 3 left, 4 right."""
    r = torch.zeros(h, w, dtype=torch.long)
    r[:4], r[12:] = 1, 2
    r[4:12, :4], r[4:12, 12:] = 3, 4
    return r


def block_self_attention(reg, seed=0, noise=0.05):
    """Row-stochastic S (N, N): each token attends mostly to the tokens of its own region."""
    g = torch.Generator().manual_seed(seed)
    flat = reg.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    logits = 4.0 * same + noise * torch.randn(same.shape, generator=g)
    return logits.softmax(-1)


def object_cross_attention():
    """C at the coarse 8×8 grid, high on the object (coarse cells 2..5), low elsewhere."""
    c = torch.full((8, 8), 0.1)
    c[2:6, 2:6] = 0.9
    return normalise(c)


def test_kmeans_finds_well_separated_blobs():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    x = centres[truth] + 0.5 * torch.randn(60, 2)
    labels = kmeans(x, k=3, seed=0)
    assert torch.equal(labels, truth)  # numbered by first appearance, so the blobs come out as 0, 1, 2


def test_kmeans_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(1)
    x = torch.randn(200, 8)
    state = torch.get_rng_state()
    a = kmeans(x, k=5, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    torch.randn(1000)
    b = kmeans(x, k=5, seed=3)
    assert torch.equal(a, b)
    assert a.dtype == torch.long and a.shape == (200,)
    assert set(a.tolist()) == set(range(5))


def test_kmeans_with_fewer_distinct_points_than_clusters_leaves_the_extra_clusters_empty():
    x = torch.tensor([[0.0], [0.0], [5.0], [5.0], [5.0]])
    labels = kmeans(x, k=4, seed=0)
    assert labels.tolist() == [0, 0, 1, 1, 1]


def test_kmeans_moves_an_empty_cluster_to_the_farthest_point():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    start = torch.tensor([[0.0], [1.0], [100.0]])  # the third centre wins no point at first
    assert kmeans(x, init=start).tolist() == [0, 0, 1, 2]


def test_object_is_found_by_kmeans_and_cross_attention():
    reg = regions()
    mask, how = foreground_mask(object_cross_attention(), block_self_attention(reg), GRID)
    assert how == "kmeans"
    assert mask.dtype == torch.bool and mask.shape == GRID
    assert torch.equal(mask, reg == 0)


def test_cross_attention_at_the_token_grid_also_works():
    reg = regions()
    c = normalise((reg == 0).float() + 0.05 * torch.rand(GRID, generator=torch.Generator().manual_seed(0)))
    mask, how = foreground_mask(c, block_self_attention(reg), GRID)
    assert how == "kmeans" and torch.equal(mask, reg == 0)


def test_a_second_strong_cluster_joins_the_foreground():
    reg = regions()
    c = torch.zeros(GRID)
    c[reg == 0], c[reg == 1] = 1.0, 0.9  # the subject extends into the top region
    mask, how = foreground_mask(c, block_self_attention(reg), GRID)
    assert how == "kmeans" and torch.equal(mask, (reg == 0) | (reg == 1))


def test_degenerate_clustering_falls_back_to_thresholding_cross_attention():
    reg = torch.ones(16, 16, dtype=torch.long)
    reg[0, 0] = 0  # one token alone: a cluster of 1/256 < 2 %
    c = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    mask, how = foreground_mask(normalise(c), block_self_attention(reg), GRID)
    up = torch.nn.functional.interpolate(normalise(c)[None, None], size=GRID, mode="bilinear")[0, 0]
    assert how == "cross-threshold"
    assert torch.equal(mask, up >= 0.3)
    assert 0 < mask.sum() < 256


def test_without_a_subject_the_border_clusters_are_background():
    reg = regions()
    mask, how = foreground_mask(None, block_self_attention(reg), GRID)
    assert how == "border"
    assert torch.equal(mask, reg == 0)


def test_without_a_subject_a_flat_cross_map_is_ignored():
    reg = regions()
    mask, how = foreground_mask(torch.zeros(8, 8), block_self_attention(reg), GRID)
    assert how == "border" and torch.equal(mask, reg == 0)


def test_without_a_subject_and_touching_the_border_everywhere_the_least_bordering_cluster_is_kept():
    # Vertical stripes: every cluster touches the top and bottom rows; the inner stripes do so least.
    reg = torch.arange(16).repeat(16, 1) // 4  # (16, 16): stripes of width 4, labels 0..3
    reg[:, 6:10] = 4  # a fifth stripe in the middle
    mask, how = foreground_mask(None, block_self_attention(reg), GRID)
    on_border = torch.zeros(16, 16, dtype=torch.bool)
    on_border[0], on_border[-1], on_border[:, 0], on_border[:, -1] = True, True, True, True
    assert how == "border"
    assert mask.any()
    # what is kept borders the image no more than the grid does on average
    assert on_border[mask].float().mean() <= on_border.float().mean() + TOL
    assert not mask[:, 0].any() and not mask[:, -1].any()


def test_degenerate_clustering_without_a_subject_keeps_everything():
    s = torch.full((256, 256), 1 / 256)  # every row identical: one cluster
    mask, how = foreground_mask(None, s, GRID)
    assert how == "all-foreground" and mask.all()


def test_mask_is_the_same_whatever_was_computed_before():
    reg_a, reg_b = regions(), regions().T.contiguous()
    s_a, s_b = block_self_attention(reg_a, seed=1), block_self_attention(reg_b, seed=2)
    c = object_cross_attention()
    torch.manual_seed(0)
    first = foreground_mask(c, s_a, GRID)[0], foreground_mask(None, s_b, GRID)[0]
    torch.manual_seed(99)
    second_b = foreground_mask(None, s_b, GRID)[0]
    second_a = foreground_mask(c, s_a, GRID)[0]
    assert torch.equal(first[0], second_a) and torch.equal(first[1], second_b)


def test_wrong_self_attention_shape_is_refused():
    with pytest.raises(ValueError):
        foreground_mask(None, torch.rand(100, 100), GRID)


def test_normalise_maps_to_the_unit_range_and_constant_to_zero():
    m = torch.tensor([[2.0, 4.0], [6.0, 10.0]])
    assert torch.allclose(normalise(m), torch.tensor([[0.0, 0.25], [0.5, 1.0]]), atol=TOL)
    assert torch.equal(normalise(torch.full((3, 3), 7.0)), torch.zeros(3, 3))


def block_aligned_mask(size=128, block=8, seed=0):
    """A random image-resolution mask made of block×block squares."""
    coarse = torch.rand(size // block, size // block, generator=torch.Generator().manual_seed(seed)) > 0.5
    return coarse.float().repeat_interleave(block, 0).repeat_interleave(block, 1)


def test_resized_masks_are_binary_and_agree_across_resolutions():
    mask = block_aligned_mask()  # 128 px, aligned to 8-pixel blocks: exact at 64, 32 and 16
    m64, m32, m16 = (resize_mask(mask, (s, s)) for s in (64, 32, 16))
    for m in (m64, m32, m16):
        assert m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(resize_mask(m64, (32, 32)), m32)
    assert torch.equal(resize_mask(m32, (16, 16)), m16)
    assert torch.equal(m16, mask[::8, ::8])
    assert torch.equal(upsample_mask(m16, (128, 128)), mask)


def test_resize_takes_the_majority_and_handles_odd_sizes():
    mask = torch.zeros(4, 4)
    mask[0, :3] = 1  # the top-left 2×2 cell is 3/4 foreground, the top-right one 1/4
    assert resize_mask(mask, (2, 2)).tolist() == [[1.0, 0.0], [0.0, 0.0]]
    half = torch.zeros(2, 2)
    half[0, 0], half[1, 0] = 1, 1  # exactly half the pixels: ≥ 0.5 counts as foreground
    assert resize_mask(half, (1, 1)).item() == 1.0
    odd = resize_mask(block_aligned_mask(), (33, 20))  # non-integer ratios
    assert odd.shape == (33, 20) and set(odd.unique().tolist()) <= {0.0, 1.0}
    mixed = resize_mask(torch.eye(4), (2, 8))  # shrink one axis, grow the other
    assert mixed.shape == (2, 8)


def test_upsample_repeats_tokens_and_refuses_to_shrink():
    m = torch.tensor([[True, False], [False, True]])
    up = upsample_mask(m, (4, 6))
    assert up.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    with pytest.raises(ValueError):
        upsample_mask(torch.ones(4, 4), (2, 2))
