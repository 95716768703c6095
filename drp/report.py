"""A one-picture report of a DRP-Diff run: the references with their masks, the output, the numbers.

Where it sits in DRP-Diff: after `pipeline.generate` returns a `Result`, this draws for a reader what
the method decided — which parts of each reference counted as foreground (tinted red), where the
generated subject was found, the image produced, and the entropy switch (ALGORITHM.md §4):
H_cu, H_st, ρ, α, and the step N_e at which the early stage handed over to the late one.

    ┌─────────┬─────────┬───────────┬────────┐
    │ content │  style  │ generated │ output │   panels at the output size, masks tinted red
    │ + mask  │ + mask  │ + mask    │        │
    └─────────┴─────────┴───────────┴────────┘
     captions, then the prompt, seed and DRP-Diff numbers as text lines

Panels for a reference or mask that is not there are left out. PIL only, with its default font.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import DrpError
from .images import fit, load_image

PAD = 8  # pixels between panels and around the edges
LINE_GAP = 4  # pixels between text lines
MIN_WIDTH = 512  # narrower reports (tiny outputs) are widened so the text lines still fit
TINT = 0.4  # foreground pixels become 60 % picture + 40 % red
RED = np.array([255.0, 0.0, 0.0])
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def tint(img, mask):
    """The picture with red laid over where the mask is ≥ 0.5 (mask: (H, W) tensor, any size)."""
    m = mask.detach().float().cpu()
    while m.ndim > 2:
        m = m[0]
    m = Image.fromarray((m.numpy() >= 0.5).astype(np.uint8) * 255, "L")
    if m.size != img.size:
        m = m.resize(img.size, Image.NEAREST)
    fg = np.asarray(m) > 0
    arr = np.asarray(img.convert("RGB"), dtype=np.float64).copy()
    arr[fg] = (1 - TINT) * arr[fg] + TINT * RED
    return Image.fromarray(arr.round().astype(np.uint8))


def panels(result, content, style):
    """[(caption, picture)] in the order content, style, generated subject, output."""
    out = result.images[0].convert("RGB")
    w, h = out.size
    masks = result.masks or {}
    shown = []
    for name, ref in (("content", content), ("style", style)):
        if ref is None:
            continue
        img = fit(load_image(ref, f"{name} reference"), w, h)
        if masks.get(name) is not None:
            shown.append((f"{name} (foreground in red)", tint(img, masks[name])))
        else:
            shown.append((f"{name} (no mask)", img))
    if masks.get("generated") is not None:
        shown.append(("generated (subject in red)", tint(out, masks["generated"])))
    shown.append(("output", out))
    return shown


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def percent(f):
    """A coverage as text: a fraction, or a list of them (the generated subject of each image)."""
    return "n/a" if f is None else ", ".join(f"{100 * x:.1f} %" for x in (f if isinstance(f, list) else [f]))


def text_lines(info):
    """The prompt, seed and DRP-Diff numbers of a result's info, as short lines."""
    prompts = info.get("prompt", "")
    prompt = prompts[0] if isinstance(prompts, (list, tuple)) and prompts else prompts
    seeds = info.get("seeds") or [info.get("seed")]
    lines = [f"prompt: {prompt}",
             f"seed: {seeds[0]}   steps: {info.get('steps', 'n/a')}   guidance: {info.get('guidance', 'n/a')}"]
    drp = dict(info.get("drp") or {})
    if drp:
        lines.append(f"entropy: H_cu = {fmt(drp.pop('H_cu', None), '.3f')} bits, "
                     f"H_st = {fmt(drp.pop('H_st', None), '.3f')} bits, rho = H_cu/H_st = {fmt(drp.pop('rho', None), '.3f')}")
        n_e, n = drp.pop("switch_step", None), drp.pop("steps", None)
        lines.append(f"switch: alpha = {fmt(drp.pop('alpha', None), '.3f')}, late stage from step N_e = "
                     f"{fmt(n_e, 'd')} of {fmt(n, 'd')}")
        coverage = drp.pop("coverage", None) or {}
        if coverage:
            parts = [f"{name} {percent(f)}" for name, f in coverage.items()]
            lines.append("foreground coverage: " + ", ".join(parts))
        lines += [f"{k}: {v}" for k, v in drp.items()]  # anything newer, as it is
    return lines


def wrap(line, font, width):
    """Greedy word wrap of one line to a pixel width."""
    out, current = [], ""
    for word in line.split(" "):
        trial = f"{current} {word}" if current else word
        if current and font.getlength(trial) > width:
            out.append(current)
            trial = "    " + word  # continuation lines are indented
        current = trial
    return out + [current]


def save_report(path, result, content=None, style=None):
    """Draw the report of `result` (references given as paths or PIL images) into a PNG at `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise DrpError(f"the folder {path.parent} for the report does not exist; create it or choose another path.")
    if not result.images:
        raise ValueError("the result holds no image to report")
    shown = panels(result, content, style)
    w, h = shown[-1][1].size
    font = ImageFont.load_default()

    def printable(s):  # the bitmap fallback font (a Pillow built without FreeType) knows Latin-1 only
        return s if isinstance(font, ImageFont.FreeTypeFont) else s.encode("latin-1", "replace").decode("latin-1")

    line_h = font.getbbox("Ag")[3] + LINE_GAP
    width = max(MIN_WIDTH, len(shown) * (w + PAD) + PAD)
    captions = [wrap(printable(c), font, w) for c, _ in shown]
    lines = [piece for line in text_lines(result.info or {}) for piece in wrap(printable(line), font, width - 2 * PAD)]
    text_top = PAD + h + LINE_GAP + max(map(len, captions)) * line_h + PAD
    canvas = Image.new("RGB", (width, text_top + len(lines) * line_h + PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for k, ((_, img), caption) in enumerate(zip(shown, captions)):
        x = PAD + k * (w + PAD)
        canvas.paste(img, (x, PAD))
        for j, piece in enumerate(caption):
            draw.text((x, PAD + h + LINE_GAP + j * line_h), piece, fill=INK, font=font)
    for j, piece in enumerate(lines):
        draw.text((PAD, text_top + j * line_h), piece, fill=INK, font=font)

    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise DrpError(f"cannot write the report {path} ({e}); choose a writable folder.") from None
    return path
