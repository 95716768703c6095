"""Checkpoint conversion: the key maps cover the real SD 1.5 layouts exactly, converted models equal the
reference libraries' own conversions, every file variant is read, every other kind of file is refused
with one sentence, and an interrupted or unforced conversion leaves existing weights alone."""

import gc
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoints as ck
from drp import keymaps
from drp.clip import CLIPConfig
from drp.convert import convert, plan_folder, plan_single_file
from drp.errors import DrpError
from drp.model_io import load
from drp.unet import UNetConfig
from drp.vae import VAEConfig
from drp.weight_files import open_tensors
from manifests import diffusers_manifest, ldm_manifest
from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4  # relative to the reference's largest magnitude, fp32
SD15 = {"unet": UNetConfig(), "vae": VAEConfig(), "text_encoder": CLIPConfig()}
FILES = ("unet.safetensors", "vae.safetensors", "text_encoder.safetensors")


def read_files(folder):
    """{file: {key: tensor}} of a converted folder."""
    out = {}
    for name in FILES:
        with safe_open(str(Path(folder) / name), "pt") as f:
            out[name] = {k: f.get_tensor(k) for k in f.keys()}
    return out


def assert_same_files(a, b):
    fa, fb = read_files(a), read_files(b)
    for name in FILES:
        assert fa[name].keys() == fb[name].keys()
        assert all(torch.equal(fa[name][k], fb[name][k]) for k in fa[name])


# ---- the key maps on the full-size manifests (shapes only) ---------------------------------------

def test_every_sd15_single_file_key_is_mapped_once_or_ignored():
    plan = plan_single_file(ldm_manifest(), "sd15")
    assert {c: len(m) for c, m in plan.moves.items()} == {"unet": 686, "vae": 248, "text_encoder": 196}
    assert set(plan.ignored) == keymaps.SCHEDULE_BUFFERS | {keymaps.CLIP + "text_model.embeddings.position_ids"}
    used = [m.source for moves in plan.moves.values() for m in moves.values()]
    assert len(used) == len(set(used)) == 1143 - 13
    for component, moves in plan.moves.items():  # our names are the diffusers file names
        published = diffusers_manifest(component)
        for ours, move in moves.items():
            legacy = ours
            for new, old in ck.LEGACY_VAE_ATTENTION.items():
                legacy = legacy.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
            assert published.get(ours, published.get(legacy)) == move.shape


def test_training_checkpoint_ema_keys_are_all_ignored():
    ema = ldm_manifest("sd15_ldm_ema_keys.tsv")
    plain = plan_single_file(ldm_manifest(), "sd15")
    mixed = plan_single_file({**ldm_manifest(), **ema}, "sd15 with EMA")
    assert set(mixed.ignored) == set(plain.ignored) | set(ema)
    assert mixed.moves == plain.moves


def test_sd15_single_file_structure_is_inferred_as_the_sd15_configs():
    assert plan_single_file(ldm_manifest(), "sd15").configs == SD15


def test_the_sd21_single_file_layout_is_refused_as_sd2():
    with pytest.raises(DrpError, match="Stable Diffusion 2.x"):
        plan_single_file(ldm_manifest("sd21_ldm_manifest.tsv"), "v2-1_768-ema-pruned.safetensors")


def test_diffusers_manifest_maps_by_identity_but_for_the_legacy_vae_attention_names():
    plan = plan_folder({c: diffusers_manifest(c) for c in SD15}, SD15)
    renamed = {(c, m.source): k for c, moves in plan.moves.items() for k, m in moves.items() if k != m.source}
    assert len(renamed) == 16
    assert renamed[("vae", "decoder.mid_block.attentions.0.proj_attn.weight")] == "decoder.mid_block.attentions.0.to_out.0.weight"
    assert plan.ignored == ["text_model.embeddings.position_ids"]
    current = {k.replace("attentions.0.query.", "attentions.0.to_q."): s for k, s in diffusers_manifest("vae").items()}
    current = {k.replace("attentions.0.key.", "attentions.0.to_k.").replace("attentions.0.value.", "attentions.0.to_v.")
               .replace("attentions.0.proj_attn.", "attentions.0.to_out.0."): s for k, s in current.items()}
    plan = plan_folder({"vae": current}, SD15)
    assert all(k == m.source for k, m in plan.moves["vae"].items()) and len(plan.moves["vae"]) == 248


