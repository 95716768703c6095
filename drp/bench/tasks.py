"""The benchmark's measurements of SD itself, each run in a fresh child process (drp/bench/child.py):
the UNet and the DRP-Diff step, the VAE, the text encoder, attention memory, whole generations, loading,
torch.compile. IP-Adapter's measurements are in ip_adapter.py, its DRP mode's in drp_ip.py.
"""

import tempfile
from pathlib import Path

import torch

from .timing import STEPS, UNetTimer, alternate, clock, drop_from_page_cache, extrapolate, peak_rss_mb, rel_error
from .weights import PROMPT, load_ours, pictures, reference_models, reference_pipeline


# ---- the measurements, each run in its own child process ---------------------------------------------

def task_calibrate(spec, device, dtype):
    """GFLOP/s of a large matrix multiply in fp32 and in the compute dtype: the machine's ceiling."""
    n = 4096 if device.type == "cuda" else 1024 if spec["tiny"] else 2048
    out = {}
    for name, dt in {"fp32": torch.float32, "dtype": dtype}.items():
        a, b = torch.randn(n, n, device=device).to(dt), torch.randn(n, n, device=device).to(dt)
        seconds = alternate({"mm": lambda: a @ b}, device, spec["repeats"])["mm"]
        out[name] = 2 * n**3 / min(seconds) / 1e9
    return out



def task_unet(spec, device, dtype):
    """Ours vs reference, plain CFG step (batch 2) and DRP-Diff step (batch 4 with the hook), per size."""
    sd = load_ours(spec, dtype)
    calls_ref = {"ref": reference_models(spec, dtype, ["unet"])["unet"]} if spec["reference"] else {}
    fp32 = None
    if dtype != torch.float32:  # the fp32 model: the error bound, and diffusers fp32 for the ratios
        fp32 = load_ours(spec, torch.float32)
        if spec["reference"]:
            calls_ref["ref_fp32"] = reference_models(spec, torch.float32, ["unet"])["unet"]
    out = {}
    for s in spec["unet_sizes"]:
        g = torch.Generator().manual_seed(s)
        x = torch.randn(2, 4, s, s, generator=g).to(device, dtype)
        context = torch.randn(2, 77, sd.unet.cfg.context_dim, generator=g).to(device, dtype)
        method = dual_reference_method(sd, s)
        x4, c4 = torch.cat([x, method.latents_at(0).to(dtype)]), torch.cat([context, method.context.to(dtype)])
        calls = {"ours": lambda: sd.unet(x, 500, context)}
        for name, model in calls_ref.items():
            calls[name] = (lambda m, d: lambda: m(x.to(d), 500, context.to(d)))(model, model.dtype)
        calls["drp_early"] = lambda: sd.unet(x4, 500, c4, method.hook(0, late=False))
        calls["drp_late"] = lambda: sd.unet(x4, 500, c4, method.hook(method.opts.gen_mask_warmup, late=True))
        # one warm-up round: a process's first call of a model; on a GPU also each size's (its kernels chosen)
        warmup = 1 if s == min(spec["unet_sizes"]) or device.type == "cuda" else 0
        times = alternate(calls, device, spec["repeats"], warmup=warmup)
        with torch.no_grad():
            ours = sd.unet(x, 500, context)
            errors = {}
            if "ref" in calls_ref:
                errors["ours_vs_ref"] = rel_error(ours, calls_ref["ref"](x, 500, context).sample)
            if fp32 is not None:
                errors["ours_vs_fp32"] = rel_error(ours, fp32.unet(x.float(), 500, context.float()))
        out[str(s)] = {"times": times, "errors": errors}
    return out



