"""`python -m drp.bench --only drp-ip,drp-ip-first`: the cost of DRP-Diff's IP-Adapter mode (ALGORITHM_IP_ADAPTER.md B2).

Two child processes (drp/bench/child.py runs them) hold our SD from the benchmark's random folder, a
random IP-Adapter with SD 1.5's shapes and a random image encoder (`--tiny`: their tiny configs), built in
memory: their values change no timing. They measure

  drp-ip (a small encoder: a step does not run it)
    step     one IP-mode DRP step (batch 2 with the stage's hook: 16 attn2 layers with a second softmax
             over both references' tokens) next to a plain CFG step, at each benchmark latent size;
             issue 12's target: ≤ 1.15× (the self-attention mode's step costs ~2×); and the early step
             with `filter_values` (its values through W_v (I − V_bg V_bgᵀ), made once per run): the
             same within noise
    svd      the 16 SVDs of the adapter's key projections, once per loaded adapter
  drp-ip-first (CLIP ViT-H/14, as the mode runs it)
    first    the whole first run with both references in each mode, same prompt and pictures:
             IP-Adapter (encoder, SVDs, batch-2 sampling) vs self-attention (two inversions, batch-4
             sampling), `steps` run and extrapolated to 50 like the other generation rows
"""

import tempfile
import time

import torch

from .timing import UNetTimer, alternate, clock, extrapolate
from .weights import PROMPT, load_ours, pictures

STAGES = ("early", "late")


def random_ip_components(sd, tiny, dtype, small_encoder=False):
    """A random IP-Adapter that fits `sd.unet` and a random image encoder, set on `sd`. `small_encoder`: a
    tiny encoder with ViT-H/14's output width, for measurements that do not time the encoder."""
    from ..ip_adapter import IPAdapter, IPAdapterConfig, attn2_layers
    from ..vision import VisionConfig, VisionTransformer

    layers = tuple(attn2_layers(sd.unet.cfg).items())
    encoder_cfg = VisionConfig.tiny() if tiny else VisionConfig.vit_h14()
    if small_encoder:
        encoder_cfg = VisionConfig.tiny(projection_dim=encoder_cfg.projection_dim)
    adapter_cfg = IPAdapterConfig(image_dim=encoder_cfg.projection_dim, context_dim=sd.unet.cfg.context_dim,
                                  layers=layers)
    torch.manual_seed(0)
    adapter, encoder = IPAdapter(adapter_cfg), VisionTransformer(encoder_cfg)
    with torch.no_grad():  # the Resampler's queries and LayerNorms come uninitialised or at 1/0: give all values
        for p in [*adapter.parameters(), *encoder.parameters()]:
            p.normal_(0, 0.02)
    sd.ip_adapter = adapter.to(sd.device, dtype).eval().requires_grad_(False)
    sd.image_encoder = encoder.to(sd.device, dtype).eval().requires_grad_(False)


def task_drp_ip(spec, device, dtype):
    """The step and the SVDs (a small encoder: its cost is not part of a step)."""
    from .. import dual_reference_ip, svd_keys

    sd = load_ours(spec, dtype)
    random_ip_components(sd, spec["tiny"], dtype, small_encoder=True)
    content, style = pictures(spec["size"])
    out = {}

    start = time.perf_counter()  # as the method computes them (float32 on the CPU); prepare reuses them
    svd_keys.spectra(sd.ip_adapter, sd.ip_adapter.layer_names)
    out["svd_seconds"] = time.perf_counter() - start

    method, filtered = (dual_reference_ip.prepare(sd, [PROMPT], content=content, style=style, subject="cat",
                                                  steps=spec["steps"], progress=False, filter_values=on)
                        for on in (False, True))
    for s in spec["unet_sizes"]:
        g = torch.Generator().manual_seed(s)
        x = torch.randn(2, 4, s, s, generator=g).to(device, dtype)
        context = torch.randn(2, 77, sd.unet.cfg.context_dim, generator=g).to(device, dtype)
        calls = {"plain": lambda: sd.unet(x, 500, context)}
        for late, stage in enumerate(STAGES):
            x_in, c_in, hook = method.step_inputs(0, bool(late), x, context)
            calls[stage] = (lambda a, c, h: lambda: sd.unet(a, 500, c, h))(x_in, c_in.to(dtype), hook)
        x_in, c_in, hook = filtered.step_inputs(0, False, x, context)
        calls["early_filtered"] = (lambda a, c, h: lambda: sd.unet(a, 500, c, h))(x_in, c_in.to(dtype), hook)
        warmup = 1 if s == min(spec["unet_sizes"]) or device.type == "cuda" else 0
        out[str(s)] = alternate(calls, device, spec["repeats"], warmup=warmup)

    return out


def task_drp_ip_first(spec, device, dtype):
    """The whole first run with both references in each mode (the real encoder: its pass is part of it)."""
    from ..pipeline import generate

    sd = load_ours(spec, dtype)
    random_ip_components(sd, spec["tiny"], dtype)
    px, steps = spec["size"], spec["steps"]
    content, style = pictures(px)
    out = {}
    timer = UNetTimer(sd.unet, device)
    with tempfile.TemporaryDirectory() as cache_dir:
        for mode in ("ip-adapter", "self-attention"):
            timer.calls = []
            options = dict(cache_dir=cache_dir) if mode == "self-attention" else {}
            start = clock(device)
            result = generate(sd, PROMPT, steps=steps, height=px, width=px, content=content, style=style,
                              subject="cat", mode=mode, progress=False, **options)
            total = clock(device) - start
            out[mode] = {"seconds": total, "extrapolated": extrapolate(total, timer, steps),
                         "timings": result.info["timings"]}
    return out


TASKS = {"drp-ip": task_drp_ip, "drp-ip-first": task_drp_ip_first}


def rows(result, first, spec, row):
    """The report's rows of the two measurements (`row` is drp/bench/run.py's row maker); either may be None."""
    px, out = spec["size"], []
    for s in spec["unet_sizes"] if result else []:
        t = result[str(s)]
        for stage in STAGES:
            out.append(row(f"DRP-IP step {s}×{s} ({stage}) / plain CFG step", t[stage], t["plain"],
                           note="ours, batch 2 with the IP-Adapter mode's hook vs batch 2"))
        if "early_filtered" in t:
            out.append(row(f"DRP-IP step {s}×{s} (early), filter_values on / off", t["early_filtered"], t["early"],
                           note="the early stage's values through W_v (I - V_bg V_bg^T); expected: the same"))
    if result:
        out.append(row("DRP-IP: SVDs of the 16 image-key projections", result["svd_seconds"],
                       note="once per loaded adapter; float32 on the CPU, with the process's threads"))
    if first is not None:
        out.append(row(f"DRP-IP generation {px}×{px}, 50 steps: first run / self-attention mode's first run",
                       first["ip-adapter"]["extrapolated"], first["self-attention"]["extrapolated"],
                       note=f"{spec['steps']} steps run, extrapolated; self-attention inverts both references",
                       peak_gib=first.get("peak_rss_gib")))
    return out
