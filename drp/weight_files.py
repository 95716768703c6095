"""The tensor files of a conversion: opening a checkpoint file of any kind, writing a safetensors file
one tensor at a time, hashing the source, the output dtypes, and the record of where each tensor comes from.

Where it sits: below drp/convert.py (SD's checkpoints) and drp/convert_ip_adapter.py (IP-Adapter files
and image encoders), which both plan a conversion as a table of `Move`s and write it with
`write_safetensors`; nothing that generates an image imports it (drp.load reads through
drp/model_io.py). Checkpoints are never unpickled with arbitrary code: `.ckpt`/`.bin` go through
drp/torch_files.py, `.safetensors` through `safe_open` (lazily, one tensor at a time).
"""

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .errors import DrpError
from .model_io import FILE_DTYPES
from .torch_files import kind_of, read_state_dict

OUT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
SAFETENSORS_DTYPES = {dtype: name for name, dtype in FILE_DTYPES.items()}  # what drp.load reads back


class Move(NamedTuple):
    """Where one of our parameters comes from."""

    source: str  # key in the source file
    transform: Optional[Callable]  # declared reshaping (keymaps.conv1x1_to_linear) or None
    shape: tuple  # our shape, checked after the transform


@dataclass
class Source:
    """Read access to a checkpoint's tensors: shapes up front, data one tensor at a time."""

    shapes: dict  # key -> shape tuple
    read: Callable  # key -> tensor


# ---- reading -----------------------------------------------------------------------------------

def open_tensors(path):
    """A Source for a single checkpoint file, telling the file kinds apart by their first bytes."""
    path = Path(path)
    if not path.is_file():
        raise DrpError(f"{path} does not exist; give the path of an SD 1.x checkpoint file or diffusers folder.")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise DrpError(f"{path} cannot be read ({e.strerror or e}); check the path and its permissions.") from None
    size = path.stat().st_size
    # safetensors: an 8-byte little-endian header length, then the JSON header
    is_safetensors = len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size
    if is_safetensors:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except SafetensorError as e:
            # 0x80 starts a pickle (torch.save's legacy format), whose bytes can pass the test above; but it is
            # also the first byte of a safetensors file whose header length is 128 more than a multiple of 256:
            # only bytes that decode as a pickle go on to torch_files, the others are a damaged safetensors file
            if head[:1] != b"\x80" or kind_of(path) is None:
                raise DrpError(f"{path} is a truncated or damaged safetensors file ({e}); download it again.") from None
        else:
            return Source(shapes, handle.get_tensor)
    return _open_torch(path)  # torch.save's zip or legacy format; anything else is refused there


def _open_torch(path):
    obj = read_state_dict(path)
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning wraps it, maybe twice
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise DrpError(f"{path} holds a {type(obj).__name__}, not a state dict; give an SD 1.x checkpoint.")
    tensors = {}

    def flatten(d, prefix):  # nested dicts (as in textual-inversion files) become dotted keys
        for k, v in d.items():
            if isinstance(v, dict):
                flatten(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                tensors[f"{prefix}{k}"] = v

    flatten(obj, "")
    return Source({k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__)


# ---- writing -----------------------------------------------------------------------------------

def write_safetensors(path, moves, read, dtype, bar=None):
    """Writes a safetensors file one tensor at a time: header from the plan, then each tensor's bytes."""
    keys = sorted(moves)
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key in keys:
        n = itemsize * int(torch.Size(moves[key].shape).numel())
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(moves[key].shape),
                       "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes so tensor data stays aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key in keys:
            move = moves[key]
            t = read(move.source)
            t = (move.transform(t) if move.transform else t).to(dtype).contiguous()
            f.write(memoryview(t.numpy()).cast("B"))
            if bar is not None:
                bar.update()
        f.flush()
        os.fsync(f.fileno())


def sha256_of(files, progress):
    """sha256 of the files' bytes, read one after another."""
    digest = hashlib.sha256()
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256", disable=not progress) as bar:
        for path in files:
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    bar.update(len(block))
    return digest.hexdigest()
