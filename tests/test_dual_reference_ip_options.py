"""The IP-Adapter mode's knobs: each one checked before any work, each one reachable from sample.py.

`dual_reference_ip.check_options(opts, layer_names=None)` checks every knob without a model; `generate`
calls it before any reference is read, and sample.py before the weights are loaded. A flag of the
DRP-Diff mode that does not run is an `error:` line naming the flag and its mode. The in-process calls
of `sample.main` run the same code as `python sample.py` without starting Python each time.
"""

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import drp
from drp import dual_reference_ip as dri
from drp.convert import convert
from drp.errors import DrpError
from drp.ip_adapter import attn2_layers
from drp.png_info import parameters_text
from drp.report import text_lines
from drp.unet import UNetConfig
from ip_checkpoints import adapter_file, reference_encoder, save_adapter, tiny_ip_sd
from tiny import tiny_weights_dir
from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
CONTENT, STYLE = str(ROOT / "assets/chelsea.png"), str(ROOT / "assets/starry_night.jpg")
PROMPT = "a cat sitting on the beach"
TINY_LAYERS = list(attn2_layers(UNetConfig.tiny()))


sample = load_script("sample")


# --- the API: check_options and generate -------------------------------------------------------------------


BAD_OPTIONS = [  # (knobs, the start of the sentence)
    (dict(ip_layers=[]), "ip_layers [] names no layer"),
    (dict(ip_layers=""), "ip_layers '' names no layer"),
    (dict(ip_layers=" , "), "ip_layers ' , ' names no layer"),
    (dict(ip_layers=3), "ip_layers must be a list of block or layer names"),
    (dict(ip_layers=["up_blocks.1", 2]), "ip_layers must be a list of block or layer names"),
    (dict(scale_early=-0.1), "scale_early must be a finite number ≥ 0"),
    (dict(scale_late=math.inf), "scale_late must be a finite number ≥ 0"),
    (dict(scale_late=math.nan), "scale_late must be a finite number ≥ 0"),
    (dict(scale_early=True), "scale_early must be a finite number ≥ 0"),
    (dict(scale_early="0.6"), "scale_early must be a finite number ≥ 0"),
    (dict(scale_late={"up_blocks.1": -1.0}), "scale_late must map block names to finite numbers ≥ 0"),
    (dict(scale_early={"mid_block": math.nan}), "scale_early must map block names to finite numbers ≥ 0"),
    (dict(scale_early={"up_blocks.1": math.inf}), "scale_early must map block names to finite numbers ≥ 0"),
    (dict(ip_layers=["up_blocks.1"], scale_late={"mid_block": 1.0}),
     "scale_late names 'mid_block', which is outside ip_layers (up_blocks.1)"),
    (dict(ip_layers="up_blocks.1.attentions.0", scale_early={"up_blocks.1.attentions.2": 1.0}),
     "scale_early names 'up_blocks.1.attentions.2', which is outside ip_layers"),
    (dict(fixed_switch=1), "fixed_switch must be True or False"),
    (dict(bg_prompt="no"), "bg_prompt must be True or False"),
    (dict(filter_values=None), "filter_values must be True or False"),
    (dict(bg_placeholder=None), "bg_placeholder must be a string"),
    (dict(late="content-only"), "late must be"),
    (dict(rank_rule="median"), "rank_rule must be"),
    (dict(rank_energy=0), "rank_energy must be a number in (0, 1]"),
    (dict(floor=1.5), "floor must be a number in (0, 1]"),
    (dict(power=math.nan), "power must be a number from 0 to 4"),
]


@pytest.mark.parametrize("knobs, message", BAD_OPTIONS, ids=[repr(k) for k, _ in BAD_OPTIONS])
def test_check_options_refuses_each_bad_knob_in_one_sentence_without_a_model(knobs, message):
    with pytest.raises(DrpError) as e:
        dri.check_options(dri.Options(**knobs))
    assert str(e.value).startswith(message) and str(e.value).endswith(".") and "\n" not in str(e.value)


