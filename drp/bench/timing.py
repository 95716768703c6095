"""How a measurement is taken inside a child of `python -m drp.bench`: clocks, alternating calls,
extrapolation to 50 steps, peak memory, and cold starts (files dropped from the page cache).

The lowest file of the benchmark: it imports nothing of drp. Every measuring file (tasks.py,
ip_adapter.py, drp_ip.py) and the parent (run.py) use it.
"""

import os
import resource
import sys
import time
from pathlib import Path

import torch

STEPS = 50  # every generation figure is extrapolated to SD's usual 50 DDIM steps


# ---- timing ------------------------------------------------------------------------------------------

def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()



def alternate(calls, device, repeats, warmup=1):
    """Runs each named call in turn, `warmup` rounds untimed then `repeats` timed; {name: [seconds]}."""
    times = {name: [] for name in calls}
    for round_ in range(warmup + repeats):
        for name, call in calls.items():
            start = clock(device)
            with torch.no_grad():
                call()
            if round_ >= warmup:
                times[name].append(clock(device) - start)
    return times



class UNetTimer:
    """Forward hooks that time every call of a UNet (ours or diffusers'): a list of (batch size, seconds)."""

    def __init__(self, unet, device):
        self.device, self.calls = device, []
        unet.register_forward_pre_hook(self.enter)
        unet.register_forward_hook(self.leave)

    def enter(self, module, args):
        self.start = clock(self.device)

    def leave(self, module, args, output):
        self.calls.append((args[0].shape[0], clock(self.device) - self.start))



def extrapolate(total, timer, steps):
    """The run's seconds at 50 steps: each kind of UNet call (told apart by batch size: inversion, sampling)
    made 50/steps times as often, at the time of its last call; everything else, first-call costs
    included, once. The last call, not the mean: a process's first call of a shape is much slower."""
    extra = 0.0
    for batch in {b for b, _ in timer.calls}:
        times = [s for b, s in timer.calls if b == batch]
        extra += len(times) * (STEPS / steps - 1) * times[-1]
    return total + extra



def rel_error(got, expected):
    """Largest difference relative to the largest magnitude of `expected`."""
    got, expected = got.float().cpu(), expected.float().cpu()
    return float((got - expected).abs().max() / expected.abs().max())



# ---- memory --------------------------------------------------------------------------------------------

def peak_rss_mb():
    """This process's peak resident memory in MiB.

    Read from /proc/self/status (VmHWM) where it exists: `ru_maxrss` starts at the parent's peak, which
    Linux carries over into a child across exec, so it would charge each child with the parent's memory.
    """
    try:
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024  # kB
    except (OSError, IndexError, ValueError):
        per_mb = 2**20 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb



# ---- cold starts: files out of the page cache ------------------------------------------------------------

def peak_of(call, device):
    """The peak memory (GiB) while `call()` runs, or None where it cannot be told apart from the process's past:
    the allocator's peak on a GPU; on Linux the peak resident memory, reset first through /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size (VmHWM)
        except OSError:
            return None
    with torch.no_grad():
        call()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_mb() / 1024


def files_under(folders):
    return [p for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()]



def drop_from_page_cache(folders):
    """Makes the next read of every file under `folders` come from the disk: a cold start (Linux). Does
    nothing on tmpfs, where the page cache is where the files live: see `cold_start_possible`."""
    for path in files_under(folders):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # pages not yet written out cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)



def cached_pages(path):
    """How many pages of a file are in the page cache: Linux's mincore on a mapping of it (which reads nothing)."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    with open(path, "rb") as f:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"cannot map {path}")
    try:
        if libc.mincore(address, size, pages) != 0:
            raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
    finally:
        libc.munmap(address, size)
    return sum(page & 1 for page in pages)



def cold_start_possible(folders):
    """Whether `drop_from_page_cache` takes these files out of the page cache here, tried (not on tmpfs)."""
    if not (hasattr(os, "posix_fadvise") and sys.platform.startswith("linux")):
        return False
    try:
        drop_from_page_cache(folders)
        return not any(cached_pages(path) for path in files_under(folders))
    except OSError:  # e.g. a file it may not open
        return False
