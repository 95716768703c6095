"""`python -m drp.bench --only maps`: what recording attention maps costs (drp/attention_maps.py).

One child process holds our SD from the benchmark's random folder and a random IP-Adapter with SD 1.5's
shapes (a small image encoder: a step does not run it), and, at each benchmark latent size, in each
DRP-Diff mode and stage, times one UNet step with and without recording two words and both references
(alternating calls, as the loop makes them: the stage's hook, and the recorder watching it). Then each
call once more for its peak memory alone: the allocator's peak on a GPU; on Linux the process's peak
resident memory after resetting it (`/proc/self/clear_refs`), elsewhere not measured. Target: ≤ 1.10×.
"""

import torch

from .drp_ip import random_ip_components
from .tasks import dual_reference_method
from .timing import alternate, peak_of
from .weights import PROMPT, load_ours, pictures

NAMES = ["cat", "bench", "content", "style"]  # two words of PROMPT and both references
STAGES = ("early", "late")


def step_calls(sd, mode, s, dtype):
    """{f"{stage}" / f"{stage}+maps": a call of one UNet step} for one mode at latent size s."""
    from ..attention_maps import AttentionMaps
    from ..dual_reference_ip import prepare

    g = torch.Generator().manual_seed(s)
    x = torch.randn(2, 4, s, s, generator=g).to(sd.device, dtype)
    context = torch.randn(2, 77, sd.unet.cfg.context_dim, generator=g).to(sd.device, dtype)
    if mode == "ip-adapter":
        content, style = pictures(8 * s)
        method = prepare(sd, [PROMPT], content=content, style=style, subject="cat", progress=False)
    else:
        method = dual_reference_method(sd, s)
    maps = AttentionMaps(sd, [PROMPT], NAMES, method, 8 * s, 8 * s)
    calls = {}
    for late, stage in enumerate(STAGES):
        i = method.opts.gen_mask_warmup if late and mode == "self-attention" else 0  # late: the subject split on
        x_in, c_in, _ = method.step_inputs(i, bool(late), x, context)
        x_in, c_in = x_in.to(dtype), c_in.to(dtype)

        def hook(i=i, late=bool(late)):  # the step's hook as the loop gets it: the self-attention mode makes one per step
            return method.hook(i, late) if mode == "self-attention" else method.hooks[late]

        calls[stage] = (lambda a, c, h: lambda: sd.unet(a, 500, c, h()))(x_in, c_in, hook)
        calls[f"{stage}+maps"] = (lambda a, c, h, late: lambda: sd.unet(a, 500, c, maps.hook(late, h())))(
            x_in, c_in, hook, bool(late))
    return calls


def task_maps(spec, device, dtype):
    sd = load_ours(spec, dtype)
    random_ip_components(sd, spec["tiny"], dtype, small_encoder=True)
    out = {}
    for s in spec["unet_sizes"]:
        for mode in ("ip-adapter", "self-attention"):
            calls = step_calls(sd, mode, s, dtype)
            warmup = 1 if s == min(spec["unet_sizes"]) or device.type == "cuda" else 0
            times = alternate(calls, device, spec["repeats"], warmup=warmup)
            peaks = {name: peak_of(call, device) for name, call in calls.items()}
            out[f"{mode} {s}"] = {"times": times, "peak_gib": peaks}
    return out


TASKS = {"maps": task_maps}


def rows(result, spec, row):
    """The report's rows: each mode and stage's step with recording / without, and the extra peak memory."""
    out = []
    for s in spec["unet_sizes"]:
        for mode in ("ip-adapter", "self-attention"):
            r = result[f"{mode} {s}"]
            for stage in STAGES:
                before, after = r["peak_gib"][stage], r["peak_gib"][f"{stage}+maps"]
                extra = f"; peak memory {before:.2f} -> {after:.2f} GiB" if before is not None else ""
                out.append(row(f"attention maps {s}×{s}, {mode} ({stage}): recording / not", r["times"][f"{stage}+maps"],
                               r["times"][stage], note=f"two words and both references{extra}"))
    return out
