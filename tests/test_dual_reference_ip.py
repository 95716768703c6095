"""DRP-Diff on IP-Adapter: the invariants of ALGORITHM_IP_ADAPTER.md B4 on tiny random models.

The parity test writes a tiny SD folder and an h94/IP-Adapter folder (tests/ip_checkpoints.py) that our
converter and diffusers' `load_ip_adapter` each read; the other tests use the same kind of tiny models
in memory.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import drp
from drp import ddim, dual_reference_ip as dri, svd_keys
from drp.attention import attention_probs
from drp.convert import convert
from drp.errors import DrpError
from drp.method_common import resolve_mode
from drp.report import save_report, text_lines
from drp.sampling import decode, encode_text
from ip_checkpoints import parity_world, reference_encoder, reference_pipeline, tiny_ip_sd
from tiny import tiny_sd

PIXEL_TOL = 2.5 / 255  # the bound for whole-pipeline parity, in [0, 1] pixels
# relative to the largest unmoved key (or attention weight): float32 sums of 128 products of tokens moved 5×
# along 48 directions, through a reconstructed W_fg. 2.7e-6 measured on an AMD EPYC (AVX-512 and AVX2
# kernels), 3.8e-6 on an Intel Xeon; a background direction that reaches the keys (as W̄'s do in the late
# stage) moves them by several times their size.
KEY_TOL = 1e-4
PROMPT = "a cat sitting on the beach"
SIZE, STEPS = 64, 2


def pictures():
    rng = np.random.default_rng(0)  # a landscape and a portrait picture, centre-cropped by the encoder
    return [Image.fromarray((rng.random(shape) * 255).astype(np.uint8)) for shape in [(90, 120, 3), (130, 80, 3)]]


@pytest.fixture(scope="module")
def sd():
    """Tiny SD with a tiny random base IP-Adapter and image encoder, in memory."""
    return tiny_ip_sd()


def relative_error(got, want):
    """The largest difference, relative to the largest magnitude of `want`."""
    return ((got - want).abs().max() / want.abs().max()).item()


def noise():
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))


def run(sd, prompt=PROMPT, **kw):
    return drp.generate(sd, prompt, steps=STEPS, height=SIZE, width=SIZE, latents=noise(), progress=False, **kw)


def test_full_rank_no_tilt_and_no_background_prompt_equal_diffusers_ip_adapter_with_both_pictures(tmp_path):
    models, h94, weights = parity_world(tmp_path)
    ours = drp.load(weights)
    content, style = pictures()
    result = run(ours, content=content, style=style, subject="cat", mode="auto", rank_energy=1.0, power=0,
                 bg_prompt=False)
    assert result.info["drp"]["mode"] == "ip-adapter"
    image = decode(ours, result.latents).permute(0, 2, 3, 1).numpy()

    pipe = reference_pipeline(models, tmp_path, h94)
    pipe.set_ip_adapter_scale(0.6)
    expected = pipe(PROMPT, latents=noise(), num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                    ip_adapter_image=[[content, style]], output_type="np").images
    assert ((expected > 0.02) & (expected < 0.98)).mean() > 0.5, "a saturated image would prove little"
    assert abs(image - expected).max() <= PIXEL_TOL
    plain = decode(ours, run(ours).latents).permute(0, 2, 3, 1).numpy()
    assert abs(plain - expected).max() > 20 * PIXEL_TOL  # the references did move the pixels


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}, set(vars(module))


@pytest.fixture(scope="module")
def both(sd):
    """One run with both references and some knobs changed; the models' state from before it."""
    before = {name: state(getattr(sd, name)) for name in ("unet", "ip_adapter", "image_encoder")}
    content, style = pictures()
    result = run(sd, content=content, style=style, subject="cat", mode="ip-adapter", rank_rule="gd", scale_late=0.4)
    return result, before


def test_no_reference_is_plain_text_to_image_bit_for_bit_and_a_run_leaves_nothing_on_the_model(sd, both):
    plain = run(sd)
    assert "drp" not in plain.info
    assert torch.equal(run(sd, mode="ip-adapter").latents, plain.latents)
    with_refs, before = both
    assert not torch.equal(with_refs.latents, plain.latents)
    for name, (tensors, attributes) in before.items():
        after_tensors, after_attributes = state(getattr(sd, name))
        assert after_attributes == attributes, name
        assert after_tensors.keys() == tensors.keys() and all(torch.equal(after_tensors[k], t) for k, t in tensors.items())