def test_check_options_takes_every_good_form_of_each_knob():
    for knobs in ({}, dict(ip_layers="up_blocks.1, mid_block", scale_early={"up_blocks.1": 1, "mid_block": 0}),
                  dict(ip_layers=("up_blocks",), scale_late={"up_blocks.1.attentions.0": 0.5}, scale_early=0),
                  dict(ip_layers=["up_blocks.1.attentions.0"], scale_early={"up_blocks.1": 2.0}),
                  dict(rank_rule="gd", floor=1.0, power=0, fixed_switch=True, bg_prompt=False, filter_values=True)):
        dri.check_options(dri.Options(**knobs))
        dri.check_options(dri.Options(**knobs), list(attn2_layers()))  # SD 1.5's 16 layers


def test_with_the_layer_names_check_options_refuses_names_the_unet_does_not_have():
    sd15 = list(attn2_layers())
    with pytest.raises(DrpError, match="ip_layers names 'up_blocks.0', which is no attn2 layer or block"):
        dri.check_options(dri.Options(ip_layers="up_blocks.0"), sd15)  # SD 1.5's up_blocks.0 has no attention
    with pytest.raises(DrpError, match="the IP-Adapter scale names 'down_blocks.3'"):
        dri.check_options(dri.Options(scale_early={"down_blocks.3": 1.0}), sd15)


@pytest.fixture(scope="module")
def sd():
    return tiny_ip_sd()


@pytest.mark.parametrize("knobs, message", BAD_OPTIONS, ids=[repr(k) for k, _ in BAD_OPTIONS])
def test_generate_refuses_each_bad_knob_before_reading_a_picture(sd, knobs, message):
    with pytest.raises(DrpError) as e:  # a picture that does not exist: read first, it would be the error
        drp.generate(sd, PROMPT, content="nowhere.png", subject="cat", mode="ip-adapter", steps=2, height=64,
                     width=64, progress=False, **knobs)
    assert str(e.value).startswith(message)


def test_a_prompt_that_is_only_the_subject_warns_what_the_early_stage_sees(sd):
    with pytest.warns(UserWarning, match=r"C_bg, the early stage's text, is empty: the early steps see the empty "
                                         r"prompt .* and the references' foreground alone"):
        result = drp.generate(sd, "Cat", content=Image.new("RGB", (64, 64), (200, 90, 40)), subject="cat",
                              mode="ip-adapter", steps=2, height=64, width=64, progress=False)
    assert result.info["drp"]["C_bg"] == ""


# --- the command line --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny SD weights folder, and a second one with IP-Adapter's files converted beside SD's."""
    tmp = tmp_path_factory.mktemp("weights")
    plain, with_ip = tiny_weights_dir(tmp / "plain"), tiny_weights_dir(tmp / "ip")
    convert(save_adapter(tmp / "h94" / "ip-adapter_sd15.safetensors", adapter_file("base", seed=2)), with_ip,
            dtype="fp32", progress=False)
    reference_encoder(seed=5).save_pretrained(tmp / "h94" / "image_encoder")
    convert(tmp / "h94" / "image_encoder", with_ip, dtype="fp32", progress=False)
    return plain, with_ip


QUICK = ["--steps", "2", "--height", "64", "--width", "64", "--no-progress", "--device", "cpu", "--dtype", "fp32"]
REFS = ["--prompt", PROMPT, "--subject", "cat", "--content", CONTENT, "--style", STYLE]

