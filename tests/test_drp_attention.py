"""The attention of DRP-Diff's sampling steps, hook by hook (ALGORITHM.md §2–§3), without a model."""

import math

import pytest
import torch

from drp import dual_reference as dr
from drp.attention import AttnCall, attend
from drp.masks import resize_mask
from references import FG, HW, fake_method, qkv

# relative to the largest magnitude of the expected output: the same float32 attention (sums over a few
# dozen tokens, AdaIN's means and deviations) gathered or batched another way, which may sum in another
# order; above the worst case of such sums (~50 × 2⁻²⁴), 6.6e-8 measured, far below a wrong rule (> 1e-3)
TOL = 1e-5
EPS_TOL = 1e-4  # AdaIN of 2·x equals AdaIN of x only up to the 1e-5 added to the variance (2.8e-6 here)
SELF = "up_blocks.2.attentions.0.transformer_blocks.0.attn1"  # an injected self-attention (default layers)
CROSS = "down_blocks.2.attentions.0.transformer_blocks.0.attn2"  # a cross-attention that makes M_gen


def close(got, want, tol=TOL):
    """The largest difference is within `tol` of the largest magnitude of `want`."""
    return (got - want).abs().max() <= tol * want.abs().max()


def test_adain_gives_each_head_and_channel_the_mean_and_deviation_of_the_reference():
    x = torch.tensor([[1.0, 10.0], [2.0, 10.0], [3.0, 13.0]])[None, None]  # (1, 1, 3 tokens, 2 channels)
    ref = torch.tensor([[0.0, 5.0], [0.0, 5.0], [4.0, 5.0], [4.0, 5.0]])[None, None]
    # channel 0: x mean 2, variance 2/3; ref mean 2, variance 4.  channel 1: x mean 11, variance 2; ref 5, 0
    eps = 1e-5
    expected = torch.tensor([[(v - 2) / math.sqrt(2 / 3 + eps) * math.sqrt(4 + eps) + 2,
                              (w - 11) / math.sqrt(2 + eps) * math.sqrt(0 + eps) + 5]
                             for v, w in ((1, 10), (2, 10), (3, 13))])
    assert close(dr.adain(x, ref)[0, 0], expected)
    two_heads = torch.cat([x, 2 * x], dim=1)  # each head on its own: the second head's x is twice the first's
    assert close(dr.adain(two_heads, torch.cat([ref, ref], dim=1)), torch.cat([dr.adain(x, ref)] * 2, 1), EPS_TOL)


def late_style_only(method, hw, seed=0):
    """The late-stage output of a style-only method for generated rows (2, h, N, d), and its inputs."""
    n = hw[0] * hw[1]
    q, k, v = qkv(2, n, seed)
    kr, vr, qr = qkv(1, n, seed + 1)
    return dr.StepHook(method, 3, late=True).inject(q, k, v, kr, vr, qr, hw), (q, k, v, kr, vr, qr)


def expected_late(inputs, bg, stats):
    """[own ; style background] attention with AdaIN statistics taken over the style tokens `stats`."""
    q, k, v, kr, vr, qr = inputs
    q_a, k_a = dr.adain(q, qr[:, :, stats]), dr.adain(k, kr[:, :, stats])
    k_all = torch.cat([k_a, kr[:, :, bg].expand(2, -1, -1, -1)], dim=2)
    v_all = torch.cat([v, vr[:, :, bg].expand(2, -1, -1, -1)], dim=2)
    return attend(q_a, k_all, v_all)


def test_adain_takes_every_style_token_when_the_background_has_fewer_than_sixteen():
    mask = torch.ones(8, 8)
    mask[:2, :2] = 0  # at the 4×4 grid: one background token, the first
    got, inputs = late_style_only(fake_method(("style",), {"style": mask}), HW)
    assert close(got, expected_late(inputs, bg=[0], stats=list(range(16))))
    assert not close(got, expected_late(inputs, bg=[0], stats=[0]), 1e-3)
    # with enough background tokens (48 of 64 at 8×8), the statistics are the background's alone
    got, inputs = late_style_only(fake_method(("style",), {"style": FG}), (8, 8))
    bg = (resize_mask(FG, (8, 8)).flatten() < 0.5).nonzero().flatten().tolist()
    assert len(bg) == 48 and close(got, expected_late(inputs, bg=bg, stats=bg))