def plain_loop(sd, texts, switch_step):
    """Text-to-image written out with no hook: the conditional text `texts[0]` before `switch_step`, then `texts[1]`.

    The texts are encoded in the batches the pipeline uses (the negative prompt with the prompt, C_bg on
    its own), so that the text encoder runs the same sums: a batch of another size may sum in another
    order on some CPUs, and the comparison with the pipeline is exact."""
    negative_and_prompt = encode_text(sd, ["", PROMPT])
    contexts = [negative_and_prompt if t == PROMPT else torch.cat([negative_and_prompt[:1], encode_text(sd, [t])])
                for t in texts]
    alphas, x = ddim.alphas_cumprod(), noise()
    for i, (t, t_prev) in enumerate(ddim.ddim_pairs(STEPS)):
        with torch.no_grad():
            eps = sd.unet(torch.cat([x, x]), t, contexts[i >= switch_step]).float()
        eps_uncond, eps_text = eps.chunk(2)
        x = ddim.ddim_step(x, eps_uncond + 7.5 * (eps_text - eps_uncond), t, t_prev, alphas)
    return x


def test_scale_zero_in_both_stages_is_plain_text_to_image_under_the_same_text_schedule(sd):
    result = run(sd, content=pictures()[0], style=pictures()[1], subject="cat", mode="ip-adapter", switch_step=1,
                 scale_early=0, scale_late=0)
    assert result.info["drp"]["C_bg"] == "a sitting on the beach"
    assert torch.equal(result.latents, plain_loop(sd, ["a sitting on the beach", PROMPT], 1))
    assert not torch.equal(result.latents, plain_loop(sd, [PROMPT, PROMPT], 1))  # C_bg did count


def test_switch_step_zero_runs_every_step_late_and_n_every_step_early(sd):
    refs = dict(content=pictures()[0], style=pictures()[1], subject="cat", mode="ip-adapter")
    all_late, all_early = run(sd, switch_step=0, **refs).latents, run(sd, switch_step=STEPS, **refs).latents
    assert torch.equal(run(sd, switch_step=0, scale_early=0.0, **refs).latents, all_late)  # no early step ran
    assert torch.equal(run(sd, switch_step=STEPS, scale_late=0.0, **refs).latents, all_early)  # no late step ran
    assert not torch.equal(all_late, all_early)  # (so neither equality holds by the stages being alike)


def hooks_of(sd, **kw):
    method = dri.prepare(sd, [PROMPT], steps=STEPS, progress=False, **kw)
    return method, method.hooks[False], method.hooks[True]


def test_background_components_of_the_reference_tokens_do_not_reach_the_early_stage_attention_weights(sd):
    _, early, late = hooks_of(sd, content=pictures()[0], style=pictures()[1], subject="cat")
    name = "up_blocks.1.attentions.1.transformer_blocks.0.attn2"
    attn = sd.unet.get_submodule(name)
    spec = svd_keys.spectra(sd.ip_adapter, [name])[name]
    k = svd_keys.split_rank(spec.S, tuple(sd.ip_adapter.key_weight(name).shape))  # the default rule's split
    assert 1 <= k < len(spec.S)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, attn.heads, 16, attn.to_q.out_features // attn.heads, generator=g)

    def weights_and_keys(hook, along):
        """The image-attention weights of the queries and the image keys, with tokens moved along `along`."""
        for part in hook.groups[0].parts:
            part.tokens = part.tokens + torch.randn(*part.tokens.shape[:2], along.shape[0], generator=g) @ along
        hook._keys_values.clear()
        keys, _ = hook.keys_values(attn, 0, name, torch.float32)
        return attention_probs(q, keys), keys

    saved = [p.tokens for p in early.groups[0].parts]
    probs, keys = weights_and_keys(early, spec.Vh[:0])  # unmoved
    moved_probs, moved_keys = weights_and_keys(early, 5 * spec.Vh[k:])  # the background directions only
    assert relative_error(moved_keys, keys) <= KEY_TOL
    assert relative_error(moved_probs, probs) <= KEY_TOL
    for part, tokens in zip(early.groups[0].parts, saved):
        part.tokens = tokens
    fg_probs, _ = weights_and_keys(early, 5 * spec.Vh[:k])  # the foreground directions do count
    assert (fg_probs - probs).abs().max() > 0.05
    _, late_keys = weights_and_keys(late, spec.Vh[:0])
    _, late_moved = weights_and_keys(late, 5 * spec.Vh[k:])  # the late stage's W̄ sees the background
    assert (late_moved - late_keys).abs().max() > 0.1


