"""Pictures in and out: reading user images safely, fitting them to the output size, pixels ↔ tensors.

Stable Diffusion works on RGB tensors in [-1, 1]; users hand over files of any kind (16-bit PNGs,
grey, RGBA, palette and CMYK JPEGs). Everything is turned into 8-bit RGB here, once.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DrpError

MAX_PIXELS = 64_000_000  # larger inputs are refused before decoding (a decompression-bomb guard)


def load_image(image, what="image"):
    """A path or a PIL image -> an RGB PIL image; unreadable, empty or absurdly large input -> DrpError."""
    if isinstance(image, Image.Image):
        img = image
    else:
        path = Path(image)
        if not path.is_file():
            raise DrpError(f"the {what} {path} does not exist; check the path.")
        try:
            img = Image.open(path)
            if img.width * img.height > MAX_PIXELS:
                raise DrpError(f"the {what} {path} is {img.width}×{img.height} pixels, larger than "
                               f"{MAX_PIXELS:,}; downscale it first.")
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DrpError(f"the {what} {path} could not be read as an image ({e}); give a PNG or JPEG file.")
    if img.width == 0 or img.height == 0:
        raise DrpError(f"the {what} has zero size ({img.width}×{img.height}); give a real picture.")
    if img.width * img.height > MAX_PIXELS:
        raise DrpError(f"the {what} is {img.width}×{img.height} pixels, larger than {MAX_PIXELS:,}; downscale it first.")
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits, don't clip
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / (65535.0 if arr.max() > 255 else 255.0) * 255.0
        img = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8), "L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:  # alpha, or a transparent colour
        img = img.convert("RGBA")  # composite onto white, the way viewers show it (and transformers does)
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def fit(img, width, height, resample=Image.BICUBIC):
    """Centre-crop to the aspect ratio width:height, then resize to exactly width×height."""
    return ImageOps.fit(img, (width, height), method=resample, centering=(0.5, 0.5))


def to_tensor(img):
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # (H, W, 3) in 0…255
    return (arr / 127.5 - 1.0).permute(2, 0, 1)[None]


def to_pil(images):
    """(B, 3, H, W) in [0, 1] -> list of PIL images, rounding to the nearest 8-bit level."""
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def load_mask(mask, width, height, what="mask"):
    """A user mask (white = foreground; any size, any mode) -> (H, W) float tensor of 0/1 at width×height."""
    img = load_image(mask, what).convert("L")
    img = fit(img, width, height, resample=Image.BILINEAR)
    return (torch.from_numpy(np.asarray(img, dtype=np.float32)) >= 128).float()
