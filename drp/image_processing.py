"""Pictures -> the pixel tensors the vision encoders were trained on: CLIP's and DINO's preprocessing.

An encoder only sees what its own preprocessing made of a picture, and small differences (another
resampling filter, a crop one pixel off, a rounding in another order) move the embeddings. So each
function here reproduces one reference exactly, in the same float32 operations:

* `clip_pixels` — transformers' PIL `CLIPImageProcessor` (`CLIPImageProcessorPil` in transformers 5;
  the class named `CLIPImageProcessor` there uses torchvision when it is installed, which differs by up
  to 0.015): shortest side to 224 with PIL bicubic (long side `int(224·long/short)`), centre crop
  224×224 with offsets `(size − 224) // 2`, ×(1/255) in float64 then float32, CLIP's mean and std.
  This is what OpenAI CLIP, OpenCLIP ViT-H/14 and IP-Adapter were trained with.
* `dino_pixels` — the DINO repository's evaluation transform (torchvision `Resize(256, interpolation=3)`,
  `CenterCrop(224)`, `ToTensor()`, `Normalize(ImageNet)` on a PIL picture): shortest side to 256 with PIL
  bicubic (long side `int(256·long/short)`), centre crop 224 with offsets `round((size − 224) / 2)`
  (Python's round, halves to even), /255 in float32, ImageNet mean and std.
  https://github.com/facebookresearch/dino/blob/main/eval_knn.py

Both read pictures with `drp.images.load_image`, as the rest of drp does: the EXIF orientation is
applied (so a phone photo is upright, as transformers' own `load_image` also does), transparency is
composited onto white (as transformers' `convert_rgb` does), 16-bit pictures are scaled to 8 bits
(Pillow's own conversion would clip them to white), then everything is 8-bit RGB.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DrpError
from .images import load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's training-set statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO was trained on ImageNet
IMAGENET_STD = (0.229, 0.224, 0.225)


def as_list(images):
    """One picture (PIL image or path) or a list/tuple of them -> a list of them."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise DrpError("no pictures were given; pass a PIL image, a path, or a list of them.")
        return list(images)
    if isinstance(images, (Image.Image, str, Path)):
        return [images]
    raise DrpError(f"a picture must be a PIL image or a path, got {type(images).__name__}; load it first.")


def short_side_to(img, short):
    """Resize (PIL bicubic) so the shortest side is `short`; the long side is truncated, not rounded."""
    w, h = img.size
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    return img.resize(size, Image.BICUBIC)


def clip_image(img, size=224, squash=False):
    """RGB PIL image -> (3, size, size) float32 array, exactly as transformers' PIL CLIP processor."""
    if squash:  # the whole picture, aspect ratio not kept
        img = img.resize((size, size), Image.BICUBIC)
    else:
        img = short_side_to(img, size)
    w, h = img.size
    top, left = (h - size) // 2, (w - size) // 2
    arr = np.asarray(img)[top:top + size, left:left + size]  # (size, size, 3) uint8
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)  # transformers rescales in float64
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return x.transpose(2, 0, 1)


def clip_pixels(images, size=224, squash=False):
    """Pictures (PIL images or paths, one or a list) -> CLIP encoder input (B, 3, size, size) float32.

    squash=True resizes the whole picture to size×size (aspect ratio lost) instead of cropping its middle.
    """
    if not (isinstance(size, int) and size > 0):
        raise DrpError(f"the CLIP input size must be a positive whole number of pixels, got {size!r}.")
    arrays = [clip_image(load_image(im), size, squash) for im in as_list(images)]
    return torch.from_numpy(np.stack(arrays))


def dino_pixels(images):
    """Pictures (PIL images or paths, one or a list) -> DINO encoder input (B, 3, 224, 224) float32."""
    out = []
    for im in as_list(images):
        img = short_side_to(load_image(im), 256)
        w, h = img.size
        top, left = int(round((h - 224) / 2)), int(round((w - 224) / 2))
        arr = np.asarray(img)[top:top + 224, left:left + 224]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255  # ToTensor: float32 division
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        out.append((x - mean[:, None, None]) / std[:, None, None])
    return torch.stack(out)
