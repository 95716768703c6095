"""A one-picture report of a DRP-Diff run: the references with their masks, the output, the numbers.

Where it sits in DRP-Diff: after `pipeline.generate` returns a `Result`, this draws for a reader what
the method decided — which parts of each reference counted as foreground (tinted red), where the
generated subject was found, the image produced, and the entropy switch (ALGORITHM.md §4):
H_cu, H_st, ρ, α, and the step N_e at which the early stage handed over to the late one.

    ┌─────────┬─────────┬───────────┬────────┐
    │ content │  style  │ generated │ output │   panels at the output size, masks tinted red
    │ + mask  │ + mask  │ + mask    │        │
    └─────────┴─────────┴───────────┴────────┘
     [σ plots: one per grid, the IP-Adapter mode only]
     [attention maps: one row per name, one column per stage, when the run made them (drp/heatmaps.py)]
     captions, then the prompt, seed and DRP-Diff numbers as text lines

The IP-Adapter mode (ALGORITHM_IP_ADAPTER.md B3) has no masks; its report shows the adapter, the split's
knobs e/ε/p, the two stages' scales, the layers with image attention, whether the early stage's values are
filtered (`filter_values`), C_bg, and for every attn2 layer its foreground rank k and its
singular values σ_i/σ_1: one small plot per token grid (64², 32², 16², 8² at 512 px), one curve per
layer, a dot where its top k directions end. Panels for a reference or mask that is not there are left
out. PIL only, with its default font.
"""

from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import heatmaps
from .errors import DrpError
from .files import write_atomically
from .images import fit, load_image
from .unet import UNetConfig, grid_at, level_of

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
        elif (result.info or {}).get("drp", {}).get("mode") == "ip-adapter":  # split spectrally, not by masks
            shown.append((f"{name} reference", img))
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
        lines += ip_adapter_lines(drp)
        lines += [f"{k}: {v}" for k, v in drp.items()]  # anything newer, as it is
    return lines


def short_name(layer):
    """An attn2 module name as the plots label it: "down_blocks.1.attentions.0…" -> "d1.0", the mid block "mid"."""
    parts = layer.split(".")
    return "mid" if parts[0] == "mid_block" else f"{parts[0][0]}{parts[1]}.{parts[3]}"


def scale_text(scale):
    """A stage's scale as sample.py takes it: 0.6, or up_blocks.1=1, mid_block=0.5 for a per-block scale."""
    if isinstance(scale, dict):
        return ", ".join(f"{block}={v:g}" for block, v in scale.items())
    return "n/a" if scale is None else f"{scale:g}"


def ip_adapter_lines(drp):
    """The IP-Adapter mode's settings (popped from `drp`): adapter, split knobs, scales, C_bg, per-layer k."""
    if drp.get("mode") != "ip-adapter":
        return [f"mode: {drp.pop('mode')}"] if "mode" in drp else []
    get = drp.pop
    drp.pop("spectrum", None)  # drawn, not written
    rule, energy = get("rank_rule", None), get("rank_energy", None)  # e means nothing to the Gavish-Donoho rule
    split = f"e = {energy} (energy rule)" if rule == "energy" else "Gavish-Donoho rule"
    layers = get("ip_layers", None)
    lines = [f"mode: {get('mode')}, adapter {get('adapter', None)}",
             f"split: {split}, floor eps = {get('floor', None)}, power p = {get('power', None)};   scales: early "
             f"{scale_text(get('scale_early', None))}, late {scale_text(get('scale_late', None))};   "
             f"late group: {get('late', None)}",
             "image attention in: " + (", ".join(layers) if layers else "every attn2 layer") + ";   early values: "
             + ("filtered (W_v without the background directions)" if get("filter_values", False) else "W_v")]
    c_bg = get("C_bg", None)
    lines.append(f"C_bg (early-stage text): {c_bg!r}" if c_bg is not None else "C_bg: none (the full prompt throughout)")
    rank = get("rank", None) or {}
    if rank:
        lines.append("foreground rank k: " + ", ".join(f"{short_name(n)} {k}" for n, k in rank.items()))
    return lines


