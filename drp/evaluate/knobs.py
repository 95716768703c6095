"""`run --set KEY=VALUE`: the knobs of DRP-Diff's modes, typed from their Options and checked before loading.

Where it sits: between the command line and `run`, so that one run folder is one row of an ablation
table (`--set bg_prompt=false`, `--set use_masks=false`, `--set switch_step=10`). A mode's knobs are
the fields of its frozen `Options` (drp/dual_reference.py for self-attention, drp/dual_reference_ip.py
for ip-adapter) plus `switch_step`, which `generate` takes in both modes. Each field's default and
annotation say how its text is read, so a field added to an Options class is a knob here without an edit:

    bool                          true/false (also yes/no, on/off, 1/0)
    int, float                    a number (finite)
    str                           the text as given
    a tuple                       items separated by commas, typed like the default's (names, numbers)
    a number, annotated `object`  a number or BLOCK=NUMBER pairs: a scale, as `--ip-scale` reads it
    anything else                 the text as given
    default None                  also `none`

The values are then checked with the modes' own checks (`make_options`, the ip-adapter mode's
`check_options` with the adapter's layers in `ip_adapter.json`; for self-attention the layer names against the UNet of `model.json`), reading no
weights. config.json keeps the values as JSON (tuples become lists); `options_for_generate` turns them back.
"""

import json
import math
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from types import SimpleNamespace

from .. import dual_reference, dual_reference_ip
from ..errors import DrpError
from ..ip_adapter import IPAdapterConfig, attn2_layers, parse_scale
from ..method_common import check_switch_step, make_options
from ..model_io import read_model_json
from ..unet import under

OPTIONS = {"self-attention": dual_reference.Options, "ip-adapter": dual_reference_ip.Options}
GENERATE_KNOBS = {"switch_step": SimpleNamespace(name="switch_step", type=int, default=None)}
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
# the self-attention mode's knobs that name UNet layers: a name matching none would change nothing, silently
LAYER_KNOBS = {"layers": ("attn1", "prefix"), "mask_layers": ("attn2", "prefix"), "self_layer": ("attn1", "exact")}


def knobs_of(mode):
    """{name: field} of a mode's knobs (its Options' fields and switch_step)."""
    return {f.name: f for f in fields(OPTIONS[mode])} | GENERATE_KNOBS


def type_name(annotation):
    """'float' for float, Optional[float] and float | None; the name of any other annotation."""
    if isinstance(annotation, str):  # `from __future__ import annotations`
        return annotation.replace("Optional[", "").split(" |")[0].split("[")[0].rstrip("]")
    inner = [a for a in typing.get_args(annotation) if a is not type(None)]
    if inner and len(inner) < len(typing.get_args(annotation)):  # X | None: the X
        annotation = inner[0]
    return getattr(typing.get_origin(annotation) or annotation, "__name__", str(annotation))


def kind_of(field):
    """How a knob's text is read: "bool", "int", "float", "str", "tuple", "scale" or "text"."""
    name, default = type_name(field.type), field.default
    if name == "bool" or isinstance(default, bool):
        return "bool"
    if name in ("int", "float", "str"):
        return name
    if name in ("tuple", "list") or isinstance(default, (tuple, list)):
        return "tuple"
    if isinstance(default, (int, float)):
        return "scale"
    return "text"


def element_kind(field):
    """The kind of a tuple knob's items: that of its default's items ("str" when it has none)."""
    items = field.default if isinstance(field.default, tuple) else ()
    for kind in ("int", "float"):
        if items and all(type(x).__name__ == kind for x in items):
            return kind
    return "str"


WHAT = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "text", "text": "text",
        "scale": "a number or BLOCK=NUMBER pairs such as up_blocks.1=1,mid_block=0.5"}
PLURAL = {"str": "names", "int": "whole numbers", "float": "numbers"}