def test_an_automatic_style_mask_with_no_background_lends_the_whole_style_reference_with_a_warning():
    everything = {"style": torch.ones(8, 8)}
    method = fake_method(("style",), everything, rule="all-foreground")
    with pytest.warns(UserWarning, match="no background at the 4×4 attention grid"):
        got, inputs = late_style_only(method, HW)
    assert method.report()["mask_rule"]["style"] == "whole image (no background found)"
    ablation, _ = late_style_only(fake_method(("style",), everything, use_masks=False), HW)
    assert torch.equal(got, ablation)  # the same as giving every style token (the no-masks ablation)
    assert close(got, expected_late(inputs, bg=list(range(16)), stats=list(range(16))))
    user = fake_method(("style",), everything, rule=dr.USER_MASK)  # a user's all-white mask is taken as given
    assert len(user.tokens("style", "bg", HW)) == 0 and user.report()["mask_rule"]["style"] == dr.USER_MASK


def test_content_only_never_applies_adain():
    outputs = []
    for adain in (True, False):
        method = fake_method(("content",), {"content": FG}, adain=adain)
        q, k, v = qkv(2, 16, 0)
        kr, vr, qr = qkv(1, 16, 1)
        outputs.append(dr.StepHook(method, 3, late=True).inject(q, k, v, kr, vr, qr, HW))
    assert torch.equal(*outputs)


@pytest.mark.parametrize("share_uncond", [True, False])
def test_the_unconditional_row_sees_the_references_only_when_shared(share_uncond):
    method = fake_method(("content", "style"), {"content": FG, "style": 1 - FG}, share_uncond=share_uncond)
    q, k, v = qkv(4, 16, 0)  # rows: unconditional, conditional, content, style
    out = dr.StepHook(method, 0, late=False)(None, q, k, v, AttnCall(SELF, False, HW))
    plain = attend(q[:1], k[:1], v[:1])
    injected = dr.StepHook(method, 0, late=False).inject(q[:2], k[:2], v[:2], k[2:], v[2:], q[2:], HW)
    assert close(out[1:2], injected[1:2])  # the conditional row always sees them
    assert torch.equal(out[2:], attend(q[2:], k[2:], v[2:]))  # the references attend to themselves
    if share_uncond:
        assert close(out[:1], injected[:1]) and not close(out[:1], plain, 1e-3)
    else:
        assert torch.equal(out[:1], plain)


def test_the_generated_mask_waits_for_the_warm_up_then_thresholds_the_subject_attention():
    method = fake_method(("content",), {"content": FG}, gen_mask_warmup=2)
    q, _, _ = qkv(3, 16, 0)  # rows: unconditional, conditional, content
    k = torch.randn(3, 2, 77, 4, generator=torch.Generator().manual_seed(1))  # keys of the 77 prompt tokens
    recorded = []
    for step in range(4):
        hook = dr.StepHook(method, step, late=True)
        hook(None, q, k, k, AttnCall(CROSS, True, HW))
        recorded.append(hook.cross_n)
        assert (hook.generated_foreground(HW, 2) is None) == (step < 2)  # None: every query is the subject
    assert recorded == [0, 0, 1, 1]

    subject_map = torch.tensor([[[1.0, 0.0], [0.5, 0.25]]])  # one image; min–max normalised as it is
    for threshold, expected in ((0.3, [[1, 0], [1, 0]]), (0.6, [[1, 0], [0, 0]])):
        hook = dr.StepHook(fake_method(("content",), {"content": FG}, gen_mask_threshold=threshold), 5, late=True)
        hook.cross, hook.cross_n = subject_map, 1
        fine = resize_mask(torch.tensor(expected, dtype=torch.float), HW).flatten() > 0.5
        assert torch.equal(hook.generated_foreground(HW, 2), torch.stack([fine, fine]))
