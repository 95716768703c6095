"""DRP-Diff's options and fallbacks end to end on a tiny model: cache keys, ablations, masks, sizes, the report.

Two steps at 64 px keep each run short: step 0 is the early stage, step 1 the late one.
"""

import math

import pytest
import torch
from PIL import Image

import drp
from drp import dual_reference as dr
from drp import entropy, masks
from drp.errors import DrpError
from drp.png_info import parameters_text
from drp.report import text_lines
from references import PROMPT, drp_sd, picture

SIZE, STEPS = 64, 2
CONTENT = dict(content=picture(1), subject="cat")
STYLE_WITH_CAPTION = dict(style=picture(2), style_caption="a painting of a cat")


@pytest.fixture(scope="module")
def sd():
    return drp_sd()


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("trajectories")


def prepare(sd, cache_dir=None, **kw):
    """The prepared references of a run (inversion, masks, report), without sampling."""
    kw = dict(kw, cache_dir=cache_dir) if cache_dir else dict(kw, use_cache=False)
    return dr.prepare(sd, [PROMPT], steps=STEPS, height=SIZE, width=SIZE, progress=False, **kw)


def run(sd, cache_dir, **kw):
    kw.setdefault("cache_dir", cache_dir)
    kw.setdefault("height", SIZE)
    kw.setdefault("steps", STEPS)
    return drp.generate(sd, PROMPT, width=SIZE, seed=3, progress=False, **kw)


# What a cache entry holds depends on each of these (ALGORITHM.md §1). Each case: the run that fills the
# cache (its model's dtype, its settings), then the run that must not read that entry.
CACHE_CASES = {
    "record_t": (torch.float32, dict(CONTENT, record_t=(0, 0)), CONTENT),  # nothing recorded
    "mask_layers": (torch.float32, dict(CONTENT, mask_layers=()), CONTENT),  # no cross-attention map
    "self_layer": (torch.float32, dict(CONTENT, self_layer="up_blocks.3.attentions.2.transformer_blocks.0.attn1"),
                   CONTENT),  # S at the 8×8 grid instead of 4×4
    "subject tokens": (torch.float32, STYLE_WITH_CAPTION, dict(STYLE_WITH_CAPTION, subject="cat")),
    "compute dtype": (torch.float64, CONTENT, CONTENT),
}


@pytest.mark.filterwarnings("ignore:a subject was given without a content reference")
@pytest.mark.parametrize("case", CACHE_CASES)
def test_a_cached_rerun_equals_an_uncached_run_whatever_the_first_run_changed(sd, tmp_path, case):
    dtype, first, second = CACHE_CASES[case]
    prepare(drp_sd(dtype) if dtype != torch.float32 else sd, tmp_path, **first)
    cached = prepare(sd, tmp_path, **second)
    fresh = prepare(sd, **second)
    for kind, ref in fresh.refs.items():
        got = cached.refs[kind]
        assert torch.equal(got.latents, ref.latents) and torch.equal(got.mask, ref.mask)
        assert (got.rule, got.cached) == (ref.rule, False)  # inverted again: the first run's entry did not match


def test_an_automatic_style_mask_with_nothing_recorded_lends_the_whole_style_in_the_late_stage(sd, shared_cache):
    with pytest.warns(UserWarning, match="no background at the"):
        result = run(sd, shared_cache, style=picture(2), record_t=(0, 0))  # no attention recorded: all foreground
    assert result.info["drp"]["mask_rule"]["style"] == "whole image (no background found)"
    assert result.info["drp"]["switch_step"] == 1  # so the late stage ran, with the whole style as background
    ablation = run(sd, shared_cache, style=picture(2), record_t=(0, 0), use_masks=False)
    assert torch.equal(result.latents, ablation.latents)  # every style token, as the no-masks ablation gives


