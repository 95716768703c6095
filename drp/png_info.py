"""The generation settings inside every PNG, in the text format the Stable Diffusion web UIs write.

Where it sits: after `generate`, when an image is saved. The AUTOMATIC1111 web UI (and the tools that
read its files: prompt readers, image browsers, "PNG info" tabs) keep the settings in a PNG text chunk
named `parameters`:

    a cat sitting on a beach
    Negative prompt: blurry
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly

Line 1 is the prompt, line 2 (only when there is one) the negative prompt, the last line `key: value`
pairs separated by ", ". Size is width x height. A value holding a comma, a colon or a newline is
written as a JSON string, as the web UI does, so the line still splits cleanly. DRP-Diff's settings are
appended as further pairs (`DRP switch step: 23`, …; an ablation that is off is left out), an image
prompt's as `IP-Adapter: ip-adapter_sd15, IP-Adapter scale: 0.6, IP-Adapter images: cat.png`.

The file holds nothing that changes from run to run (no time stamp), so the same seed and settings give
the same bytes.
"""

import json
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from .files import write_atomically

# DRP-Diff's report keys (`result.info["drp"]`) shown in the parameters line, in this order.
DRP_FIELDS = (
    ("mode", "DRP mode"),
    ("subject", "DRP subject"),
    ("content", "DRP content"),
    ("style", "DRP style"),
    ("H_cu", "DRP H_cu"),
    ("H_st", "DRP H_st"),
    ("rho", "DRP rho"),
    ("alpha", "DRP alpha"),
    ("switch_step", "DRP switch step"),
    ("adapter", "DRP IP-Adapter"),  # the ip-adapter mode's file and knobs
    ("rank_energy", "DRP rank energy"),
    ("rank_rule", "DRP rank rule"),
    ("floor", "DRP floor"),
    ("power", "DRP power"),
    ("scale_early", "DRP scale early"),
    ("scale_late", "DRP scale late"),
    ("late", "DRP late"),
    ("ip_layers", "DRP IP layers"),
    ("filter_values", "DRP filter values"),  # shown only when on, as "Tiled decode"
    ("C_bg", "DRP C_bg"),
)


def setting_text(v):
    """A setting as the web UI writes it: numbers plainly (7.5, 7), text JSON-quoted when it would break the line.

    A per-block scale is written as sample.py takes it (`up_blocks.1=1,mid_block=0.5`), a list of names
    comma-separated.
    """
    if isinstance(v, dict):
        v = ",".join(f"{k}={setting_text(x)}" for k, x in v.items())
    elif isinstance(v, (list, tuple)):
        v = ",".join(map(str, v))
    elif isinstance(v, float):
        v = round(v, 4)  # 4 decimals: enough to tell settings apart, short enough to read
        v = int(v) if v.is_integer() else v
    text = str(v)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _model_name(model):
    """The checkpoint's file name without its extension ("v1-5-pruned-emaonly"), as the web UI shows it."""
    name = Path(str(model)).name
    for ext in (".safetensors", ".ckpt"):
        name = name.removesuffix(ext)
    return name


def parameters_text(info, index=0):
    """`Result.info` -> the web UI's `parameters` text for image `index` of the batch."""
    lines = [info["prompt"][index]]
    if info.get("negative_prompt"):
        lines.append(f"Negative prompt: {info['negative_prompt']}")
    fields = {
        "Steps": info["steps"],
        "Sampler": info["sampler"],
        "CFG scale": info["guidance"],
        "Seed": info["seeds"][index],
        "Size": f"{info['width']}x{info['height']}",
        "Model": _model_name(info["model"]),
    }
    if info["eta"] > 0:
        fields["Eta"] = info["eta"]
    if info.get("tiled_decode"):  # changes the pixels a little: needed to make the same image again
        fields["Tiled decode"] = "True"
    ip = info.get("ip_adapter")
    if ip:  # the web UIs' ControlNet extension names it similarly; a per-block scale as --ip-scale takes it
        fields["IP-Adapter"] = _model_name(ip["file"])
        fields["IP-Adapter scale"] = ip["scale"]
        fields["IP-Adapter images"] = " | ".join(ip["images"])
    drp = info.get("drp") or {}
    fields.update({label: drp[key] for key, label in DRP_FIELDS if drp.get(key) is not None and drp[key] is not False})
    lines.append(", ".join(f"{key}: {setting_text(v)}" for key, v in fields.items()))
    return "\n".join(lines)


def save_png(img, path, text):
    """Write `img` as a PNG at `path` with `text` in a `parameters` chunk: to a temporary file, then renamed."""
    path = Path(path)
    meta = PngInfo()
    meta.add_text("parameters", text)
    write_atomically(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=meta), "choose another folder.")
