"""Reading user pictures: every common kind converts to 8-bit RGB, and bad files give one clear sentence."""

import numpy as np
import pytest
from PIL import Image

from drp.errors import DrpError
from drp.images import MAX_PIXELS, fit, load_image, load_mask, to_pil, to_tensor


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "CMYK", "I;16", "1"])
def test_every_common_image_mode_is_converted_to_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray((rng.integers(0, 65536, (20, 30))).astype(np.uint16))
    else:
        image = rgb.convert(mode)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = tmp_path / f"picture{suffix}"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (30, 20)
    assert np.asarray(loaded).std() > 10  # the content survived (16-bit is scaled down, not clipped)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_a_file_that_is_not_a_picture_is_refused_with_one_sentence(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(DrpError, match="could not be read as an image"):
        load_image(path, "content reference")


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(DrpError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_zero_size_and_absurdly_large_images_are_refused():
    with pytest.raises(DrpError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    side = int(MAX_PIXELS**0.5) + 1
    with pytest.raises(DrpError, match="larger than"):
        load_image(Image.new("L", (side, side)))


def test_fit_centre_crops_to_the_aspect_then_resizes():
    image = Image.new("RGB", (300, 100), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))  # a white middle third
    fitted = fit(image, 64, 64)
    assert fitted.size == (64, 64)
    assert np.asarray(fitted).min() > 200  # only the middle square is left


def test_pixels_round_trip_through_tensors():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 16, 3), dtype=np.uint8))
    x = to_tensor(image)
    assert x.shape == (1, 3, 8, 16) and -1 <= x.min() and x.max() <= 1
    back = to_pil((x + 1) / 2)[0]
    assert np.array_equal(np.asarray(back), np.asarray(image))


def test_a_mask_of_any_size_is_binary_at_the_output_size():
    mask = Image.new("L", (10, 30), 0)
    mask.paste(200, (0, 0, 10, 15))
    m = load_mask(mask, 16, 16)
    assert m.shape == (16, 16) and set(m.unique().tolist()) == {0.0, 1.0}