def matrices(hook):
    """Which key matrices the stage's one image softmax uses, part by part (compared by identity)."""
    return [id(p.key_weights) for p in hook.groups[0].parts]


def test_each_reference_combination_gets_the_groups_of_the_design(sd):
    content, style = pictures()
    method, early, late = hooks_of(sd, content=content, style=style, subject="cat")
    fg, bar = matrices(early)[0], matrices(late)[1]
    assert fg != bar
    assert matrices(early) == [fg, fg] and matrices(late) == [fg, bar]  # [C_cu W_fg ; C_st W_fg], [C_cu W_fg ; C_st W̄]
    assert method.bg_context is not None
    fg_k = early.groups[0].parts[0].key_weights
    name = sd.ip_adapter.layer_names[0]
    assert torch.linalg.matrix_rank(fg_k[name]) < min(fg_k[name].shape)  # W_fg is the low-rank part
    _, _, late = hooks_of(sd, content=content, style=style, subject="cat", late="style-only")
    assert len(matrices(late)) == 1 and torch.equal(late.groups[0].parts[0].tokens, early.groups[0].parts[1].tokens)
    method, early, late = hooks_of(sd, content=content, subject="cat")  # content only: W_fg in both stages
    assert len(matrices(early)) == 1 and matrices(early) == matrices(late) and method.bg_context is not None
    method, early, late = hooks_of(sd, style=style)  # style only: W_fg, then W̄; the full prompt throughout
    assert len(matrices(early)) == 1 and matrices(early) != matrices(late) and method.bg_context is None
    one = early.groups[0].parts[0].tokens
    assert one.shape == (2, 4, 128)  # unconditional row first, then the conditional row
    assert torch.equal(one[0], sd.ip_adapter.uncond_tokens(sd.image_encoder)[0]) and not torch.equal(one[0], one[1])
    assert dri.prepare(sd, [PROMPT], steps=STEPS) is None  # neither: plain text-to-image


def test_the_background_prompt_drops_the_subjects_words():
    assert dri.background_prompt("a Cat on the beach, cat-like", "cat") == "a on the beach, -like"
    assert dri.background_prompt("a black cat on the mat", "black cat", "sks") == "a sks on the mat"
    assert dri.background_prompt("a catalogue and a cat", "cat") == "a catalogue and a"


def test_the_report_names_the_adapter_the_knobs_each_layers_rank_and_spectrum(sd, both, tmp_path):
    content, style = pictures()
    result = both[0]
    report = result.info["drp"]
    layers = sd.ip_adapter.layer_names
    assert report["mode"] == "ip-adapter" and report["adapter"] == "IP-Adapter (base)"
    assert (report["rank_rule"], report["rank_energy"], report["floor"], report["power"]) == ("gd", 0.5, 0.05, 2)
    assert (report["scale_early"], report["scale_late"], report["C_bg"]) == (0.6, 0.4, "a sitting on the beach")
    assert list(report["rank"]) == layers == list(report["spectrum"])
    for name in layers:
        sigma = report["spectrum"][name]
        assert len(sigma) == min(sd.ip_adapter.key_weight(name).shape) and sigma == sorted(sigma, reverse=True)
        assert 1 <= report["rank"][name] <= len(sigma)
    assert 1 <= report["switch_step"] <= STEPS - 1 and 0.2 <= report["alpha"] <= 0.8

    text = "\n".join(text_lines(result.info))
    assert "adapter IP-Adapter (base)" in text and "Gavish-Donoho rule" in text and "late 0.4" in text
    assert "C_bg (early-stage text): 'a sitting on the beach'" in text and "foreground rank k: d0.0 " in text
    assert "[" not in text and "rank_energy" not in text  # the spectra are drawn, not printed; e is the energy rule's
    picture = np.asarray(Image.open(save_report(tmp_path / "r.png", result, content, style)).convert("RGB"))
    strip = picture[SIZE + 40 : SIZE + 200]  # below the panels: the σ plots, one colour per layer
    assert (abs(strip.astype(int) - [31, 119, 180]).sum(axis=-1) < 10).sum() > 50
    assert (abs(strip.astype(int) - [214, 39, 40]).sum(axis=-1) < 10).sum() > 50