def read_number(text, kind):
    value = int(text) if kind == "int" else float(text)  # ValueError for text that is no number
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def parse_value(key, field, text):
    """A knob's value from its text (a value that is not text is taken as it is)."""
    if not isinstance(text, str):
        return text
    kind = kind_of(field)
    if field.default is None and text.strip().lower() == "none":
        return None
    try:
        if kind == "bool":
            word = text.strip().lower()
            if word not in TRUE + FALSE:
                raise ValueError(text)
            return word in TRUE
        if kind in ("int", "float"):
            return read_number(text.strip(), kind)
        if kind == "tuple":
            items = [s.strip() for s in text.split(",") if s.strip()]
            each = element_kind(field)
            return tuple(read_number(s, each) if each != "str" else s for s in items)
        if kind == "scale":
            return parse_scale(text)
    except (ValueError, DrpError):
        what = f"{PLURAL[element_kind(field)]} separated by commas" if kind == "tuple" else WHAT[kind]
        default = "" if field.default is MISSING else f", default {field.default!r}"
        raise DrpError(f"--set {key}={text!r} is not a value of {key}, which takes {what}{default}.") from None
    return text


def check_mode_takes_knobs(mode, knobs):
    if knobs and mode not in OPTIONS and mode != "auto":  # auto is one of them, known once the weights are
        other = "the image prompt's scale is --ip-scale" if mode == "image-prompt" else "it is the prompt alone"
        raise DrpError(f"--set sets DRP-Diff's knobs, and the {mode} mode has none ({other}); leave --set out "
                       "or choose --mode self-attention, ip-adapter or auto.")


def typed_knobs(mode, knobs):
    """{key: value} of `knobs` (text from --set, or values) for `mode`, typed; one sentence for a bad key or value."""
    check_mode_takes_knobs(mode, knobs)
    if not knobs:
        return {}
    known = knobs_of(mode)
    out = {}
    for key, text in knobs.items():
        if key not in known:
            others = [m for m in OPTIONS if m != mode and key in knobs_of(m)]
            if others:
                raise DrpError(f"{key} is a knob of the {others[0]} mode, not of the {mode} mode this run uses; "
                               f"choose --mode {others[0]}, or leave --set {key} out.")
            raise DrpError(f"unknown knob {key!r} for the {mode} mode; its knobs are: {', '.join(sorted(known))}.")
        out[key] = parse_value(key, known[key], text)
    return out


def as_json(knobs):
    """The knobs as config.json holds them (tuples as lists), so a folder's settings compare equal."""
    return json.loads(json.dumps(knobs))


def options_for_generate(mode, knobs):
    """config.json's knobs -> drp.generate's keyword arguments (lists back to the tuples the Options hold)."""
    known = knobs_of(mode) if mode in OPTIONS else {}
    return {k: tuple(v) if isinstance(v, list) and kind_of(known[k]) == "tuple" else v for k, v in knobs.items()}


def adapter_layers(weights):
    """The attn2 names of the converted IP-Adapter, from ip_adapter.json (no tensor is read)."""
    path = Path(weights) / "ip_adapter.json"
    try:
        cfg = IPAdapterConfig(**json.loads(path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DrpError(f"{path} cannot be read ({e}); convert the IP-Adapter again with "
                       "`python convert_weights.py --download ip-adapter`.") from None
    return [name for name, _ in cfg.layers]


def check_layer_names(key, value, names, how):
    wanted = [value] if isinstance(value, str) else list(value)
    for w in wanted:
        hit = w in names if how == "exact" else any(under(n, w) for n in names)
        if not hit:
            blocks = sorted({"mid_block" if n.startswith("mid_block") else ".".join(n.split(".")[:2]) for n in names})
            raise DrpError(f"{key} names {w!r}, which is no {'layer' if how == 'exact' else 'block or layer'} of "
                           f"the UNet with that attention; use names such as {', '.join(blocks)}.")


def check_knobs(mode, knobs, weights, steps):
    """Check typed knobs with the mode's own checks, reading only the weights' JSON descriptions."""
    check_mode_takes_knobs(mode, knobs)
    if not knobs:
        return
    if "switch_step" in knobs:
        check_switch_step(knobs["switch_step"], steps)
    options = {k: v for k, v in options_for_generate(mode, knobs).items() if k not in GENERATE_KNOBS}
    opts = make_options(OPTIONS[mode], options, mode)
    if mode == "ip-adapter":  # every knob, the layer and block names against the converted adapter's layers
        dual_reference_ip.check_options(opts, adapter_layers(weights))
    else:
        unet = read_model_json(weights)[1]["unet"]
        names = {"attn2": list(attn2_layers(unet))}
        names["attn1"] = [n.replace(".attn2", ".attn1") for n in names["attn2"]]
        for key, (attention, how) in LAYER_KNOBS.items():
            if key in options:
                check_layer_names(key, options[key], names[attention], how)
