"""Many processes through torchrun: which process this is, its device, and the few collectives we need.

Where it sits: the start and end of `run` and `score`. `torchrun` (PyTorch's own launcher) starts the
processes and sets RANK, WORLD_SIZE and LOCAL_RANK; we read them, join the process group (NCCL between
GPUs, gloo between CPUs) and never schedule anything ourselves. Rank r of w works on `items[r::w]`.
Started plainly (`python -m drp.evaluate ...`) there is one process, rank 0 of 1, and every collective
below returns its input, so the same code runs either way.
"""

import os
import platform
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..devices import resolve_device

TIMEOUT = timedelta(hours=6)  # of a collective; a full-size DRP-Diff image on a 2-core CPU takes about 30 minutes


@dataclass
class Ranks:
    """This process's place among the ones torchrun started."""

    rank: int
    world: int
    local: int  # the rank within this machine: picks the GPU
    device: torch.device
    joined: bool = False  # True when we joined a process group (and must leave it)

    @property
    def main(self):
        return self.rank == 0


def start(device="auto"):
    """Read torchrun's environment, choose this rank's device and join the process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    name = str(device).lower()
    if world > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        name = f"cuda:{local}"  # one GPU per process, numbered by the rank on this machine
    elif world > 1 and name == "auto":
        name = "cpu"
    chosen = resolve_device(name)
    ranks = Ranks(rank, world, local, chosen)
    if world > 1:
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        # the ranks meet once per image: a rank may wait a whole image for the others (minutes on a CPU)
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", timeout=TIMEOUT)
        ranks.joined = True
    return ranks


def stop(ranks):
    if ranks.joined:
        dist.destroy_process_group()
        ranks.joined = False


def _tensor(ranks, values):
    # NCCL moves only GPU tensors; gloo only CPU ones
    where = ranks.device if ranks.device.type == "cuda" and ranks.joined else "cpu"
    return torch.tensor(values, dtype=torch.float64, device=where)


def all_sum(ranks, values):
    """The element-wise sum of `values` (a list of numbers) over all ranks."""
    if not ranks.joined:
        return list(values)
    t = _tensor(ranks, values)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_max(ranks, value):
    """The largest `value` of any rank."""
    if not ranks.joined:
        return value
    t = _tensor(ranks, [value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return type(value)(t.item())


def gather(ranks, values):
    """Every rank's `values` (a list of numbers, the same length on each), in rank order."""
    if not ranks.joined:
        return [list(values)]
    t = _tensor(ranks, values)
    rows = [torch.empty_like(t) for _ in range(ranks.world)]
    dist.all_gather(rows, t)
    return [r.tolist() for r in rows]


def barrier(ranks):
    if ranks.joined:
        dist.barrier()


def device_name(device):
    """What a run's table says of the machine: the GPU's name, or the CPU's model (Linux) and threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    cpu = platform.processor() or platform.machine() or "CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"