def test_the_mode_is_chosen_by_the_weights_and_bad_requests_get_one_sentence(sd):
    bare = tiny_sd()
    assert resolve_mode(sd, "auto") == "ip-adapter" and resolve_mode(bare, "auto") == "self-attention"
    assert resolve_mode(bare, "ip-adapter", references=False) == "ip-adapter"  # plain text-to-image needs none
    with pytest.raises(DrpError, match=r"convert_weights\.py --download ip-adapter"):
        run(bare, content=pictures()[0], mode="ip-adapter")
    with pytest.raises(DrpError, match="mode must be one of"):
        run(sd, mode="cross-attention")
    content = pictures()[0]
    for bad, match in ((dict(layers="up_blocks.2"), "unknown option 'layers' for the ip-adapter mode"),
                       (dict(content_mask=Image.new("L", (8, 8))), "takes no masks"),
                       (dict(late="content-only"), "late must be"), (dict(rank_energy=0), "rank_energy"),
                       (dict(ip_layers="up_blocks.9"), "ip_layers names 'up_blocks.9'"),
                       (dict(scale_early={"up_block.1": 1.0}), "no block with cross-attention"),
                       (dict(subject="dog"), "not a word of the prompt"), (dict(switch_step=STEPS + 1), "switch_step"),
                       (dict(switch_step=True), "switch_step"),
                       (dict(ip_image=content), "cannot be combined")):
        with pytest.raises(DrpError, match=match):
            run(sd, content=content, mode="ip-adapter", **(dict(subject="cat") | bad))
    for bad in (dict(ip_layers="up_blocks.9"), dict(scale_late={"up_block.1": 1.0})):  # before any picture is read
        with pytest.raises(DrpError, match="ip_layers names|no block with cross-attention"):
            run(sd, content="nowhere.png", mode="ip-adapter", subject="cat", **bad)


def test_sample_py_says_the_mode_first_records_it_and_refuses_ip_adapter_without_its_files(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from ip_checkpoints import adapter_file, save_adapter
    from tiny import tiny_weights_dir

    root = Path(__file__).resolve().parent.parent
    weights = tiny_weights_dir(tmp_path / "weights")
    args = ["--weights", weights, "--prompt", PROMPT, "--subject", "cat", "--content", root / "assets/chelsea.png",
            "--style", root / "assets/starry_night.jpg", "--steps", "2", "--height", "64", "--width", "64",
            "--no-progress", "--out", tmp_path / "out.png"]

    def sample(*more):
        return subprocess.run([sys.executable, str(root / "sample.py"), *map(str, args), *more], cwd=root,
                              capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))

    refused = sample("--mode", "ip-adapter")
    assert refused.returncode == 1 and refused.stdout == "" and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: --mode ip-adapter needs IP-Adapter's files")
    assert "convert_weights.py --download ip-adapter" in refused.stderr and not (tmp_path / "out.png").exists()

    convert(save_adapter(tmp_path / "h94" / "ip-adapter_sd15.safetensors", adapter_file("base", seed=2)), weights,
            dtype="fp32", progress=False)
    reference_encoder(seed=5).save_pretrained(tmp_path / "h94" / "image_encoder")
    convert(tmp_path / "h94" / "image_encoder", weights, dtype="fp32", progress=False)
    done = sample()  # --mode auto: the IP-Adapter files are there now
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("mode: ip-adapter")
    text = Image.open(tmp_path / "out.png").text["parameters"]
    assert "DRP mode: ip-adapter" in text and "DRP IP-Adapter: ip-adapter_sd15.safetensors" in text
