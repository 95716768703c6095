"""`run --set KEY=VALUE` (drp/evaluate/knobs.py): every field of the modes' Options is a knob, typed from its
default and annotation, and a field added to an Options class becomes one with no edit. The CLI's refusals
before loading are in tests/test_evaluate_run.py."""

import typing
from dataclasses import dataclass, fields

import pytest

from drp import dual_reference, dual_reference_ip
from drp.errors import DrpError
from drp.evaluate import knobs as K


def test_every_field_of_both_modes_options_and_switch_step_are_knobs():
    for mode, options in (("self-attention", dual_reference.Options), ("ip-adapter", dual_reference_ip.Options)):
        assert set(K.knobs_of(mode)) == {f.name for f in fields(options)} | {"switch_step"}


def test_text_is_typed_by_each_fields_default_and_annotation():
    ip = K.typed_knobs("ip-adapter", dict(bg_prompt="false", fixed_switch="Yes", rank_energy="0.7", power="1",
                                          rank_rule="gd", scale_early="0.8", scale_late="up_blocks.1=1, mid_block=0",
                                          ip_layers="up_blocks.1,mid_block", switch_step="12"))
    assert ip == dict(bg_prompt=False, fixed_switch=True, rank_energy=0.7, power=1.0, rank_rule="gd",
                      scale_early=0.8, scale_late={"up_blocks.1": 1.0, "mid_block": 0.0},
                      ip_layers="up_blocks.1,mid_block", switch_step=12)
    assert type(ip["power"]) is float and type(ip["switch_step"]) is int
    sa = K.typed_knobs("self-attention", dict(layers="up_blocks.3", record_t="100, 900", use_masks="off",
                                              content_bias="0", gen_mask_warmup="3", cache_dir="none"))
    assert sa == dict(layers=("up_blocks.3",), record_t=(100, 900), use_masks=False, content_bias=0.0,
                      gen_mask_warmup=3, cache_dir=None)
    assert K.options_for_generate("self-attention", K.as_json(sa))["layers"] == ("up_blocks.3",)  # JSON list -> tuple


@pytest.mark.parametrize("mode, knob, sentence", [
    ("ip-adapter", dict(rank_energy="nan"), "--set rank_energy='nan' is not a value of rank_energy, which takes a"),
    ("ip-adapter", dict(switch_step="1.5"), "switch_step, which takes a whole number"),
    ("ip-adapter", dict(scale_late="up_blocks.1"), "which takes a number or BLOCK=NUMBER pairs"),
    ("self-attention", dict(record_t="200,late"), "record_t, which takes whole numbers separated by commas"),
    ("self-attention", dict(adain="2"), "adain, which takes true or false, default True"),
    ("self-attention", dict(late="both"), "late is a knob of the ip-adapter mode, not of the self-attention mode"),
    ("image-prompt", dict(late="both"), "the image-prompt mode has none (the image prompt's scale is --ip-scale)"),
])
def test_a_bad_key_or_value_is_one_sentence(mode, knob, sentence):
    with pytest.raises(DrpError) as e:
        K.typed_knobs(mode, knob)
    assert sentence in str(e.value) and str(e.value).endswith(".") and "\n" not in str(e.value)


def test_a_field_added_to_an_options_class_is_a_knob_without_an_edit(monkeypatch):
    @dataclass(frozen=True)
    class Grown(dual_reference_ip.Options):
        filter_values: bool = False
        value_scale: object = 1.0  # a scale, like scale_early
        value_layers: tuple = ("up_blocks.1",)
        value_floor: typing.Optional[float] = None
        value_steps: int | None = None

    monkeypatch.setattr(K, "OPTIONS", dict(K.OPTIONS, **{"ip-adapter": Grown}))
    got = K.typed_knobs("ip-adapter", dict(filter_values="true", value_scale="up_blocks.2=0.5",
                                           value_layers="up_blocks.1,up_blocks.2", value_floor="0.1",
                                           value_steps="none"))
    assert got == dict(filter_values=True, value_scale={"up_blocks.2": 0.5}, value_floor=0.1, value_steps=None,
                       value_layers=("up_blocks.1", "up_blocks.2"))
    with pytest.raises(DrpError, match="filter_values, which takes true or false"):
        K.typed_knobs("ip-adapter", dict(filter_values="sometimes"))
