"""The contact sheet of a run: per reference pair, the references beside the images made from them.

Where it sits: `python -m drp.evaluate report` draws RUN/contact_sheet.png for every run it tabulates:
the picture a researcher looks at first, before any number.
"""

from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from ..errors import DrpError
from ..files import write_atomically
from ..images import load_image
from . import data as bench_data
from .plan import read_run

THUMB = 128  # pixels per picture on the contact sheet
SHEET_ROWS, SHEET_IMAGES = 12, 8  # at most this many references, and images beside each


def thumbnail(path):
    img = ImageOps.contain(load_image(path), (THUMB, THUMB), Image.BICUBIC)  # up or down to fit the tile
    tile = Image.new("RGB", (THUMB, THUMB), "white")
    tile.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
    return tile


def contact_sheet(run, path=None):
    """RUN/contact_sheet.png: per reference pair, the content and style pictures, then the images made."""
    run = Path(run)
    cfg, items = read_run(run)
    data = Path(cfg.get("data") or ".")
    style_dir = Path(cfg.get("style_dir") or bench_data.ASSETS)
    groups = {}
    for item in items:
        if (run / item["file"]).is_file():
            groups.setdefault((item["content"], item["style"]), []).append(item)
    groups = list(groups.items())[:SHEET_ROWS]
    if not groups:
        raise DrpError(f"{run} has no images yet; run it first.")
    label = 14  # pixels of text above each row
    refs = max(bool(c) + bool(s) for (c, s), _ in groups)
    columns = min(SHEET_IMAGES, max(len(members) for _, members in groups))
    width = (refs + columns) * THUMB + 8
    sheet = Image.new("RGB", (width, len(groups) * (THUMB + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, ((content, style), members) in enumerate(groups):
        y = row * (THUMB + label)
        draw.text((2, y), " + ".join(x for x in (content, style) if x) or members[0]["prompt"], fill="black")
        pictures = [data / content] * bool(content) + [style_dir / style] * bool(style)
        for col, picture in enumerate(pictures):
            if picture.is_file():
                sheet.paste(thumbnail(picture), (col * THUMB, y + label))
        for col, item in enumerate(members[:SHEET_IMAGES]):
            sheet.paste(thumbnail(run / item["file"]), ((refs + col) * THUMB + 8, y + label))
    return write_atomically(path or run / "contact_sheet.png", lambda tmp: sheet.save(tmp, format="PNG"),
                            f"make {run} writable.")
