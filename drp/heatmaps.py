"""Attention maps as a picture: one row per name, one column per stage, each a heat map over the image.

Where it sits: after `generate(..., attention_maps=...)` (drp/attention_maps.py), `sample.py
--attention-maps` saves `<image>-attention.png` beside each image, and the report (drp/report.py) adds
the same rows. Each panel is the generated image, greyed, under its map in a black-red-yellow-white
ramp: one square per attention token (nearest neighbour, so the grid shown is the model's), scaled to
the map's own maximum, which is written on the panel with the name and the stage. PIL only.

    ┌───────────────────┬───────────────────┬───────────────────┐
    │ cat, all: max 0.31│ cat, early: …     │ cat, late: …      │
    ├───────────────────┼───────────────────┼───────────────────┤
    │ style, all: …     │ style, early: …   │ style, late: …    │
    └───────────────────┴───────────────────┴───────────────────┘
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .files import write_atomically

PANEL = 256  # pixels on the longer side of a panel, whatever the image's size
PAD = 8  # pixels between panels and around them
HEAT = 0.65  # a panel is 35 % grey image + 65 % heat colour
RAMP = np.array([(0, 0, 0), (200, 0, 0), (255, 210, 0), (255, 255, 255)], dtype=np.float64)  # 0 → 1


def printable(text, font):
    """`text` as `font` can draw it: the bitmap fallback font (a Pillow built without FreeType) knows Latin-1 only."""
    return text if isinstance(font, ImageFont.FreeTypeFont) else text.encode("latin-1", "replace").decode("latin-1")


def heat_colours(m):
    """(h, w) values in [0, 1] → (h, w, 3) colours along RAMP."""
    stops = np.linspace(0, 1, len(RAMP))
    return np.stack([np.interp(m, stops, RAMP[:, c]) for c in range(3)], axis=-1)


def panel_size(image):
    w, h = image.size
    return (PANEL, max(1, round(PANEL * h / w))) if w >= h else (max(1, round(PANEL * w / h)), PANEL)


def panel(image, m, caption, font):
    """The image under one map (h, w) (a tensor), with `caption` written in its top left corner."""
    size = panel_size(image)
    grey = np.asarray(image.convert("L").resize(size, Image.BILINEAR), dtype=np.float64)[..., None]
    m = m.float().numpy()
    top = float(m.max())
    scaled = m / top if top > 0 else m
    cells = Image.fromarray(scaled.astype(np.float32)).resize(size, Image.NEAREST)
    mixed = (1 - HEAT) * grey + HEAT * heat_colours(np.asarray(cells))
    out = Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    box = draw.textbbox((3, 2), caption, font=font)
    draw.rectangle((0, 0, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
    draw.text((3, 2), caption, fill=(255, 255, 255), font=font)
    return out


def picture(image, maps, index=0):
    """The rows of image `index`'s maps ({name: {stage: (B, h, w)}}) over `image` (PIL), as one PIL picture."""
    font = ImageFont.load_default()
    w, h = panel_size(image)
    columns = max(len(stages) for stages in maps.values())
    canvas = Image.new("RGB", (PAD + columns * (w + PAD), PAD + len(maps) * (h + PAD)), (255, 255, 255))
    for row, (name, stages) in enumerate(maps.items()):
        for col, (stage, m) in enumerate(stages.items()):
            caption = printable(f"{name}, {stage}: max {float(m[index].max()):.3g}", font)
            canvas.paste(panel(image, m[index], caption, font), (PAD + col * (w + PAD), PAD + row * (h + PAD)))
    return canvas


def picture_path(image_path):
    """Where the maps of the image at `image_path` go: `<image>-attention.png` beside it."""
    path = Path(image_path)
    return path.with_name(f"{path.stem}-attention.png")


def save_picture(path, image, maps, index=0):
    """`picture(image, maps, index)` written to the PNG `path` atomically; returns `path`."""
    canvas = picture(image, maps, index)
    return write_atomically(path, lambda tmp: canvas.save(tmp, format="PNG"), "choose a writable folder.")
