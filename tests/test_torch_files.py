"""PyTorch checkpoint files of every kind: torch.save's zip and legacy formats convert, plain pickles and
files that would run code are refused with one sentence (as `error: …` from convert_weights.py), and
nothing stored in a file is ever executed.

A crafted payload's `__reduce__` makes unpickling call `os.mkdir(marker)` (or `exec` of code that
does): the marker folder would appear if anything ran it."""

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

import checkpoints as ck
from drp.convert import convert
from drp.errors import DrpError
from drp.torch_files import pickle_globals
from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent


class MakesFolder:
    """Unpickled, it calls os.mkdir(path): what a malicious checkpoint would do with a worse call."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


class RunsCode:
    """Unpickled, it calls exec() on a line of Python."""

    def __init__(self, path):
        self.code = f"import os; os.mkdir({str(path)!r})"

    def __reduce__(self):
        return exec, (self.code,)


SMALL = {"model.diffusion_model.out.2.bias": torch.zeros(4)}  # enough for the refusals, which read no further


def dump(path, obj, protocol):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def legacy(path, obj, protocol=2):
    torch.save(obj, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    return path


def cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


PAYLOADS = {  # name: (writes the file, given tmp, the tiny state dict and the marker; words the refusal holds)
    "plain pickle of a state dict": (lambda tmp, sd, m: dump(tmp / "plain.ckpt", {"state_dict": sd}, 4),
                                     "is a plain Python pickle, not a file written by torch.save"),
    "plain pickle, protocol 0, calling os.mkdir": (lambda tmp, sd, m: dump(tmp / "p0.ckpt", {"state_dict": MakesFolder(m)}, 0),
                                                   "plain Python pickle, not a file written by torch.save, and unpickling it "
                                                   "could run code stored in it (posix.mkdir)"),
    "plain pickle, protocol 2, calling os.mkdir": (lambda tmp, sd, m: dump(tmp / "p2.ckpt", [MakesFolder(m)], 2),
                                                   "(posix.mkdir)"),
    "plain pickle, protocol 5, calling exec": (lambda tmp, sd, m: dump(tmp / "p5.pt", {"a": RunsCode(m)}, 5),
                                               "(builtins.exec)"),
    "legacy torch.save calling os.mkdir": (lambda tmp, sd, m: legacy(tmp / "l.ckpt", {"state_dict": sd, "cb": MakesFolder(m)}),
                                           "can only be read by running code stored in it (posix.mkdir)"),
    "legacy torch.save, protocol 4, calling exec": (lambda tmp, sd, m: legacy(tmp / "l4.ckpt", {"x": RunsCode(m)}, 4),
                                                    "can only be read by running code stored in it (builtins.exec)"),
    "zip torch.save calling os.mkdir": (lambda tmp, sd, m: ck.save_checkpoint(
        tmp / "z.ckpt", {"state_dict": sd, "cb": MakesFolder(m)}, wrap=False), "(posix.mkdir)"),
    "legacy torch.save, protocol 4": (lambda tmp, sd, m: legacy(tmp / "l4sd.ckpt", {"state_dict": sd}, 4),
                                      "cannot be read safely (PyTorch's weights-only loader does not support its "
                                      "pickle opcode FRAME)"),
    "legacy torch.save of a list": (lambda tmp, sd, m: legacy(tmp / "list.ckpt", [torch.zeros(2)]), "holds a list"),
    "legacy torch.save, truncated": (lambda tmp, sd, m: cut(legacy(tmp / "t.ckpt", sd)), "truncated or damaged"),
    "plain pickle, truncated": (lambda tmp, sd, m: cut(dump(tmp / "tp.ckpt", {"state_dict": sd}, 4)), "not a checkpoint"),
}


@pytest.mark.parametrize("kind", PAYLOADS)
def test_every_pytorch_file_that_cannot_be_read_safely_ends_in_one_sentence_and_runs_nothing(tmp_path, capsys, kind):
    write, words = PAYLOADS[kind]
    marker = tmp_path / "payload-ran"
    src = write(tmp_path, SMALL, marker)
    with pytest.raises(DrpError) as error, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        convert(src, tmp_path / "weights", progress=False)
    assert warned == []  # torch's own warnings (e.g. about pickle protocol 4) would print lines of their own
    message = str(error.value)
    assert words in message and src.name in message
    assert "\n" not in message and message.endswith(".")
    assert load_script("convert_weights").main([str(src), "--out", str(tmp_path / "weights")]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not marker.exists() and not (tmp_path / "weights").exists()


def test_a_legacy_torch_save_checkpoint_converts_like_the_safetensors_file(tmp_path):
    tiny_ldm = ck.to_single_file({c: ck.file_state_dict(c, m) for c, m in ck.tiny_models(seed=3).items()})
    convert(ck.save_checkpoint(tmp_path / "a.safetensors", tiny_ldm), tmp_path / "a", dtype="fp32", progress=False)
    convert(legacy(tmp_path / "old.ckpt", {"state_dict": tiny_ldm}), tmp_path / "b", dtype="fp32", progress=False)
    for name in ("unet.safetensors", "vae.safetensors", "text_encoder.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_pickle_globals_names_what_a_pickle_would_call_without_calling_it(tmp_path):
    marker = tmp_path / "payload-ran"
    for protocol in range(6):
        path = dump(tmp_path / f"{protocol}.pkl", [MakesFolder(marker), RunsCode(marker), {"k": 1}], protocol)
        with open(path, "rb") as f:
            assert pickle_globals(f) == ["posix.mkdir", "builtins.exec"], protocol
    assert not marker.exists()
