"""Where the model runs and in which number format: the `--device` and `--dtype` choices made concrete.

Where it sits: before anything is loaded. `drp.load(device=..., dtype=...)` and `sample.py` turn the
user's words (`auto`, `cuda`, `fp16`, …) into a `torch.device` and a `torch.dtype` here, so a machine
that cannot do what was asked is told so in one sentence before gigabytes of weights are read.

"auto" picks what is fast and safe on the machine at hand:
- device: CUDA if present, else Apple's MPS, else the CPU;
- dtype: fp16 on CUDA (what SD 1.5 was released in); bf16 on a CPU with native bf16 arithmetic
  (AVX512-BF16 or AMX), where it runs faster than fp32; fp32 everywhere else. fp16 on a CPU is
  refused: PyTorch's CPU kernels for it are slow and some are missing.
"""

import sys
from pathlib import Path

import torch

from .errors import DrpError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _available(kind):
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return kind == "cpu"


def resolve_device(name="auto"):
    """The torch.device for `name`: auto (or None), cpu, cuda, cuda:N, mps, or a torch.device; DrpError if absent."""
    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else str(name).lower()
    if name == "auto":
        return torch.device(next(k for k in ("cuda", "mps", "cpu") if _available(k)))
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise DrpError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}.")
    if not _available(kind):
        what = "CUDA device" if kind == "cuda" else "Apple MPS device"
        raise DrpError(f"{kind} was asked for but this machine has no {what}; use --device cpu.")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DrpError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}.") from None
    if kind == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DrpError(f"{name} was asked for but this machine has {torch.cuda.device_count()} CUDA device(s); "
                       f"use --device cuda.")
    return device


def cpu_flags():
    """The CPU's feature flags (Linux: the `flags` line of /proc/cpuinfo); empty where they cannot be read."""
    if not sys.platform.startswith("linux"):
        return set()  # no portable way to read them elsewhere; fp32 is then the safe choice
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def cpu_has_fast_bf16():
    """True when the CPU does bf16 arithmetic natively (AVX512-BF16 or AMX) and PyTorch uses its AVX512 kernels."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":  # PyTorch would not use the bf16 instructions
        return False
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_dtype(name, device):
    """The torch.dtype for `name` on `device`: auto (or None), fp32, fp16, bf16, or a torch.dtype."""
    device = torch.device(device)
    if isinstance(name, torch.dtype):
        name = next((k for k, v in DTYPES.items() if v == name), str(name))
    name = "auto" if name is None else str(name).lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise DrpError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}.")
    if name == "fp16" and device.type == "cpu":
        raise DrpError("fp16 is not supported on the CPU; use --dtype bf16 or --dtype fp32.")
    return DTYPES[name]
