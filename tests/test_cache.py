"""The on-disk cache of reference trajectories (drp/cache.py)."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from drp import cache
from drp.errors import DrpError

KEY_ARGS = dict(caption="a photo of a cat", steps=50, width=512, height=512, weights_id="abc123")


def picture(seed=0, size=(24, 16)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def trajectory(seed=0):
    torch.manual_seed(seed)
    latents = torch.randn(4, 1, 4, 3, 3)
    return {"latents": latents, "x0": latents[-1], "cross": torch.rand(2, 2).half(), "steps": torch.arange(4)}


def test_saved_tensors_load_back_bit_for_bit(tmp_path):
    key = cache.cache_key(picture(), **KEY_ARGS)
    tensors = trajectory()
    cache.save(tmp_path / "new" / "folder", key, tensors, {"caption": "a photo of a cat", "steps": 4})
    back = cache.load(tmp_path / "new" / "folder", key)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def test_a_missing_entry_loads_as_none(tmp_path):
    assert cache.load(tmp_path, cache.cache_key(picture(), **KEY_ARGS)) is None
    assert cache.load(tmp_path / "absent", cache.cache_key(picture(), **KEY_ARGS)) is None


def test_each_field_changes_the_key():
    base = cache.cache_key(picture(), **KEY_ARGS)
    assert base == cache.cache_key(picture(), **KEY_ARGS) and len(base) == 64
    changes = [dict(caption=""), dict(steps=49), dict(width=640), dict(height=448), dict(weights_id="def456")]
    keys = {cache.cache_key(picture(), **{**KEY_ARGS, **c}) for c in changes}
    keys |= {cache.cache_key(picture(seed=1), **KEY_ARGS)}
    keys |= {cache.cache_key(picture(size=(16, 24)), **KEY_ARGS)}  # same number of pixels, other shape
    one_pixel = np.asarray(picture()).copy()
    one_pixel[0, 0, 0] ^= 1
    keys |= {cache.cache_key(Image.fromarray(one_pixel), **KEY_ARGS)}
    assert len(keys) == 8 and base not in keys


def test_the_dtype_each_recording_setting_and_the_format_change_the_key(monkeypatch):
    recording = dict(record_t=[200, 800], mask_layers=["down_blocks.2"], self_layer="up_blocks.2.attn1",
                     subject_tokens=[5], cross_recorded=True, latents_dtype="torch.float32")
    base = cache.cache_key(picture(), **KEY_ARGS, dtype=torch.float32, recording=recording)
    assert base == cache.cache_key(picture(), **KEY_ARGS, dtype="float32", recording=dict(recording))
    changes = [dict(record_t=[0, 0]), dict(mask_layers=[]), dict(self_layer="up_blocks.3.attn1"),
               dict(subject_tokens=[4]), dict(cross_recorded=False), dict(latents_dtype="torch.float64")]
    keys = {cache.cache_key(picture(), **KEY_ARGS, dtype=torch.float32, recording={**recording, **c}) for c in changes}
    keys.add(cache.cache_key(picture(), **KEY_ARGS, dtype=torch.float64, recording=recording))
    monkeypatch.setattr(cache, "FORMAT", cache.FORMAT + 1)
    keys.add(cache.cache_key(picture(), **KEY_ARGS, dtype=torch.float32, recording=recording))
    assert len(keys) == len(changes) + 2 and base not in keys


def test_the_same_pixels_give_the_same_key_whatever_the_file(tmp_path):
    img = picture()
    img.save(tmp_path / "a.png", compress_level=0)
    img.save(tmp_path / "b.png", compress_level=9, optimize=True)
    img.save(tmp_path / "c.bmp")
    files = [tmp_path / n for n in ("a.png", "b.png", "c.bmp")]
    assert len({f.read_bytes() for f in files}) == 3
    keys = {cache.cache_key(Image.open(f), **KEY_ARGS) for f in files}
    keys.add(cache.cache_key(img.convert("RGBA"), **KEY_ARGS))  # an opaque alpha channel adds nothing
    assert keys == {cache.cache_key(img, **KEY_ARGS)}


def test_a_truncated_entry_counts_as_missing_and_is_removed(tmp_path):
    key = cache.cache_key(picture(), **KEY_ARGS)
    cache.save(tmp_path, key, trajectory())
    path = cache.entry_path(tmp_path, key)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.warns(UserWarning, match="unusable"):
        assert cache.load(tmp_path, key) is None
    assert not path.exists()


def test_flipped_bytes_in_an_entry_are_caught_by_the_checksum(tmp_path):
    key = cache.cache_key(picture(), **KEY_ARGS)
    cache.save(tmp_path, key, trajectory())
    path = cache.entry_path(tmp_path, key)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: the file still parses
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum"):
        assert cache.load(tmp_path, key) is None
    assert not path.exists()


def test_garbage_under_an_entry_name_counts_as_missing(tmp_path):
    key = cache.cache_key(picture(), **KEY_ARGS)
    cache.entry_path(tmp_path, key).write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning):
        assert cache.load(tmp_path, key) is None


def test_clear_removes_only_our_entries(tmp_path):
    keys = [cache.cache_key(picture(seed=s), **KEY_ARGS) for s in range(3)]
    for k in keys:
        cache.save(tmp_path, k, trajectory())
    (tmp_path / f".drp-{keys[0]}.x1y2.tmp").write_bytes(b"half")  # an interrupted write
    others = ["notes.txt", "drp-1234.safetensors", "model.safetensors"]
    for name in others:
        (tmp_path / name).write_text("keep me")
    assert cache.clear(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
    assert cache.clear(tmp_path / "absent") == 0


def test_an_unwritable_cache_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    key = cache.cache_key(picture(), **KEY_ARGS)
    with pytest.raises(DrpError, match="cache"):
        cache.save(blocker / "cache", key, trajectory())


def test_saving_leaves_no_temporary_files(tmp_path):
    key = cache.cache_key(picture(), **KEY_ARGS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.save(tmp_path, key, trajectory())
        cache.save(tmp_path, key, trajectory(seed=1))  # overwriting an entry is fine
    assert [p.name for p in tmp_path.iterdir()] == [f"drp-{key}.safetensors"]
    assert torch.equal(cache.load(tmp_path, key)["latents"], trajectory(seed=1)["latents"])


def test_keys_are_checked_before_touching_the_disk(tmp_path):
    with pytest.raises(ValueError):
        cache.load(tmp_path, "../../etc/passwd")


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DRP_CACHE_DIR", str(tmp_path / "here"))
    assert cache.default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("DRP_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.default_cache_dir() == tmp_path / ".cache" / "drp"
