"""What runs inside a child process of `python -m drp.bench`: one measurement per fresh process.

drp/bench/run.py writes the random weights and then starts `python -m drp.bench.child SPEC` once per
measurement: `child_main` runs the task the JSON spec names and writes its result, with the process's
peak memory, as JSON to the spec's `out` file. A fresh process per measurement: its peak resident memory
belongs to that measurement alone. The top of the benchmark's imports: the task files are below it.
"""

import json
import sys
from pathlib import Path

import torch

from .timing import peak_rss_mb


def task_function(name):
    """The task `name`, from the file that holds it (imported only when asked for)."""
    if name.startswith("ip-"):
        from .ip_adapter import TASKS
    elif name.startswith("drp-ip"):
        from .drp_ip import TASKS
    elif name == "maps":
        from .maps import TASKS
    else:
        from .tasks import TASKS
    return TASKS[name]


def child_main(spec_json):
    """Entry point of a child process: run one task, write its result and peak memory as JSON."""
    from ..devices import resolve_device, resolve_dtype

    spec = json.loads(spec_json)
    torch.manual_seed(0)
    device = resolve_device(spec["device"])
    dtype = resolve_dtype(spec["dtype"], device)
    result = task_function(spec["task"])(spec, device, dtype)
    result["peak_rss_gib"] = peak_rss_mb() / 1024
    if device.type == "cuda":
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    child_main(sys.argv[1])