def dual_reference_method(sd, s):
    """DRP-Diff prepared with two synthetic references (left/right-half masks) for timing a step."""
    from ..dual_reference import DualReference, Options, Reference

    g = torch.Generator().manual_seed(1)
    refs = {}
    for kind, half in (("content", slice(0, s * 4)), ("style", slice(s * 4, s * 8))):
        mask = torch.zeros(8 * s, 8 * s)
        mask[:, half] = 1
        latents = torch.randn(STEPS, 1, 4, s, s, generator=g).to(sd.device)
        context = torch.randn(1, 77, sd.unet.cfg.context_dim, generator=g).to(sd.device, sd.dtype)
        refs[kind] = Reference(kind, latents, context, mask, 1.0, "benchmark", False)
    return DualReference(refs, Options(), 1, [[2]], STEPS // 2, {})



def task_vae(spec, device, dtype):
    sd = load_ours(spec, dtype)
    px = spec["size"]
    image = torch.rand(1, 3, px, px, generator=torch.Generator().manual_seed(0)).mul(2).sub(1).to(device, dtype)
    latent = torch.randn(1, 4, px // 8, px // 8, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    calls = {"encode_ours": lambda: sd.vae.encode(image), "decode_ours": lambda: sd.vae.decode(latent)}
    if spec["reference"]:
        ref = reference_models(spec, dtype, ["vae"])["vae"]
        calls["encode_ref"] = lambda: ref.encode(image).latent_dist.mean
        calls["decode_ref"] = lambda: ref.decode(latent).sample
    return {"times": alternate(calls, device, spec["repeats"])}



def task_text(spec, device, dtype):
    sd = load_ours(spec, dtype)
    tokens = sd.tokenizer(["", PROMPT]).to(device)
    calls = {"ours": lambda: sd.text_encoder(tokens)}
    if spec["reference"]:
        ref = reference_models(spec, dtype, ["text_encoder"])["text_encoder"]
        calls["ref"] = lambda: ref(tokens).last_hidden_state
    return {"times": alternate(calls, device, spec["repeats"])}



def task_attention(spec, device, dtype):
    """Extra peak memory (MB) of SD's largest self-attention (4,096 tokens, 8 heads of 40), batch 2."""
    from ..attention import attend, attend_explicit

    q = torch.randn(2, 8, 4096, 40, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    def peak_mb():
        return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb()

    out = {}
    for name, fn in (("fused", attend), ("explicit", attend_explicit)):  # the small one first: a peak only grows
        before = peak_mb()
        start = clock(device)
        fn(q, q, q)
        out[name] = {"seconds": clock(device) - start, "extra_peak_mb": peak_mb() - before}
    return out



def task_generate(spec, device, dtype):
    """One plain generation with `steps` steps, ours or diffusers' pipeline, extrapolated to 50 steps."""
    px, steps = spec["size"], spec["steps"]
    latents = torch.randn(1, 4, px // 8, px // 8, generator=torch.Generator().manual_seed(0))
    if spec["impl"] == "ours":
        from ..pipeline import generate

        sd = load_ours(spec, dtype)
        timer = UNetTimer(sd.unet, device)
        start = clock(device)
        generate(sd, PROMPT, steps=steps, height=px, width=px, latents=latents, progress=False)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            pipe = reference_pipeline(reference_models(spec, dtype), tmp)
            timer = UNetTimer(pipe.unet, device)
            start = clock(device)
            pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=px, width=px,
                 latents=latents.to(device, dtype), output_type="pil")
    total = clock(device) - start
    return {"seconds": total, "extrapolated": extrapolate(total, timer, steps), "unet_calls": timer.calls}



def task_drp(spec, device, dtype):
    """The self-attention mode's generation twice with one cache folder: inverting the references, then
    cached (named, since `auto` would take the IP-Adapter mode when --only ip-adapter has added its files)."""
    from ..pipeline import generate

    px, steps = spec["size"], spec["steps"]
    sd = load_ours(spec, dtype)
    timer = UNetTimer(sd.unet, device)
    content, style = pictures(px)
    out = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for run in ("first", "cached"):
            timer.calls = []
            start = clock(device)
            result = generate(sd, PROMPT, steps=steps, height=px, width=px, content=content, style=style,
                              subject="cat", mode="self-attention", cache_dir=cache_dir, progress=False)
            total = clock(device) - start
            out[run] = {"seconds": total, "extrapolated": extrapolate(total, timer, steps),
                        "unet_calls": timer.calls, "timings": result.info["timings"]}
    return out


def task_load(spec, device, dtype):
    """Seconds to load the three models from fp16 files (ours or diffusers'): for fp32 compute on the CPU
    (the issue's case), for the compute dtype on a GPU; `cold`: with the files out of the page cache."""
    dtype = dtype if device.type == "cuda" else torch.float32
    if spec.get("cold"):  # both folders, whichever side this is: each run starts from the same state
        drop_from_page_cache([spec["weights"], spec["source"]])
    start = clock(device)
    if spec["impl"] == "ours":
        load_ours(spec, dtype)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        source = Path(spec["source"])
        held = []  # all three alive at once, as drp.load holds them, so that the peak counts them together
        for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
            held.append(cls.from_pretrained(source / sub, torch_dtype=dtype).to(device))
    return {"seconds": clock(device) - start}



def task_compile(spec, device, dtype):
    """torch.compile of our UNet at 32×32, batch 2: the first call's cost, then compiled vs eager."""
    sd = load_ours(spec, dtype)
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    context = torch.randn(2, 77, sd.unet.cfg.context_dim).to(device, dtype)
    compiled = torch.compile(sd.unet)
    start = clock(device)
    with torch.no_grad():
        compiled(x, 500, context)
    first = clock(device) - start
    times = alternate({"eager": lambda: sd.unet(x, 500, context), "compiled": lambda: compiled(x, 500, context)},
                      device, spec["repeats"])
    return {"first_call": first, "times": times}



TASKS = {"calibrate": task_calibrate, "unet": task_unet, "vae": task_vae, "text": task_text,
         "attention": task_attention, "generate": task_generate, "drp": task_drp, "load": task_load,
         "compile": task_compile}
