"""DRP-Diff on IP-Adapter, rule by rule: the pipeline against an independent computation of part B.

ALGORITHM_IP_ADAPTER.md B1 and B2 are computed again in tests/ip_spec.py from their text — the SVD split
in float64 with numpy, each stage's group, the text schedule C_bg / C_te, the entropy switch of
ALGORITHM.md §4 from the pictures' grey levels — and run through the same UNet with an attention hook
of its own. `generate` must give the same latents for every reference combination and knob (invariant
B4.7), and each knob must move them, so that breaking any single rule of B1/B2 in
drp/dual_reference_ip.py or drp/svd_keys.py fails a test here. Also here: each stage's key matrices
compared numerically, the all-late run against diffusers, `filter_values` (invariant B4.8), and the
thread count. The models are tiny and random (tests/tiny.py); 4 steps at 64 px.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import drp
from drp import dual_reference_ip as dri
from drp.vision import clip_pixels
from ip_checkpoints import ENCODER, parity_world, reference_pipeline, tiny_ip_sd
from ip_spec import grey_picture, own_entropy, own_run, own_split, own_svd, own_switch

SIZE, STEPS, GUIDANCE = 64, 4, 7.5
PROMPT = "a cat sitting on the beach"
# relative to the largest value: the pipeline's float32 SVD against the float64 split here, the image
# attention fused against an explicit softmax, the encoder run on two pictures against one at a time;
# measured 3e-6 (2e-5 with filter_values) on an AMD EPYC, one thread
LATENT_TOL = 1e-4
MATRIX_TOL = 1e-4
MOVED = 20 * LATENT_TOL  # a knob that matters moves the latents by far more than the tolerance
CONTENT, STYLE = grey_picture(128), grey_picture(64, seed=1)  # H_cu = 7 bits, H_st = 6 bits


@pytest.fixture(scope="module")
def sd():
    """Tiny SD with a tiny random base IP-Adapter and image encoder, in memory."""
    return tiny_ip_sd()


def noise():
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))


def relative(a, b):
    """max |a − b| over max |b|."""
    return ((a - b).abs().max() / b.abs().max()).item()


def run(sd, **kw):
    kw = {"mode": "ip-adapter", **kw}
    return drp.generate(sd, PROMPT, steps=STEPS, height=SIZE, width=SIZE, guidance=GUIDANCE, latents=noise(),
                        progress=False, **kw)


# --- invariant 7: every combination of B2 and every knob, against tests/ip_spec.py -----------------------


BOTH = dict(content=CONTENT, style=STYLE, subject="cat", switch_step=2)  # two early steps, two late ones
PER_BLOCK = dict(scale_early={"up_blocks.1": 1.0, "mid_block": 0.2},
                 scale_late={"down_blocks.1": 0.9, "up_blocks": 0.5})
# name: (the knobs changed, the run they change); each must move the latents and match the own computation
KNOBS = {
    "ip_layers": (dict(ip_layers=["up_blocks.1", "mid_block"]), {}),
    "bg_placeholder": (dict(bg_placeholder="dog"), {}),
    "bg_prompt": (dict(bg_prompt=False), {}),
    "rank_rule": (dict(rank_rule="gd"), {}),
    "rank_energy": (dict(rank_energy=0.8), {}),
    "floor": (dict(floor=0.5), {}),  # bites: σ_min/σ_1 is about 0.2 for these random weights
    "power 1": (dict(power=1), {}),
    "power 0": (dict(power=0), {}),
    "late": (dict(late="style-only"), {}),
    "scale_early": (dict(scale_early=0.2), {}),
    "scale_late": (dict(scale_late=1.2), {}),
    "per-block scales": (PER_BLOCK, {}),
    "swapped scales": (dict(scale_early=1.0, scale_late=0.3), dict(scale_early=0.3, scale_late=1.0)),
    "filter_values": (dict(filter_values=True), {}),
    "filter_values with gd": (dict(filter_values=True, rank_rule="gd"), dict(rank_rule="gd")),
    "switch_step": (dict(switch_step=1), {}),
    "entropy switch": (dict(switch_step=None), {}),  # ρ = 7/6: α ≈ 0.63, N_e = 3 of 4
    "fixed_switch": (dict(switch_step=None, fixed_switch=True), dict(switch_step=None)),
    "every step late": (dict(switch_step=0), {}),
    "every step early": (dict(switch_step=STEPS), {}),
    "no subject": (dict(subject=None), {}),
    "content only": (dict(style=None), {}),
    "style only": (dict(content=None), {}),
    "content only, entropy switch": (dict(style=None, switch_step=None), dict(style=None, switch_step=3)),
    "style only, entropy switch": (dict(content=None, switch_step=None), dict(content=None)),
    "several knobs at once": (dict(rank_rule="gd", floor=0.4, power=3, bg_placeholder="dog", late="style-only",
                                   ip_layers=["down_blocks.1", "mid_block", "up_blocks.1"], filter_values=True,
                                   **PER_BLOCK), {}),
}


@pytest.fixture(scope="module")
def own(sd):
    """own_run, remembered by its knobs: several tests compare with the same runs."""
    done = {}

    def compute(**kw):
        key = repr(sorted(kw.items(), key=lambda kv: kv[0]))
        if key not in done:
            done[key] = own_run(sd, PROMPT, noise(), STEPS, GUIDANCE, **kw)
        return done[key]

    return compute


@pytest.mark.filterwarnings("ignore:no subject was given", "ignore:a subject was given without a content reference")
@pytest.mark.parametrize("name", KNOBS)
def test_each_knob_reaches_the_image_as_the_independent_computation_predicts(sd, own, name):
    changed, base = KNOBS[name]
    knobs, before = BOTH | base | changed, BOTH | base
    expected = own(**knobs)
    assert relative(own(**before), expected) > MOVED, "the knob must matter here for the test to mean anything"
    got = run(sd, **knobs)
    assert relative(got.latents, expected) <= LATENT_TOL
    assert relative(got.latents, own(**before)) > MOVED


def planted_spectrum(r, beta, scale=0.1):
    """r singular values where the Gavish–Donoho rule keeps exactly 2 — and would keep 3 with the lower of the
    two middle values as the median (2.5 instead of 2.75), 1 with β = 1, many without ω."""
    omega = lambda b: 0.56 * b**3 - 0.95 * b**2 + 1.82 * b + 1.43
    bulk = np.concatenate([np.linspace(4.0, 3.0, r // 2 - 3), np.linspace(2.5, 0.1, r // 2)])  # middle: 3, 2.5
    between = lambda lo, hi: (lo + hi) / 2
    signal = [20.0, between(omega(beta) * 2.75, omega(1) * 2.75), between(omega(beta) * 2.5, omega(beta) * 2.75)]
    return scale * np.concatenate([signal, bulk])


@pytest.fixture(scope="module")
def planted():
    """The tiny models with every key weight's spectrum replaced by `planted_spectrum` (random singular vectors)."""
    sd = tiny_ip_sd()
    g = torch.Generator().manual_seed(7)
    for name in sd.ip_adapter.layer_names:
        w = sd.ip_adapter.key_weight(name)
        r = min(w.shape)
        u, _ = torch.linalg.qr(torch.randn(w.shape[0], r, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(w.shape[1], r, generator=g, dtype=torch.float64))
        sigma = torch.from_numpy(planted_spectrum(r, r / max(w.shape)))
        with torch.no_grad():
            w.copy_((u * sigma) @ v.T)
    return sd


def test_the_gavish_donoho_rule_splits_each_layer_by_its_own_aspect_ratio_and_median(planted):
    knobs = BOTH | dict(rank_rule="gd")
    result = run(planted, **knobs)
    assert set(result.info["drp"]["rank"].values()) == {2}
    assert [own_split(planted.ip_adapter.key_weight(n), rank_rule="gd")[0] for n in planted.ip_adapter.layer_names] \
        == [2] * len(planted.ip_adapter.layer_names)
    expected = own_run(planted, PROMPT, noise(), STEPS, GUIDANCE, **knobs)
    assert relative(result.latents, expected) <= LATENT_TOL
    assert relative(run(planted, **(knobs | dict(rank_energy=0.5, rank_rule="energy"))).latents, expected) > MOVED


def test_the_entropy_switch_comes_from_the_pictures_grey_level_entropies(sd):
    assert (own_entropy(CONTENT), own_entropy(STYLE)) == (7.0, 6.0)
    report = run(sd, **(BOTH | dict(switch_step=None))).info["drp"]
    rho = 7 / 6
    assert report["H_cu"] == pytest.approx(7.0, abs=1e-12) and report["H_st"] == pytest.approx(6.0, abs=1e-12)
    assert report["rho"] == pytest.approx(rho) and report["alpha"] == pytest.approx(0.2 + 0.6 * rho**6 / (1 + rho**6))
    assert report["switch_step"] == own_switch(CONTENT, STYLE, STEPS) == 3  # not the middle, 2
    fixed = run(sd, **(BOTH | dict(switch_step=None, fixed_switch=True))).info["drp"]
    assert (fixed["alpha"], fixed["switch_step"]) == (0.5, 2)


@pytest.mark.filterwarnings("ignore:a subject was given without a content reference")
def test_a_style_reference_with_a_subject_has_no_background_prompt(sd):
    with_subject = run(sd, style=STYLE, subject="cat", switch_step=2)
    assert with_subject.info["drp"]["C_bg"] is None
    assert torch.equal(with_subject.latents, run(sd, style=STYLE, switch_step=2).latents)


def test_content_alone_keeps_its_foreground_in_the_late_stage_whatever_late_says(sd):
    both = run(sd, content=CONTENT, subject="cat", switch_step=2)
    assert torch.equal(run(sd, content=CONTENT, subject="cat", switch_step=2, late="style-only").latents, both.latents)
    assert relative(both.latents, run(sd, content=CONTENT, subject="cat", switch_step=2, scale_late=0).latents) > MOVED


# --- the key matrices each stage uses, numerically ----------------------------------------------------------


def stage_parts(sd, **kw):
    method = dri.prepare(sd, [PROMPT], steps=STEPS, progress=False, **kw)
    return method, [method.hooks[late].groups[0].parts for late in (False, True)]


def close(a, b, tol=MATRIX_TOL):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return a.shape == b.shape and relative(a, b) <= tol


@pytest.mark.parametrize("knobs", [{}, dict(rank_rule="gd", power=1, floor=0.4), dict(rank_energy=0.9, power=3),
                                   dict(rank_energy=1.0, power=0)], ids=["defaults", "gd", "e 0.9", "e 1 p 0"])
def test_each_stage_keys_each_reference_with_the_matrices_of_the_design(sd, knobs):
    _, (early, late) = stage_parts(sd, content=CONTENT, style=STYLE, subject="cat", **knobs)
    adapter = sd.ip_adapter
    uncond = adapter.uncond_tokens(sd.image_encoder)[0]
    own_tokens = [adapter.image_tokens(sd.image_encoder, clip_pixels([x], size=ENCODER.image_size))[0]
                  for x in (CONTENT, STYLE)]
    assert len(early) == len(late) == 2
    for parts in (early, late):
        for part, tokens in zip(parts, own_tokens):  # content first, then style; unconditional rows first
            assert part.tokens.shape[0] == 2 and torch.equal(part.tokens[0], uncond)
            assert close(part.tokens[1], tokens)
    for name in adapter.layer_names:
        w = adapter.key_weight(name)
        k, fg, bar, _ = own_split(w, **knobs)
        # early [C_cu W_fg ; C_st W_fg], late [C_cu W_fg ; C_st W̄]
        assert close(early[0].key_weights[name], fg) and close(early[1].key_weights[name], fg)
        assert close(late[0].key_weights[name], fg) and close(late[1].key_weights[name], bar)
        if knobs.get("rank_energy") == 1.0:
            assert k == min(w.shape) and close(early[0].key_weights[name], w)  # e = 1: W_fg = W
        else:
            assert not close(fg, w.double(), 0.05) and not close(bar, fg, 0.05)  # the three matrices differ
        if knobs.get("power") == 0:
            assert close(late[1].key_weights[name], w)  # p = 0: W̄ = W
        assert all(p.value_weights is None for p in early + late)  # values: the adapter's own


def test_with_filter_values_the_early_values_leave_out_the_background_directions_and_the_late_ones_do_not(sd):
    _, (early, late) = stage_parts(sd, content=CONTENT, style=STYLE, subject="cat", filter_values=True)
    for name in sd.ip_adapter.layer_names:
        w_v = sd.ip_adapter.value_weight(name)
        _, _, _, v_bg = own_split(sd.ip_adapter.key_weight(name))
        expected = w_v.double().numpy() @ (np.eye(w_v.shape[1]) - v_bg.T @ v_bg)
        assert all(close(p.value_weights[name], expected) for p in early)
        assert not close(w_v, expected, 0.05)
    assert all(p.value_weights is None for p in late)


# --- the late stage opened up is diffusers' IP-Adapter with both pictures -----------------------------------


def test_every_step_late_with_the_filter_opened_equals_diffusers_joint_two_image_ip_adapter(tmp_path):
    """With e = 1, p = 0 and no C_bg the late group [C_cu W_fg ; C_st W̄] is [C_cu W ; C_st W]: one softmax over
    both pictures' tokens, as diffusers computes for ip_adapter_image=[[content, style]]; switch_step=0
    runs every step late, so the late stage alone makes the image."""
    models, h94, weights = parity_world(tmp_path)
    ours = run(drp.load(weights), content=CONTENT, style=STYLE, subject="cat", switch_step=0,
               rank_energy=1.0, power=0, bg_prompt=False, scale_late=0.8).latents

    pipe = reference_pipeline(models, tmp_path, h94)
    pipe.set_ip_adapter_scale(0.8)
    expected = pipe(PROMPT, latents=noise(), num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                    width=SIZE, ip_adapter_image=[[CONTENT, STYLE]], output_type="latent").images
    assert relative(ours, expected) <= LATENT_TOL
    pipe.set_ip_adapter_scale(0.0)  # the pictures did move the latents
    plain = pipe(PROMPT, latents=noise(), num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                 width=SIZE, ip_adapter_image=[[CONTENT, STYLE]], output_type="latent").images
    assert relative(plain, expected) > MOVED


# --- filter_values: invariant 8 ----------------------------------------------------------------------------

OUTPUT_TOL = 1e-4  # relative: keys and values through reconstructed float32 matrices, one attention


def early_outputs(sd, hook, name, along, seed):
    """The early stage's image-attention output at layer `name` for random queries, with every reference's
    tokens moved by random amounts along the rows of `along` (none moved for an empty `along`)."""
    attn = sd.unet.get_submodule(name)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, attn.heads, 16, attn.to_q.out_features // attn.heads, generator=g)
    saved = [p.tokens for p in hook.groups[0].parts]
    for part in hook.groups[0].parts:
        part.tokens = part.tokens + torch.randn(*part.tokens.shape[:2], along.shape[0], generator=g) @ along
    hook._keys_values.clear()
    out = F.scaled_dot_product_attention(q, *hook.keys_values(attn, 0, name, torch.float32))
    for part, tokens in zip(hook.groups[0].parts, saved):
        part.tokens = tokens
    hook._keys_values.clear()
    return out


@pytest.mark.parametrize("rule", ["energy", "gd"])
def test_with_filter_values_the_background_directions_of_the_tokens_do_not_reach_the_early_output(sd, rule):
    refs = dict(content=CONTENT, style=STYLE, subject="cat", rank_rule=rule)
    filtered, plain = (dri.prepare(sd, [PROMPT], steps=STEPS, progress=False, filter_values=f, **refs)
                       for f in (True, False))
    for name in sd.ip_adapter.layer_names:
        w = sd.ip_adapter.key_weight(name)
        k, _, _, v_bg = own_split(w, rank_rule=rule)
        assert k == filtered.report()["rank"][name] < min(w.shape)
        v_bg, v_fg = 5 * torch.from_numpy(v_bg).float(), 5 * torch.from_numpy(own_svd(w)[2][:k]).float()
        hook = filtered.hooks[False]
        still = early_outputs(sd, hook, name, v_bg[:0], seed=0)
        assert relative(early_outputs(sd, hook, name, v_bg, seed=0), still) <= OUTPUT_TOL
        assert relative(early_outputs(sd, hook, name, v_fg, seed=0), still) > 0.05  # the foreground does count
        hook = plain.hooks[False]  # without the filter, the values carry the background directions
        still = early_outputs(sd, hook, name, v_bg[:0], seed=0)
        assert relative(early_outputs(sd, hook, name, v_bg, seed=0), still) > 0.05


def test_filter_values_changes_nothing_at_full_rank_bit_for_bit(sd):
    refs = dict(content=CONTENT, style=STYLE, subject="cat", switch_step=2, rank_energy=1.0)
    assert torch.equal(run(sd, filter_values=True, **refs).latents, run(sd, **refs).latents)
    assert run(sd, filter_values=True, **refs).info["drp"]["filter_values"] is True


def test_a_run_leaves_the_thread_count_as_it_was(sd, monkeypatch):
    from drp import svd_keys

    svd_keys._SPECTRA.pop(sd.ip_adapter, None)  # so that this run decomposes the keys again
    before = torch.get_num_threads()

    def refuse(n):
        raise AssertionError("the run changed the process's thread count")

    monkeypatch.setattr(torch, "set_num_threads", refuse)
    run(sd, content=CONTENT, style=STYLE, subject="cat")
    assert torch.get_num_threads() == before and sd.ip_adapter in svd_keys._SPECTRA