CLI_ERRORS = [  # (folder: "plain" or "ip", arguments, the start of the error line)
    ("plain", REFS + ["--rank-energy", "0.7"], "--rank-energy is a setting of the ip-adapter mode, and --mode auto "
     "chose self-attention because {plain} lacks ip_adapter.json, image_encoder.json; get IP-Adapter's files with "
     "`python convert_weights.py --download ip-adapter`, or drop --rank-energy."),
    ("plain", REFS + ["--filter-values"], "--filter-values is a setting of the ip-adapter mode, and --mode auto"),
    ("ip", REFS + ["--mode", "self-attention", "--floor", "0.1"],
     "--floor is a setting of the ip-adapter mode, not of --mode self-attention; drop it, or use --mode ip-adapter."),
    ("ip", REFS + ["--layers", "up_blocks.3"], "--layers is a setting of the self-attention mode, and --mode auto "
     "chose ip-adapter because IP-Adapter's files are in {ip}; add --mode self-attention, or drop --layers."),
    ("ip", REFS + ["--no-masks"], "--no-masks is a setting of the self-attention mode"),
    ("ip", REFS + ["--style-caption", "a painting"], "--style-caption is a setting of the self-attention mode"),
    ("ip", REFS + ["--no-cache"], "--no-cache is a setting of the self-attention mode"),
    ("ip", REFS + ["--mode", "ip-adapter", "--cache-dir", "{tmp}"], "--cache-dir is a setting of the self-attention "
     "mode, not of --mode ip-adapter"),
    ("ip", ["--prompt", "a cat", "--power", "1"], "--power is a setting of DRP-Diff, which runs only with references"),
    ("plain", ["--prompt", "a cat", "--switch-step", "1"], "--switch-step is a setting of DRP-Diff, which runs only"),
    ("plain", ["--prompt", "a cat", "--fixed-switch"], "--fixed-switch is a setting of DRP-Diff, which runs only"),
    ("plain", REFS + ["--fixed-switch", "--switch-step", "1"], "--fixed-switch and --switch-step both choose"),
    ("plain", REFS + ["--switch-step", "3"], "switch_step must be a whole number from 0 to 2"),
    ("plain", ["--prompt", PROMPT, "--style", STYLE, "--content-mask", CONTENT], "--content-mask is the mask of "
     "--content, and no --content was given"),
    ("ip", ["--prompt", "a cat", "--ip-scale", "0.5"], "--ip-scale is the scale of the --ip-image prompt"),
    ("ip", REFS + ["--ip-image", CONTENT], "--ip-image is a plain image prompt and cannot be combined"),
    ("ip", REFS + ["--scale-early", "-1"], "scale_early must be a finite number ≥ 0"),
    ("ip", REFS + ["--scale-late", "up_blocks.1=1,mid_block=-0.5"], "scale_late must map block names to finite"),
    ("ip", REFS + ["--ip-layers", "up_blocks.1", "--scale-late", "mid_block=1"],
     "scale_late names 'mid_block', which is outside ip_layers (up_blocks.1)"),
    ("ip", REFS + ["--ip-layers", " , "], "ip_layers ' , ' names no layer"),
    ("ip", REFS + ["--ip-layers", "up_blocks.0"], "ip_layers names 'up_blocks.0', which is no attn2 layer"),
    ("ip", REFS + ["--scale-early", "down_blocks.3=1"], "the IP-Adapter scale names 'down_blocks.3'"),
    ("ip", REFS + ["--rank-energy", "1.5"], "rank_energy must be a number in (0, 1]"),
    ("ip", REFS + ["--floor", "0"], "floor must be a number in (0, 1]"),
    ("ip", REFS + ["--power", "5"], "power must be a number from 0 to 4"),
]