def test_degenerate_clusterings_fall_back_to_the_cross_attention_or_to_everything(sd, shared_cache, monkeypatch):
    monkeypatch.setattr(masks, "kmeans", lambda x, k=5, seed=0: torch.zeros(x.shape[0], dtype=torch.long))
    method = prepare(sd, shared_cache, style=picture(2), **CONTENT)  # one cluster: degenerate
    assert method.report()["mask_rule"] == {"content": "cross-threshold", "style": "all-foreground"}
    content = method.refs["content"].mask
    assert 0 < content.mean() < 1 and torch.equal(method.refs["style"].mask, torch.ones(SIZE, SIZE))
    with pytest.warns(UserWarning, match="the whole style reference"):
        assert len(method.tokens("style", "bg", (4, 4))) == 16
    assert method.report()["mask_rule"]["style"] == "whole image (no background found)"


def test_a_style_reference_without_a_caption_takes_the_border_rule_at_a_non_square_size(sd, shared_cache):
    result = run(sd, shared_cache, style=picture(2), height=96, gen_mask_warmup=0, **CONTENT)
    report = result.info["drp"]
    assert report["mask_rule"] == {"content": "kmeans", "style": "border"}
    assert result.latents.shape == (1, 4, 12, 8) and result.images[0].size == (SIZE, 96)
    for name in ("content", "style"):
        mask = result.masks[name]
        assert mask.shape == (96, SIZE) and 0 < mask.mean() < 1 and set(mask.unique().tolist()) == {0.0, 1.0}
    assert result.masks["generated"].shape == (1, 96, SIZE)


def test_no_masks_gives_every_reference_token_as_all_white_masks_do_in_the_early_stage(sd, shared_cache):
    both = dict(style=picture(2), switch_step=STEPS, **CONTENT)  # early stage only
    ablation = run(sd, shared_cache, use_masks=False, **both)
    assert ablation.info["drp"]["mask_rule"] == {"content": "no masks (ablation)", "style": "no masks (ablation)"}
    assert ablation.info["drp"]["coverage"] == {"content": 1.0, "style": 1.0}
    white = Image.new("L", (4, 4), 255)
    with pytest.warns(UserWarning, match="all white"):
        masked = run(sd, shared_cache, content_mask=white, style_mask=white, **both)
    assert torch.equal(ablation.latents, masked.latents)
    assert not torch.equal(ablation.latents, run(sd, shared_cache, **both).latents)  # the masks do matter


def test_fixed_switch_is_the_run_switching_at_half_the_steps_whatever_the_entropies(sd, shared_cache):
    flat = Image.new("RGB", (112, 96), (200, 180, 160))  # a plain content picture: ρ ≪ 1, an early switch
    flat.paste((20, 20, 20), (40, 30, 70, 60))
    both = dict(content=flat, subject="cat", style=picture(2), steps=4)  # 4 steps: half is 2
    fixed = run(sd, shared_cache, fixed_switch=True, **both)
    report = fixed.info["drp"]
    assert (report["alpha"], report["switch_step"]) == (0.5, 2)
    assert entropy.switch_step(entropy.switch_fraction(report["H_cu"], report["H_st"]), 4) == 1  # without it
    assert torch.equal(fixed.latents, run(sd, shared_cache, switch_step=2, **both).latents)


def test_a_constant_style_picture_reports_rho_as_infinity_in_the_report_and_the_png(sd, shared_cache):
    method = prepare(sd, shared_cache, style=Image.new("RGB", (112, 96), (90, 120, 200)), **CONTENT)
    report = method.report()
    assert report["H_st"] == 0 and report["H_cu"] > 0
    assert report["rho"] == math.inf and report["alpha"] == 0.8  # α = 0.8 is ρ = ∞'s
    info = dict(prompt=[PROMPT], seeds=[3], seed=3, steps=STEPS, guidance=7.5, negative_prompt="", sampler="DDIM",
                width=SIZE, height=SIZE, model="tiny", eta=0.0, drp=report)
    assert "rho = H_cu/H_st = inf" in "\n".join(text_lines(info))
    assert "DRP rho: inf" in parameters_text(info)


def test_no_masks_with_a_user_mask_is_refused_in_one_sentence(sd):
    with pytest.raises(DrpError, match=r"^use_masks=False \(--no-masks\) gives every reference token to every "
                                       r"query, so it cannot take a user mask; drop the mask or the ablation\.$"):
        prepare(sd, use_masks=False, style=picture(2), style_mask=Image.new("L", (4, 4), 255))
