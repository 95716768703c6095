"""The encoders' preprocessing equals its references pixel for pixel (bit-exact float32) on awkward pictures."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from drp.errors import DrpError
from drp.vision import clip_pixels, dino_pixels


def noise(w, h, seed, channels=3):
    """Seeded smooth-ish random content (noise plus gradients), so resampling has something to do."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 // max(w - 1, 1) + yy * 128 // max(h - 1, 1))[..., None]
    arr = (base + rng.integers(-60, 60, (h, w, channels))).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr if channels > 1 else arr[..., 0])


def awkward_pictures(tmp_path):
    """{name: (what drp is given, what the reference processor is given)} — the same picture, except where
    drp's documented reading differs from handing the raw object to transformers: EXIF orientation is
    applied (as transformers' own load_image does) and 16-bit grey is scaled to 8 bits (Pillow would clip)."""
    pics = {
        "odd landscape": noise(301, 157, 0),
        "portrait": noise(97, 403, 1),
        "tiny 3x5": noise(3, 5, 2),
        "exactly 224": noise(224, 224, 3),
        "thin strip 300x7": noise(300, 7, 4),
        "near square 1001x999": noise(1001, 999, 5),
        "greyscale L": noise(640, 480, 6, channels=1),
        "CMYK": noise(200, 300, 7).convert("CMYK"),
        "palette P": noise(222, 333, 8).quantize(colors=64),
    }
    rgba = noise(250, 180, 9, channels=4)
    pics["RGBA with varying alpha"] = rgba
    pics["LA"] = rgba.convert("LA").resize((130, 260))
    transparent_index = pics["palette P"].copy()
    transparent_index.info["transparency"] = 3
    pics["P with a transparent index"] = transparent_index
    arr = np.asarray(noise(150, 170, 10)).copy()
    arr[40:120, 30:100] = (12, 200, 34)
    trns = Image.fromarray(arr)
    trns.info["transparency"] = (12, 200, 34)  # a PNG tRNS chunk: this colour is see-through
    pics["RGB with a transparent colour"] = trns
    pairs = {name: (img, img) for name, img in pics.items()}

    deep = Image.fromarray((np.asarray(noise(160, 120, 11, channels=1), np.uint16) * 257))  # 16-bit grey
    deep_path = tmp_path / "deep.png"
    deep.save(deep_path)
    pairs["16-bit grey, from a file"] = (deep_path, noise(160, 120, 11, channels=1))

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    photo_path = tmp_path / "phone.jpg"
    noise(320, 200, 12).save(photo_path, exif=exif, quality=90)
    pairs["EXIF-rotated JPEG, from a file"] = (photo_path, ImageOps.exif_transpose(Image.open(photo_path)))
    return pairs


def reference_clip(images, **kwargs):
    from transformers import CLIPImageProcessorPil  # the PIL path: the weights' own preprocessing

    return CLIPImageProcessorPil(**kwargs)(images=images, return_tensors="pt").pixel_values


def test_clip_pixels_are_bit_exact_with_transformers_pil_clip_processor_on_awkward_pictures(tmp_path):
    pairs = awkward_pictures(tmp_path)
    assert len(pairs) >= 10
    for name, (ours, theirs) in pairs.items():
        got, want = clip_pixels(ours), reference_clip(theirs)
        assert got.dtype == torch.float32 and got.shape == (1, 3, 224, 224), name
        assert torch.equal(got, want), f"{name}: largest difference {(got - want).abs().max().item()}"


def test_clip_pixels_take_a_list_of_paths_and_pictures_as_one_batch(tmp_path):
    a, b = noise(300, 200, 13), noise(180, 260, 14)
    b.save(tmp_path / "b.png")
    got = clip_pixels([a, tmp_path / "b.png", str(tmp_path / "b.png")])
    assert got.shape == (3, 3, 224, 224)
    assert torch.equal(got, reference_clip([a, b, b]))


def test_other_sizes_and_squashing_match_the_processor_configured_the_same_way():
    pictures = [noise(500, 281, 15), noise(123, 456, 16)]
    got = clip_pixels(pictures, size=336)  # e.g. CLIP ViT-L/14 at 336 px
    assert torch.equal(got, reference_clip(pictures, size={"shortest_edge": 336},
                                           crop_size={"height": 336, "width": 336}))
    squashed = clip_pixels(pictures, squash=True)
    assert torch.equal(squashed, reference_clip(pictures, size={"height": 224, "width": 224}))
    assert not torch.equal(squashed, clip_pixels(pictures))  # the whole picture, not its middle


def test_bad_picture_arguments_are_refused_with_one_sentence(tmp_path):
    with pytest.raises(DrpError, match="does not exist"):
        clip_pixels(tmp_path / "missing.png")
    with pytest.raises(DrpError, match="no pictures"):
        dino_pixels([])
    with pytest.raises(DrpError, match="PIL image or a path, got ndarray"):
        clip_pixels(np.zeros((4, 4, 3)))
    with pytest.raises(DrpError, match="positive whole number"):
        clip_pixels(noise(8, 8, 0), size=0)


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def reference_dino(img):
    """The DINO repository's evaluation transform, written from its definition with PIL and numpy:
    `Compose([Resize(256, interpolation=3), CenterCrop(224), ToTensor(), Normalize(ImageNet)])`.
    torchvision is not installed next to transformers here (its presence switches transformers'
    `CLIPImageProcessor` to the torchvision path), so the reference follows torchvision's documented
    steps: short side 256 and long side int(256·long/short), PIL bicubic (interpolation=3); the crop box's
    corner at round((size − 224) / 2) per axis (Python round); uint8 / 255 in float32; (x − mean) / std.
    Checked once, outside the suite, against torchvision 0.28.0's own Compose: bit-exact on 12 sizes."""
    w, h = img.size
    size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    img = img.convert("RGB").resize(size, resample=3)
    left, top = round((size[0] - 224) / 2), round((size[1] - 224) / 2)
    arr = np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32) / np.float32(255)
    return torch.from_numpy(((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy())


@pytest.mark.parametrize("size", [(640, 480), (333, 517), (259, 256), (256, 257), (256, 256), (97, 31),
                                  (1001, 999)])
def test_dino_pixels_are_bit_exact_with_the_dino_repository_transform(size):
    """(259, 256) puts the crop at 17.5 -> 18, (256, 257) at 0.5 -> 0: Python's round, not floor or half-up."""
    img = noise(*size, seed=size[0])
    got = dino_pixels(img)
    assert got.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    assert torch.equal(got[0], reference_dino(img))


def test_dino_and_clip_read_pictures_the_same_way(tmp_path):
    """EXIF orientation and transparency are handled once, by drp's picture reader, for both encoders."""
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90° counter-clockwise to view
    path = tmp_path / "rotated.jpg"
    noise(400, 300, 17).save(path, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(path))
    assert upright.size == (300, 400)
    assert torch.equal(dino_pixels(path)[0], reference_dino(upright))
    assert torch.equal(clip_pixels(path), clip_pixels(upright))