PLOT_W, PLOT_H = 150, 80  # one spectrum plot, pixels inside its frame
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def by_grid(layers, height, width):
    """{grid label: [layer names]}: the attn2 layers grouped by the token grid their queries have.

    Level i of the UNet (down_blocks.i, its mirror up_blocks.{L-1-i}, the mid block at the deepest) sees
    the latent halved i times, rounded up as its stride-2 convolutions round. L comes from the config,
    not from the names: with `ip_layers` only some blocks are there.
    """
    levels = len(UNetConfig().channels)
    groups = {}
    for name in layers:
        groups.setdefault(grid_at(level_of(name, levels), height, width), []).append(name)
    return {f"{r}x{c}": names for (r, c), names in sorted(groups.items(), reverse=True)}


def spectrum_strip(info, font, printable):
    """The σ plots of an IP-Adapter-mode result, side by side, or None for the other modes."""
    drp = info.get("drp") or {}
    spectra, rank = drp.get("spectrum") or {}, drp.get("rank") or {}
    if not spectra:
        return None
    groups = by_grid(list(spectra), info.get("height", 512), info.get("width", 512))
    line_h = font.getbbox("Ag")[3] + LINE_GAP
    cell_w, top = PLOT_W + 2 * PAD, 2 * line_h
    strip = Image.new("RGB", (len(groups) * cell_w + PAD, top + PLOT_H + line_h + PAD), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for g, (grid, names) in enumerate(groups.items()):
        x0, y0 = PAD + g * cell_w, top
        draw.text((x0, 0), printable(f"grid {grid}: sigma_i/sigma_1"), fill=INK, font=font)
        ks = ", ".join(str(rank.get(n, "?")) for n in names)
        draw.text((x0, line_h), printable(f"k = {ks}"), fill=INK, font=font)
        draw.rectangle((x0, y0, x0 + PLOT_W, y0 + PLOT_H), outline=INK)
        for c, name in enumerate(names):
            sigma = spectra[name]
            colour = COLOURS[c % len(COLOURS)]
            points = [(x0 + PLOT_W * i / max(len(sigma) - 1, 1), y0 + PLOT_H * (1 - s / sigma[0]))
                      for i, s in enumerate(sigma)]
            draw.line(points, fill=colour, width=1)
            k = rank.get(name)
            if k:  # the split: a dot on the last foreground direction, a tick down to the axis
                x, y = points[k - 1]
                draw.line((x, y, x, y0 + PLOT_H), fill=colour, width=1)
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((x0, y0 + PLOT_H + 2), printable(f"i = 1 ... {len(spectra[names[0]])}, split at k"), fill=INK,
                  font=font)
    return strip


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
    printable = partial(heatmaps.printable, font=font)  # what the font can draw

    line_h = font.getbbox("Ag")[3] + LINE_GAP
    width = max(MIN_WIDTH, len(shown) * (w + PAD) + PAD)
    captions = [wrap(printable(c), font, w) for c, _ in shown]
    strips = [spectrum_strip(result.info or {}, font, printable)]
    if result.attention_maps:
        strips.append(heatmaps.picture(result.images[0], result.attention_maps, 0))
    strips = [s for s in strips if s is not None]
    width = max([width] + [s.width + PAD for s in strips])
    lines = [piece for line in text_lines(result.info or {}) for piece in wrap(printable(line), font, width - 2 * PAD)]
    text_top = PAD + h + LINE_GAP + max(map(len, captions)) * line_h + PAD
    canvas = Image.new("RGB", (width, text_top + sum(s.height + PAD for s in strips) + len(lines) * line_h + PAD),
                       BACKGROUND)
    for strip in strips:  # below the panels, one above the other
        canvas.paste(strip, (0, text_top))
        text_top += strip.height + PAD
    draw = ImageDraw.Draw(canvas)
    for k, ((_, img), caption) in enumerate(zip(shown, captions)):
        x = PAD + k * (w + PAD)
        canvas.paste(img, (x, PAD))
        for j, piece in enumerate(caption):
            draw.text((x, PAD + h + LINE_GAP + j * line_h), piece, fill=INK, font=font)
    for j, piece in enumerate(lines):
        draw.text((PAD, text_top + j * line_h), piece, fill=INK, font=font)

    return write_atomically(path, lambda tmp: canvas.save(tmp, format="PNG"), "choose a writable folder.")
