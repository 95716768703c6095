"""DRP-Diff's invariants (ALGORITHM.md §6) on a tiny random model."""

import math

import pytest
import torch
from PIL import Image

import drp
from drp import dual_reference as dr
from drp.attention import attend
from drp.errors import DrpError
from references import FG, HW, PROMPT, drp_sd, fake_method, picture, qkv

SIZE, STEPS = 64, 6
# relative to the largest magnitude of the expected attention output: the same float32 attention with its
# keys gathered instead of masked, or two outputs blended, sums in another order (1.1e-7 measured; the
# worst case of sums over ~50 keys is ~3e-6)
ATTENTION_TOL = 1e-5


@pytest.fixture(scope="module")
def sd():
    return drp_sd()


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One trajectory cache for the module: each reference is inverted once, not once per test."""
    return tmp_path_factory.mktemp("trajectories")


def run(sd, cache_dir, **kw):
    kw.setdefault("cache_dir", cache_dir)
    return drp.generate(sd, PROMPT, steps=STEPS, height=SIZE, width=SIZE, seed=3, progress=False, **kw)


def close(got, want):
    """The largest difference is within ATTENTION_TOL of the largest magnitude of `want`."""
    return (got - want).abs().max() <= ATTENTION_TOL * want.abs().max()


def unet_batches(sd):
    """Start recording the batch size of every UNet call; returns (the list, the hook handle to remove)."""
    batches = []
    return batches, sd.unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))


def test_no_reference_equals_plain_text_to_image_bit_for_bit_and_black_masks_cost_no_inversion(sd, tmp_path):
    plain = run(sd, tmp_path)
    black = Image.new("L", (10, 10), 0)
    batches, handle = unet_batches(sd)
    try:
        with pytest.warns(UserWarning, match="all black"):
            empty = run(sd, tmp_path, content=picture(1), style=picture(2), subject="cat", content_mask=black,
                        style_mask=black)
    finally:
        handle.remove()
    assert torch.equal(plain.latents, empty.latents)
    assert batches == [2] * STEPS  # the plain loop's calls only: no reference was inverted or replayed
    assert empty.masks == {} and "drp" not in empty.info


def test_each_mode_runs_and_differs_from_plain(sd, shared_cache):
    plain = run(sd, shared_cache).latents
    for kw in (dict(content=picture(1), subject="cat"), dict(style=picture(2)),
               dict(content=picture(1), style=picture(2), subject="cat")):
        result = run(sd, shared_cache, **kw)
        assert not torch.equal(result.latents, plain)
        report = result.info["drp"]
        assert 1 <= report["switch_step"] <= STEPS - 1
        for kind in ("content", "style"):
            if kind in kw:
                mask = result.masks[kind]
                assert mask.shape == (SIZE, SIZE) and set(mask.unique().tolist()) <= {0.0, 1.0}


def test_switch_step_follows_the_entropies_and_the_overrides(sd, shared_cache):
    both = run(sd, shared_cache, content=picture(1), style=picture(2), subject="cat").info["drp"]
    rho = both["H_cu"] / both["H_st"]
    assert both["rho"] == pytest.approx(rho)
    assert both["alpha"] == pytest.approx(0.2 + 0.6 * rho**6 / (1 + rho**6))
    assert run(sd, shared_cache, content=picture(1), subject="cat").info["drp"]["alpha"] == 0.5
    assert run(sd, shared_cache, style=picture(2)).info["drp"]["alpha"] == 0.3
    assert run(sd, shared_cache, style=picture(2), switch_step=4).info["drp"]["switch_step"] == 4
    with pytest.raises(DrpError, match="switch_step"):
        run(sd, shared_cache, style=picture(2), switch_step=STEPS + 1)


def test_replay_feeds_the_stored_inversion_latents_exactly(sd, shared_cache, monkeypatch):
    seen, unet = [], sd.unet

    class Spy(torch.nn.Module):
        def forward(self, x, t, context, hook=None):
            seen.append((t, x[2:].clone()))
            return unet(x, t, context, hook)

    caption = "a photo of a cat"
    trajectory = drp.invert(sd, drp.images.fit(picture(1), SIZE, SIZE), caption, STEPS, SIZE, SIZE, progress=False)
    monkeypatch.setattr(sd, "unet", Spy())
    run(sd, shared_cache, content=picture(1), subject="cat", use_cache=False)
    sampling = seen[-STEPS:]
    assert [t for t, _ in sampling] == trajectory.timesteps
    for i, (_, rows) in enumerate(sampling):
        assert torch.equal(rows, trajectory.latents[i])


def test_a_cached_rerun_skips_inversion_and_gives_the_same_image(sd, tmp_path):
    first = run(sd, tmp_path, content=picture(1), style=picture(2), subject="cat")
    second = run(sd, tmp_path, content=picture(1), style=picture(2), subject="cat")
    assert first.info["drp"]["cached"] == {"content": False, "style": False}
    assert second.info["drp"]["cached"] == {"content": True, "style": True}
    assert first.info["timings"]["inversion"] > 0 and second.info["timings"]["inversion"] == 0
    assert torch.equal(first.latents, second.latents)


def test_gathered_attention_equals_minus_infinity_masked_attention(sd):
    method = fake_method(("content", "style"), {"content": FG, "style": 1 - FG})
    q, k, v = qkv(2, 16, 0)
    kr, vr, qr = qkv(2, 16, 1)
    hook = dr.StepHook(method, 0, late=False)
    got = hook.inject(q, k, v, kr, vr, qr, HW)
    fg_cu = dr.masks.resize_mask(FG, HW).flatten() > 0.5
    fg_st = ~fg_cu
    keys = torch.cat([k, kr[:1].expand(2, -1, -1, -1), kr[1:].expand(2, -1, -1, -1)], dim=2)
    values = torch.cat([v, vr[:1].expand(2, -1, -1, -1), vr[1:].expand(2, -1, -1, -1)], dim=2)
    bias = torch.cat([torch.zeros(16), torch.where(fg_cu, math.log(2), -math.inf), torch.where(fg_st, 0.0, -math.inf)])
    expected = attend(q, keys, values, bias[None])
    assert close(got, expected)


@pytest.mark.parametrize("late", [False, True])
def test_excluded_reference_tokens_never_reach_a_generated_query(sd, late):
    method = fake_method(("content", "style"), {"content": FG, "style": FG})
    hw = (8, 8)  # 48 style background tokens: AdaIN takes its statistics from them alone (ALGORITHM §3)
    q, k, v = qkv(2, 64, 0)
    kr, vr, qr = qkv(2, 64, 1)
    hook = dr.StepHook(method, 10, late=late)
    hook.cross, hook.cross_n = torch.tensor([[[1.0, 0.0], [0.2, 0.6]]]), 1  # a known generated subject mask
    assert hook.generated_foreground(hw, 2).any() and not hook.generated_foreground(hw, 2).all()
    before = hook.inject(q, k, v, kr, vr, qr, hw)
    fg = dr.masks.resize_mask(FG, hw).flatten() > 0.5
    # early: no background token of either reference; late: no content background, no style foreground
    cu_excluded = ~fg
    st_excluded = ~fg if not late else fg
    kr2, vr2, qr2 = kr.clone(), vr.clone(), qr.clone()
    torch.manual_seed(0)
    for row, excluded in ((0, cu_excluded), (1, st_excluded)):
        for t in (kr2, vr2, qr2):
            t[row, :, excluded] = torch.randn_like(t[row, :, excluded]) * 10
    after = hook.inject(q, k, v, kr2, vr2, qr2, hw)
    assert torch.equal(before, after)
    # and the included tokens do matter
    kr2[1, :, ~st_excluded] += 5
    assert not torch.equal(before, hook.inject(q, k, v, kr2, vr2, qr2, hw))


def test_injection_touches_only_the_configured_layers_and_leaves_no_state(sd, shared_cache, monkeypatch):
    state = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    attrs = {name: set(vars(m)) for name, m in sd.unet.named_modules()}
    changed = set()
    real_hook = dr.DualReference.hook

    def spying_hook(self, i, late):
        inner = real_hook(self, i, late)

        def hook(attn, q, k, v, call):
            out = inner(attn, q, k, v, call)
            if not torch.equal(out, attend(q, k, v)):
                changed.add(call.name)
            return out
        return hook

    monkeypatch.setattr(dr.DualReference, "hook", spying_hook)
    run(sd, shared_cache, content=picture(1), style=picture(2), subject="cat", layers="up_blocks.3")
    assert changed and all(n.startswith("up_blocks.3.") and n.endswith("attn1") for n in changed)
    assert all(torch.equal(v, state[k]) for k, v in sd.unet.state_dict().items())
    assert {name: set(vars(m)) for name, m in sd.unet.named_modules()} == attrs


def test_reference_masks_do_not_depend_on_the_batch_and_each_image_has_its_generated_mask(sd, shared_cache):
    kw = dict(content=picture(1), style=picture(2), subject="cat")
    one = run(sd, shared_cache, **kw)
    many = drp.generate(sd, ["a dog and a cat", PROMPT], steps=STEPS, height=SIZE, width=SIZE, progress=False,
                        use_cache=False, **kw)  # inverted afresh, in a batch of two prompts
    assert many.info["drp"]["cached"] == {"content": False, "style": False}
    for kind in ("content", "style"):
        assert torch.equal(one.masks[kind], many.masks[kind])
    generated = many.masks["generated"]  # one subject mask per image, in the batch's order
    assert generated.shape == (2, SIZE, SIZE) and set(generated.unique().tolist()) <= {0.0, 1.0}
    assert many.info["drp"]["coverage"]["generated"] == generated.mean(dim=(1, 2)).tolist()


def test_a_subject_missing_from_the_prompt_is_an_error_naming_its_words(sd, shared_cache):
    with pytest.raises(DrpError, match="'beach,'"):
        run(sd, shared_cache, content=picture(1), subject="dog")


def test_user_masks_override_the_automatic_ones(sd, shared_cache):
    mask = Image.new("L", (12, 6), 0)
    mask.paste(255, (0, 0, 6, 6))  # centre-cropped to its middle 6×6: the left half is white
    result = run(sd, shared_cache, content=picture(1), subject="cat", content_mask=mask)
    assert result.info["drp"]["mask_rule"]["content"] == "user mask"
    left_half = torch.zeros(SIZE, SIZE)
    left_half[:, : SIZE // 2] = 1
    assert torch.equal(result.masks["content"], left_half)


def test_a_subject_without_a_content_reference_warns_that_nothing_uses_it(sd, shared_cache):
    with pytest.warns(UserWarning, match="without a content reference, so nothing uses it;") as caught:
        result = run(sd, shared_cache, style=picture(2), subject="cat")
    assert not any("generated mask" in str(w.message) for w in caught)
    assert result.info["drp"]["alpha"] == 0.3
    assert torch.equal(result.latents, run(sd, shared_cache, style=picture(2)).latents)


def test_an_all_white_style_mask_warns_that_no_background_is_left(sd, shared_cache):
    with pytest.warns(UserWarning, match="all white"):
        result = run(sd, shared_cache, style=picture(2), style_mask=Image.new("L", (3, 3), 255))
    assert result.info["drp"]["coverage"]["style"] == 1.0


def test_split_attention_equals_blending_the_two_outputs_by_the_subject_mask():
    q, k, v = qkv(2, 16, 0)
    k_fore, v_fore, _ = qkv(2, 24, 1)
    fg = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) > 0.5
    got = dr.attend_split(q, fg, (k_fore, v_fore), (k, v))
    m = fg[:, None, :, None].float()
    expected = m * attend(q, k_fore, v_fore) + (1 - m) * attend(q, k, v)
    assert close(got, expected)


def test_each_reference_caption_is_encoded_once_whether_inverted_or_cached(sd, tmp_path):
    batches = []
    handle = sd.text_encoder.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        for _ in range(2):  # inverting both references, then reading them from the cache
            batches.clear()
            run(sd, tmp_path, content=picture(1), style=picture(2), subject="cat")
            assert sorted(batches) == [1, 1, 2]  # each reference's caption, then negative + prompt
    finally:
        handle.remove()