@pytest.mark.parametrize("folder, args, message", CLI_ERRORS, ids=[" ".join(a[-2:]) for _, a, _ in CLI_ERRORS])
def test_a_flag_the_run_would_not_use_or_a_bad_knob_is_one_error_line_before_the_weights_load(
        folders, tmp_path, capsys, monkeypatch, folder, args, message):
    def no_loading(*a, **kw):
        raise AssertionError("the weights were loaded before the settings were checked")

    monkeypatch.setattr(sample.drp, "load", no_loading)
    plain, with_ip = folders
    weights = {"plain": plain, "ip": with_ip}[folder]
    argv = ["--weights", str(weights), *QUICK, "--out", str(tmp_path / "x.png")]
    assert sample.main(argv + [a.format(tmp=tmp_path) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(plain=plain, ip=with_ip, tmp=tmp_path)), err
    assert err.count("\n") == 1 and err.endswith(".\n")
    assert not (tmp_path / "x.png").exists()


def test_help_lists_the_knobs_of_both_modes_with_their_defaults(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--rank-energy E", "0.5"), ("--rank-rule", "energy"), ("--floor E", "0.05"),
                          ("--power P", "2"), ("--scale-early S", "0.6"), ("--scale-late S", "0.6"),
                          ("--late", "both"), ("--bg-placeholder TEXT", "nothing"),
                          ("--ip-layers BLOCKS", "every attn2 layer"), ("--filter-values", "off"),
                          ("--layers BLOCKS", "up_blocks.2,up_blocks.3"), ("--ip-scale S", "0.6")):
        assert flag in shown, flag
        after = shown[shown.rindex(flag):]  # its entry, after the usage line
        assert after[after.index("(default: "):].startswith(f"(default: {default}"), flag  # the entry's own default


KNOB_FLAGS = ["--rank-energy", "0.8", "--rank-rule", "gd", "--floor", "0.3", "--power", "1", "--scale-early",
              "up_blocks.1=1,mid_block=0.5", "--scale-late", "0.9", "--late", "style-only", "--bg-placeholder", "dog",
              "--ip-layers", "up_blocks.1,mid_block", "--filter-values", "--fixed-switch"]
KNOBS = dict(rank_energy=0.8, rank_rule="gd", floor=0.3, power=1.0, scale_early={"up_blocks.1": 1.0, "mid_block": 0.5},
             scale_late=0.9, late="style-only", bg_placeholder="dog", ip_layers="up_blocks.1,mid_block",
             filter_values=True, fixed_switch=True)


def test_each_knob_flag_becomes_its_knob_and_only_given_flags_do():
    args = sample.parse_args(REFS + KNOB_FLAGS + ["--no-bg-prompt"])
    settings = sample.generate_settings(args, "ip-adapter")
    assert {k: settings[k] for k in KNOBS} == KNOBS and settings["bg_prompt"] is False
    bare = sample.generate_settings(sample.parse_args(REFS), "ip-adapter")
    assert not set(bare) & (set(KNOBS) | {"bg_prompt"})  # the rest keep drp.generate's defaults
    self_attention = sample.generate_settings(sample.parse_args(REFS + ["--layers", "up_blocks.3", "--no-masks"]),
                                              "self-attention")
    assert (self_attention["layers"], self_attention["use_masks"]) == ("up_blocks.3", False)


def test_a_png_made_from_the_flags_equals_the_same_call_in_python(folders, tmp_path, capsys):
    _, weights = folders
    out = tmp_path / "flags.png"
    argv = ["--weights", str(weights), *QUICK, *REFS, *KNOB_FLAGS, "--seed", "3", "--out", str(out)]
    assert sample.main(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("mode: ip-adapter")
    expected = drp.generate(drp.load(weights), PROMPT, steps=2, height=64, width=64, seed=3, progress=False,
                            content=CONTENT, style=STYLE, subject="cat", **KNOBS)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected.images[0]))
    default = drp.generate(drp.load(weights), PROMPT, steps=2, height=64, width=64, seed=3, progress=False,
                           content=CONTENT, style=STYLE, subject="cat")
    assert not np.array_equal(np.asarray(default.images[0]), np.asarray(expected.images[0]))

    text = Image.open(out).text["parameters"]
    for field in ('DRP rank energy: 0.8', 'DRP rank rule: gd', 'DRP floor: 0.3', 'DRP power: 1',
                  'DRP scale early: "up_blocks.1=1,mid_block=0.5"', 'DRP scale late: 0.9', 'DRP late: style-only',
                  'DRP IP layers: "up_blocks.1,mid_block"', 'DRP filter values: True', 'DRP C_bg: a dog sitting on '
                  'the beach', 'DRP alpha: 0.5'):
        assert field in text, field
    assert "{" not in text and "'" not in text  # no Python repr of a dict or a list
    assert "DRP filter values" not in parameters_text(default.info)  # off: left out, as "Tiled decode"
    lines = "\n".join(text_lines(expected.info))
    assert "scales: early up_blocks.1=1, mid_block=0.5, late 0.9" in lines
    assert "image attention in: up_blocks.1, mid_block;   early values: filtered" in lines
    assert "image attention in: every attn2 layer;   early values: W_v" in "\n".join(text_lines(default.info))
