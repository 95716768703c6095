"""On-disk cache of reference trajectories (ALGORITHM.md §1).

Where it sits in DRP-Diff: before sampling, each reference image is DDIM-inverted (one UNet pass per
step) and its attention statistics recorded. That work is a pure function of (image pixels, caption,
steps, size, weights, compute dtype, recording settings), so the result is stored under a hash of
every one of those and reused when a user iterates on the prompt or the seed: a cached rerun equals a
fresh run whatever the options. The CLI's `--cache-dir` picks the folder, `--no-cache` skips it.

Each entry is one safetensors file `drp-<sha256>.safetensors` holding the tensors the caller gives
(latents, attention maps) and string metadata, including a checksum of the tensor bytes: a damaged
entry is noticed, removed with a warning and recomputed, never silently used.
"""

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import DrpError

FORMAT = 2  # bump when what is stored changes: old entries then simply stop matching (2: recording in the key)
PREFIX, SUFFIX = "drp-", ".safetensors"
ENTRY = re.compile(r"drp-[0-9a-f]{64}\.safetensors")
LEFTOVER = re.compile(r"\.drp-[0-9a-f]{64}\..*\.tmp")  # temporary files of interrupted writes


def default_cache_dir():
    """$DRP_CACHE_DIR if set, else ~/.cache/drp."""
    return Path(os.environ.get("DRP_CACHE_DIR") or Path.home() / ".cache" / "drp").expanduser()


def cache_key(image_rgb_pil, caption, steps, width, height, weights_id, dtype="float32", recording=None):
    """A hex sha256 naming one reference trajectory.

    Hashes the decoded RGB pixels (not the file bytes: the same picture saved as PNG, re-encoded or
    renamed gives the same key) with the image size, the caption, the number of steps, the output
    size, the identity of the weights (e.g. the checkpoint's sha256), the compute dtype, and
    `recording`: a JSON-able dict of everything else that changes what is stored (ALGORITHM.md §1:
    the layers and timesteps that feed the masks, the subject's token positions, the stored dtype).
    """
    img = image_rgb_pil.convert("RGB")
    fields = dict(format=FORMAT, image_size=list(img.size), caption=caption, steps=steps, width=width,
                  height=height, weights=str(weights_id), dtype=str(dtype).removeprefix("torch."),
                  recording=recording or {})
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    h.update(b"\0")  # the JSON header ends here; the pixels follow
    h.update(img.tobytes())
    return h.hexdigest()


def entry_path(cache_dir, key):
    """The file of one entry; refuses anything but a key made by `cache_key`."""
    if not re.fullmatch(r"[0-9a-f]{64}", key):
        raise ValueError(f"not a cache key: {key!r}")
    return Path(cache_dir) / f"{PREFIX}{key}{SUFFIX}"


def checksum(tensors):
    """sha256 over the names, dtypes, shapes and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load(cache_dir, key):
    """The tensors stored under `key`, or None when there is no usable entry.

    A truncated or otherwise damaged entry counts as missing: it is removed, with a warning.
    """
    path = entry_path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if meta.get("drp_cache_format") != str(FORMAT) or meta.get("key") != key:
            raise ValueError("it was not written by this version of drp for this key")
        if meta.get("checksum") != checksum(tensors):
            raise ValueError("its contents do not match their checksum")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        warnings.warn(f"the cached reference trajectory {path} is unusable ({e}); it was removed and will be "
                      "computed again.", stacklevel=2)
        try:
            path.unlink()
        except OSError:
            pass  # cannot remove it (read-only folder): it will be overwritten or ignored next time
        return None
    return tensors


def save(cache_dir, key, tensors, meta=None):
    """Store tensors (dict name -> Tensor) and string metadata under `key`, atomically."""
    path = entry_path(cache_dir, key)
    # Own contiguous CPU copies: safetensors refuses views that share memory (e.g. x0 and latents[0]).
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    meta = {str(k): str(v) for k, v in (meta or {}).items()}
    meta.update(drp_cache_format=str(FORMAT), key=key, checksum=checksum(tensors))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{PREFIX}{key}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise DrpError(f"cannot write to the cache folder {path.parent} ({e}); pass a writable --cache-dir "
                       "or --no-cache.") from None


def clear(cache_dir):
    """Remove this project's entries (and leftovers of interrupted writes) from a folder; returns how many entries."""
    folder = Path(cache_dir)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in folder.iterdir():
        if p.is_file() and (ENTRY.fullmatch(p.name) or LEFTOVER.fullmatch(p.name)):
            p.unlink()
            removed += bool(ENTRY.fullmatch(p.name))
    return removed