def test_rules_match_whole_dotted_prefixes_never_substrings():
    rules = keymaps.unet_rules(UNetConfig())
    assert keymaps.rename(keymaps.UNET + "out.0.weight", rules)[0] == "conv_norm_out.weight"
    attn = keymaps.UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
    assert keymaps.rename(attn, rules)[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
    assert keymaps.rename(keymaps.UNET + "input_blocks.10.0.in_layers.0.bias", rules)[0] == "down_blocks.3.resnets.0.norm1.bias"
    assert keymaps.rename(keymaps.UNET + "output_blocks.2.1.conv.weight", rules)[0] == "up_blocks.0.upsamplers.0.conv.weight"
    assert keymaps.rename(keymaps.UNET + "input_blocks.1.10.weight", rules) is None
    vae = keymaps.vae_rules(VAEConfig())
    assert keymaps.rename(keymaps.VAE + "decoder.up.0.block.2.conv1.weight", vae)[0] == "decoder.up_blocks.3.resnets.2.conv1.weight"


# ---- parity with the reference libraries on the same random weights (tiny, fp32) -----------------

def reference_from_single_file(ldm, configs=ck.TINY):
    """diffusers' UNet/VAE and transformers' CLIP filled by diffusers' own single-file conversion."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from transformers import CLIPTextModel

    ucfg, vcfg = ck.diffusers_unet_config(configs["unet"]), ck.diffusers_vae_config(configs["vae"])
    unet, vae = UNet2DConditionModel(**ucfg), AutoencoderKL(**vcfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm, ucfg), strict=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ldm, vcfg), strict=True)
    text = convert_ldm_clip_checkpoint(ldm)
    clip = CLIPTextModel(ck.transformers_clip_config(configs["text_encoder"]))
    clip.load_state_dict({k.removeprefix("text_model."): v for k, v in text.items() if "position_ids" not in k})
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": clip.eval()}


def reference_from_folder(folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
            "vae": AutoencoderKL.from_pretrained(folder / "vae").eval(),
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder").eval()}


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def compare(ours, ref, what):
    """Largest relative error of one output of our loaded models against the reference models."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if what.startswith("unet"):
            _, t, h, w = what.split("-")
            x, ctx = torch.randn(2, 4, int(h), int(w), generator=g), torch.randn(2, 77, 128, generator=g)
            return rel_err(ours.unet(x, int(t), ctx), ref["unet"](x, int(t), ctx).sample)
        if what == "vae-encode":
            x = torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
            return rel_err(ours.vae.encode(x), ref["vae"].encode(x).latent_dist.mean)
        if what == "vae-decode":
            z = torch.randn(1, 4, 8, 6, generator=g)
            return rel_err(ours.vae.decode(z), ref["vae"].decode(z).sample)
        tokens = torch.randint(0, 49408, (2, 77), generator=g)
        return rel_err(ours.text_encoder(tokens), ref["text_encoder"](tokens).last_hidden_state)


OUTPUTS = ["unet-1-8-8", "unet-421-8-8", "unet-999-8-8", "unet-421-16-24", "unet-999-16-24",
           "vae-encode", "vae-decode", "text"]


@pytest.fixture(scope="module")
def tiny_ldm():
    models = ck.reference_models(seed=0)
    return ck.to_single_file({c: ck.file_state_dict(c, m) for c, m in models.items()})


@pytest.fixture(scope="module")
def single_file_pair(tiny_ldm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    convert(ck.save_checkpoint(tmp / "tiny.safetensors", tiny_ldm), tmp / "weights", dtype="fp32", progress=False)
    return load(tmp / "weights"), reference_from_single_file(tiny_ldm)


@pytest.fixture(scope="module")
def folder_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folder")
    folder = ck.write_diffusers_folder(tmp / "sd", ck.reference_models(seed=10), vae_spelling="legacy")
    convert(folder, tmp / "weights", dtype="fp32", progress=False)
    return load(tmp / "weights"), reference_from_folder(folder)


@pytest.mark.parametrize("what", OUTPUTS)
def test_single_file_conversion_matches_diffusers_single_file_conversion(single_file_pair, what):
    assert compare(*single_file_pair, what) < TOL


@pytest.mark.parametrize("what", OUTPUTS)
def test_diffusers_folder_conversion_matches_from_pretrained(folder_pair, what):
    assert compare(*folder_pair, what) < TOL


# ---- file variants -------------------------------------------------------------------------------

def test_ckpt_with_or_without_state_dict_wrapper_converts_like_the_safetensors_file(tiny_ldm, tmp_path):
    convert(ck.save_checkpoint(tmp_path / "a.safetensors", tiny_ldm), tmp_path / "a", dtype="fp32", progress=False)
    for wrap in (True, False):
        src = ck.save_checkpoint(tmp_path / f"{wrap}.ckpt", tiny_ldm, wrap=wrap)
        convert(src, tmp_path / str(wrap), dtype="fp32", progress=False)
        assert_same_files(tmp_path / "a", tmp_path / str(wrap))


@pytest.mark.parametrize("source, output", [(torch.float16, "fp32"), (torch.float32, "fp16"), (torch.bfloat16, "fp16")])
def test_source_and_output_dtypes_convert_values_exactly(tiny_ldm, tmp_path, source, output):
    ldm = {k: v.to(source) if v.is_floating_point() else v for k, v in tiny_ldm.items()}
    convert(ck.save_checkpoint(tmp_path / "src.safetensors", ldm), tmp_path / "w", dtype=output, progress=False)
    want = {"fp16": torch.float16, "fp32": torch.float32}[output]
    got = read_files(tmp_path / "w")["unet.safetensors"]
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert got[key].dtype == want
    assert torch.equal(got[key], ldm[keymaps.UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"].to(want))


def test_ema_keys_in_a_training_checkpoint_are_ignored(tiny_ldm, tmp_path):
    convert(ck.save_checkpoint(tmp_path / "a.ckpt", tiny_ldm), tmp_path / "plain", dtype="fp32", progress=False)
    src = ck.save_checkpoint(tmp_path / "b.ckpt", {**tiny_ldm, **ck.ema_keys(tiny_ldm)})
    convert(src, tmp_path / "ema", dtype="fp32", progress=False)
    assert_same_files(tmp_path / "plain", tmp_path / "ema")


@pytest.mark.parametrize("vae_spelling, text_prefix, bin_files", [("legacy", True, False), ("current", False, True)])
def test_folder_spellings_and_file_formats_convert_alike(tmp_path, vae_spelling, text_prefix, bin_files):
    models = ck.reference_models(seed=3)
    ck.write_diffusers_folder(tmp_path / "base", models)
    ck.write_diffusers_folder(tmp_path / "other", models, vae_spelling, text_prefix, safe_serialization=not bin_files)
    convert(tmp_path / "base", tmp_path / "a", dtype="fp32", progress=False)
    convert(tmp_path / "other", tmp_path / "b", dtype="fp32", progress=False)
    assert_same_files(tmp_path / "a", tmp_path / "b")


def test_fp16_variant_files_are_read_when_alone_and_plain_files_preferred(tmp_path):
    half, full = ck.reference_models(seed=4), ck.reference_models(seed=5)
    ck.write_diffusers_folder(tmp_path / "sd", half, variant="fp16")
    convert(tmp_path / "sd", tmp_path / "a", dtype="fp32", progress=False)
    got = read_files(tmp_path / "a")["unet.safetensors"]["conv_in.weight"]
    assert torch.equal(got, half["unet"].conv_in.weight.detach().half().float())
    ck.write_diffusers_folder(tmp_path / "sd", full)  # now both files are there
    convert(tmp_path / "sd", tmp_path / "b", dtype="fp32", progress=False)
    assert torch.equal(read_files(tmp_path / "b")["unet.safetensors"]["conv_in.weight"], full["unet"].conv_in.weight)


def test_model_json_records_the_configs_and_the_source(tiny_ldm, tmp_path):
    import json

    src = ck.save_checkpoint(tmp_path / "tiny.safetensors", tiny_ldm)
    convert(src, tmp_path / "w", progress=False)
    info = json.loads((tmp_path / "w" / "model.json").read_text())
    assert info["format"] == 1
    assert UNetConfig(**info["unet"]) == ck.TINY["unet"] and VAEConfig(**info["vae"]) == ck.TINY["vae"]
    assert CLIPConfig(**info["text_encoder"]) == ck.TINY["text_encoder"]
    assert info["source"] == {"file": "tiny.safetensors", "layout": "single-file", "dtype": "fp16",
                              "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}
    folder = ck.write_diffusers_folder(tmp_path / "sd", ck.reference_models(seed=6))
    convert(folder, tmp_path / "f", progress=False)
    info = json.loads((tmp_path / "f" / "model.json").read_text())["source"]
    parts = [folder / c / n for c, n in [("unet", "diffusion_pytorch_model.safetensors"),
                                         ("vae", "diffusion_pytorch_model.safetensors"),
                                         ("text_encoder", "model.safetensors")]]
    assert info["layout"] == "diffusers" and "unet/diffusion_pytorch_model.safetensors" in info["sha256_of"]
    assert info["sha256"] == hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()


# ---- what is refused, with one sentence each -----------------------------------------------------

class NotATensor:
    """Stands for the training objects (callbacks, optimizers) some .ckpt files pickle."""


def sd2_keys(with_openclip):
    shapes = {k: s for k, s in ldm_manifest("sd21_ldm_manifest.tsv").items()
              if k.startswith(keymaps.UNET + "input_blocks.1.1.") and ("proj_in" in k or "attn2.to_k" in k)}
    if with_openclip:
        shapes.update({k: s for k, s in ldm_manifest("sd21_ldm_manifest.tsv").items() if "ln_final" in k})
    shapes[keymaps.UNET + "input_blocks.0.0.weight"] = (320, 4, 3, 3)
    return {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}


def with_conv_in(ldm, channels):
    return {**ldm, keymaps.UNET + "input_blocks.0.0.weight": torch.zeros(32, channels, 3, 3)}


def truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


REFUSED = {  # name: (writes the file into tmp, given the tiny checkpoint; words the message must hold)
    "sd2": (lambda tmp, ldm: ck.save_checkpoint(tmp / "v2.safetensors", sd2_keys(True)), "Stable Diffusion 2.x"),
    "sd2-unet": (lambda tmp, ldm: ck.save_checkpoint(tmp / "v2.safetensors", sd2_keys(False)), "Stable Diffusion 2.x"),
    "sdxl": (lambda tmp, ldm: ck.save_checkpoint(tmp / "xl.safetensors", {
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(768),
        keymaps.UNET + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}), "SDXL"),
    "inpainting": (lambda tmp, ldm: ck.save_checkpoint(tmp / "in.safetensors", with_conv_in(ldm, 9)), "inpainting"),
    "instruct": (lambda tmp, ldm: ck.save_checkpoint(tmp / "ip2p.ckpt", with_conv_in(ldm, 8)), "InstructPix2Pix"),
    "vae": (lambda tmp, ldm: ck.save_checkpoint(tmp / "vae.safetensors", {
        k: v for k, v in ldm.items() if k.startswith(keymaps.VAE)}), "only a VAE"),
    "bare-vae": (lambda tmp, ldm: ck.save_checkpoint(tmp / "vae.ckpt", {
        k[len(keymaps.VAE):]: v for k, v in ldm.items() if k.startswith(keymaps.VAE)}), "only a VAE"),
    "lora": (lambda tmp, ldm: ck.save_checkpoint(tmp / "lora.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}), "LoRA"),
    "embedding-pt": (lambda tmp, ldm: ck.save_checkpoint(tmp / "emb.pt", {
        "string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.zeros(2, 768)},
        "name": "style", "step": 3000}, wrap=False), "textual-inversion embedding"),
    "embedding-st": (lambda tmp, ldm: ck.save_checkpoint(tmp / "emb.safetensors", {"emb_params": torch.zeros(2, 768)}),
                     "textual-inversion embedding"),
    "truncated-safetensors": (lambda tmp, ldm: truncated(ck.save_checkpoint(tmp / "t.safetensors", ldm)), "truncated"),
    "truncated-ckpt": (lambda tmp, ldm: truncated(ck.save_checkpoint(tmp / "t.ckpt", ldm)), "truncated"),
    "png": (lambda tmp, ldm: ROOT / "assets" / "chelsea.png", "not a checkpoint"),
    "text": (lambda tmp, ldm: (tmp / "notes.safetensors").write_text("just some words\n") and tmp / "notes.safetensors",
             "not a checkpoint"),
    "missing": (lambda tmp, ldm: tmp / "nowhere.safetensors", "does not exist"),
    "unsafe-pickle": (lambda tmp, ldm: ck.save_checkpoint(tmp / "odd.ckpt", {"state_dict": ldm, "cb": NotATensor()},
                                                          wrap=False), "NotATensor"),
    "other-model": (lambda tmp, ldm: ck.save_checkpoint(tmp / "x.safetensors", {"fc.weight": torch.zeros(2, 2)}),
                    "not a Stable Diffusion checkpoint"),
    "key-missing": (lambda tmp, ldm: ck.save_checkpoint(tmp / "m.safetensors", {
        k: v for k, v in ldm.items() if k != keymaps.VAE + "decoder.up.1.block.2.conv1.bias"}),
        "missing vae:decoder.up_blocks.2.resnets.2.conv1.bias"),
    "key-shape": (lambda tmp, ldm: ck.save_checkpoint(tmp / "s.safetensors", {
        **ldm, keymaps.VAE + "encoder.mid.attn_1.q.weight": torch.zeros(64, 64, 3, 3)}),
        "wrong shape first_stage_model.encoder.mid.attn_1.q.weight [64, 576] for encoder.mid_block.attentions.0.to_q"),
    "key-extra": (lambda tmp, ldm: ck.save_checkpoint(tmp / "e.safetensors", {
        **ldm, keymaps.UNET + "input_blocks.1.1.transformer_blocks.1.norm1.weight": torch.ones(32)}),
        "unexpected model.diffusion_model.input_blocks.1.1.transformer_blocks.1.norm1.weight"),
}


@pytest.mark.parametrize("kind", REFUSED)
def test_other_kinds_of_file_are_refused_with_one_sentence(tiny_ldm, tmp_path, kind):
    write, words = REFUSED[kind]
    src = write(tmp_path, tiny_ldm)
    with pytest.raises(DrpError) as error:
        convert(src, tmp_path / "weights", progress=False)
    message = str(error.value)
    assert words in message and str(src.name) in message
    assert "\n" not in message and message.endswith(".")
    assert not (tmp_path / "weights").exists()


def safetensors_starting_with_0x80(path):
    """A small safetensors file whose header length is 128 more than a multiple of 256: byte 0 is 0x80,
    the byte a pickle starts with too (metadata pads the header until it is)."""
    for pad in range(256):
        save_file({"w": torch.arange(6.0).reshape(2, 3)}, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            return path
    raise AssertionError("no padding gives a header length of 128 mod 256")


def test_a_safetensors_file_starting_with_the_pickle_byte_reads_and_its_damaged_copy_says_safetensors(tmp_path):
    src = safetensors_starting_with_0x80(tmp_path / "a.safetensors")
    source = open_tensors(src)
    assert source.shapes == {"w": (2, 3)} and torch.equal(source.read("w"), torch.arange(6.0).reshape(2, 3))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[:-8])  # the header intact, the last tensor's bytes short
    with pytest.raises(DrpError, match=r"cut\.safetensors is a truncated or damaged safetensors file"):
        open_tensors(cut)


def test_a_diffusers_sd2_folder_is_refused(tmp_path):
    folder = ck.write_diffusers_folder(tmp_path / "sd", ck.reference_models(seed=8))
    config = folder / "unet" / "config.json"
    config.write_text(config.read_text().replace('"use_linear_projection": false', '"use_linear_projection": true'))
    with pytest.raises(DrpError, match="Stable Diffusion 2.x"):
        convert(folder, tmp_path / "weights", progress=False)


# ---- writing: all or nothing ---------------------------------------------------------------------

def snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def test_an_interrupted_conversion_leaves_no_partial_output_and_the_old_set_intact(tiny_ldm, tmp_path, monkeypatch):
    import drp.convert

    src = ck.save_checkpoint(tmp_path / "tiny.safetensors", tiny_ldm)
    convert(src, tmp_path / "w", progress=False)
    before = snapshot(tmp_path / "w")
    real, calls = drp.convert.write_safetensors, []

    def dies_on_the_second_file(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(drp.convert, "write_safetensors", dies_on_the_second_file)
    other = ck.save_checkpoint(tmp_path / "other.safetensors", ck.to_single_file(
        {c: ck.file_state_dict(c, m) for c, m in ck.tiny_models(seed=5).items()}))
    with pytest.raises(KeyboardInterrupt):
        convert(other, tmp_path / "w", force=True, progress=False)
    assert snapshot(tmp_path / "w") == before
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        convert(other, tmp_path / "fresh", progress=False)
    assert list((tmp_path / "fresh").iterdir()) == []


def test_an_existing_set_is_replaced_only_with_force(tiny_ldm, tmp_path):
    src = ck.save_checkpoint(tmp_path / "tiny.safetensors", tiny_ldm)
    convert(src, tmp_path / "w", dtype="fp32", progress=False)
    before = snapshot(tmp_path / "w")
    with pytest.raises(DrpError, match="--force"):
        convert(src, tmp_path / "w", dtype="fp16", progress=False)
    assert snapshot(tmp_path / "w") == before
    convert(src, tmp_path / "w", dtype="fp16", force=True, progress=False)
    assert snapshot(tmp_path / "w") != before and "vae.safetensors.tmp" not in snapshot(tmp_path / "w")


# ---- the command line ----------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_reports_a_bad_input_on_one_stderr_line_and_exits_1(tmp_path):
    result = run_cli(ROOT / "assets" / "chelsea.png", "--out", tmp_path / "w")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "not a checkpoint" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_cli_converts_prints_what_it_wrote_and_needs_force_to_overwrite(tiny_ldm, tmp_path, capsys):
    cli = load_script("convert_weights")
    src = ck.save_checkpoint(tmp_path / "tiny.safetensors", tiny_ldm)
    assert cli.main([str(src), "--out", str(tmp_path / "w"), "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in printed] == [str(tmp_path / "w" / name) for name in (*FILES, "model.json")]
    assert cli.main([str(src), "--out", str(tmp_path / "w")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "--force" in error and error.count("\n") == 1
    assert cli.main([str(src), "--out", str(tmp_path / "w"), "--force"]) == 0


def test_cli_download_saves_into_the_out_folder_then_converts(tiny_ldm, tmp_path, monkeypatch):
    import drp.download

    cli = load_script("convert_weights")
    source = ck.save_checkpoint(tmp_path / "tiny.safetensors", tiny_ldm)
    fetched = []

    def fake_download(url, dest, progress=True, sha256=None):
        fetched.append((url, Path(dest)))
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(source.read_bytes())
        return Path(dest)

    monkeypatch.setattr(drp.download, "download", fake_download)
    monkeypatch.setenv("DRP_WEIGHTS_URL", "https://example.org/files/sd-v1-x.safetensors?download=true")
    assert cli.main(["--download", "--out", str(tmp_path / "w"), "--dtype", "fp32"]) == 0
    assert fetched == [("https://example.org/files/sd-v1-x.safetensors?download=true", tmp_path / "w" / "sd-v1-x.safetensors")]
    assert load(tmp_path / "w").source["file"] == "sd-v1-x.safetensors"
    assert (tmp_path / "w" / "sd-v1-x.safetensors").exists()  # kept: nothing the user did not ask is deleted
    assert cli.main(["--download", "--url", "https://example.org/b.safetensors", "--out", str(tmp_path / "w")]) == 1
    assert len(fetched) == 1  # an existing set is refused before, not after, a download


def test_cli_download_of_the_default_file_checks_it_against_the_pinned_sha256(tmp_path, monkeypatch, capsys):
    import drp.download

    asked = []

    def fake_download(url, dest, progress=True, sha256=None):  # stops the CLI before any conversion
        asked.append((url, Path(dest), sha256))
        raise DrpError("the test stops here.")

    monkeypatch.setattr(drp.download, "download", fake_download)
    monkeypatch.delenv("DRP_WEIGHTS_URL", raising=False)
    assert load_script("convert_weights").main(["--download", "--out", str(tmp_path / "w")]) == 1
    assert asked == [(drp.download.DEFAULT_URL, tmp_path / "w" / "v1-5-pruned-emaonly.safetensors",
                      drp.download.DEFAULT_SHA256)]
    assert capsys.readouterr().err == "error: the test stops here.\n"
    monkeypatch.setenv("DRP_WEIGHTS_URL", "https://example.org/other.safetensors")  # no published hash to pin
    load_script("convert_weights").main(["--download", "--out", str(tmp_path / "w")])
    assert asked[-1][2] is None


# ---- the one full-size test ----------------------------------------------------------------------

def test_full_size_sd15_file_converts_like_diffusers_tensor_by_tensor_and_the_unet_agrees(tmp_path):
    """A random fp16 file with exactly the SD 1.5 keys and shapes (2.1 GB): our conversion equals
    diffusers' single-file conversion for every tensor, and the full UNet agrees on a small latent.
    Peak resident memory is about 7.5 GB: the source in fp16, then one fp32 UNet at a time."""
    try:
        check_full_size(tmp_path)
    finally:  # pytest keeps the last runs' tmp folders: do not leave gigabytes there
        shutil.rmtree(tmp_path, ignore_errors=True)


def check_full_size(tmp_path):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    ldm = ck.random_ldm_checkpoint(ldm_manifest(), torch.float16, seed=0)
    src = ck.save_checkpoint(tmp_path / "v1-5-random.safetensors", ldm)
    convert(src, tmp_path / "w", dtype="fp16", progress=False)
    src.unlink()

    ucfg = {**ck.diffusers_unet_config(UNetConfig()), "sample_size": 64}
    reference = {
        "unet.safetensors": convert_ldm_unet_checkpoint(ldm, ucfg),
        "vae.safetensors": convert_ldm_vae_checkpoint(ldm, ck.diffusers_vae_config(VAEConfig())),
        "text_encoder.safetensors": {k: v for k, v in convert_ldm_clip_checkpoint(ldm).items()
                                     if not k.endswith("position_ids")},
    }
    for name, want in reference.items():
        with safe_open(str(tmp_path / "w" / name), "pt") as f:
            assert set(f.keys()) == set(want)
            for key in f.keys():
                assert torch.equal(f.get_tensor(key), want[key]), key
    assert [len(want) for want in reference.values()] == [686, 248, 196]
    unet_state = reference["unet.safetensors"]
    del ldm, reference, want
    gc.collect()

    g = torch.Generator().manual_seed(421)
    x, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    sd = load(tmp_path / "w")  # fp32 on the CPU
    with torch.no_grad():
        ours = sd.unet(x, 421, context)
    del sd
    gc.collect()
    with torch.device("meta"):
        ref = UNet2DConditionModel(**ucfg)
    ref.load_state_dict({k: unet_state.pop(k).float() for k in list(unet_state)}, strict=True, assign=True)
    with torch.no_grad():
        expected = ref.eval()(x, 421, context).sample
    assert rel_err(ours, expected) < TOL
