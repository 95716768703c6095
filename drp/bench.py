"""`python -m drp.bench`: drp against diffusers on random full-size SD 1.5 weights — speed, memory, loading.

Nothing is downloaded. The benchmark writes a random fp16 diffusers folder with SD 1.5's shapes into a
temporary directory, converts it into a drp weights folder with `drp.convert`, and then runs every
measurement in a fresh child process (so that the child's peak resident memory, `ru_maxrss`, belongs
to that measurement alone). Inside a child, ours and the reference (diffusers, if importable) hold the
*same* tensors and are called alternately, so a machine shared with other work slows both alike.

    unet        UNet forward, batch 2 (one classifier-free-guidance step), at 32×32 and size/8 latents;
                the dual-reference step (batch 4 with DRP-Diff's hook, early and late stage)
    vae         VAE encode and decode of one size×size image
    text        the text encoder on 2 prompts
    attention   extra peak memory of one 4,096-token self-attention: fused kernel vs explicit softmax
    generate    a whole plain generation: a few steps run, extrapolated to 50 (text + 50 × step + decode)
    drp         the dual-reference generation, first run (inverting both references) and cached rerun
    load        loading the fp16 files for fp32 compute: drp.load vs diffusers' from_pretrained
    compile     torch.compile of our UNet at 32×32: first-call cost and speed-up (only with --compile)

Extrapolation: a child times every UNet call with forward hooks; everything the UNet does scales with the
number of steps and nothing else does, so total(50) = total(k) + unet_time(k) × (50/k − 1).
Achieved GFLOP/s count the model's FLOPs once with `torch.utils.flop_counter` on the meta device, and
are set against a large matrix multiply measured on the same machine in the same run.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .clip import CLIPConfig
from .errors import DrpError
from .model_io import MODELS, build_on_meta
from .unet import UNetConfig
from .vae import VAEConfig

STEPS = 50  # every generation figure is extrapolated to SD's usual 50 DDIM steps
PROMPT = "a cat sitting on a bench, in the style of a painting"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TASKS = ["unet", "vae", "text", "attention", "generate", "drp", "load", "compile"]


# ---- random weights, written the way users have them ------------------------------------------------

def folder_configs(configs, dtype="float16"):
    """config.json of each component of a diffusers folder for our configs (what drp.convert reads)."""
    u, v, t = configs["unet"], configs["vae"], configs["text_encoder"]
    levels = len(u.channels)
    return {
        "unet": {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": u.in_channels,
                 "out_channels": u.out_channels, "block_out_channels": list(u.channels),
                 "layers_per_block": u.layers_per_block, "attention_head_dim": u.heads,
                 "cross_attention_dim": u.context_dim, "norm_num_groups": u.groups,
                 "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attn_levels],
                 "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attn_levels)]},
        "vae": {"_class_name": "AutoencoderKL", "in_channels": v.in_channels, "out_channels": v.in_channels,
                "latent_channels": v.latent_channels, "block_out_channels": list(v.channels),
                "layers_per_block": v.layers_per_block, "norm_num_groups": v.groups, "sample_size": 512,
                "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels},
        "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                         "vocab_size": t.vocab_size, "max_position_embeddings": t.max_len, "hidden_size": t.dim,
                         "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                         "intermediate_size": t.mlp_dim, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                         "projection_dim": t.dim, "torch_dtype": dtype},
    }


def random_tensor(key, shape, generator):
    """Seeded values of a sensible size: N(0, 1/fan_in) weights, norm scales near 1, small biases."""
    if len(shape) >= 2:
        return torch.randn(shape, generator=generator) / int(torch.Size(shape[1:]).numel()) ** 0.5
    if key.endswith("weight"):
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    return 0.1 * torch.randn(shape, generator=generator)


def write_random_folders(workdir, configs, seed=0):
    """A random fp16 diffusers folder and its drp conversion in `workdir`; returns their paths."""
    from .convert import convert

    source, weights = Path(workdir) / "diffusers", Path(workdir) / "weights"
    files = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
             "text_encoder": "model.safetensors"}
    for i, (component, config) in enumerate(folder_configs(configs).items()):
        folder = source / component
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(seed * 10 + i)
        shapes = {k: tuple(v.shape) for k, v in build_on_meta(component, configs[component]).state_dict().items()}
        tensors = {k: random_tensor(k, s, generator).half() for k, s in sorted(shapes.items())}
        save_file(tensors, str(folder / (files[component] + ".tmp")), metadata={"format": "pt"})
        os.replace(folder / (files[component] + ".tmp"), folder / files[component])
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        del tensors
    convert(source, weights, dtype="fp16", progress=False)
    return source, weights


# ---- the reference: diffusers models holding our tensors -------------------------------------------

def reference_models(spec, dtype, components=("unet", "vae", "text_encoder")):
    """diffusers' UNet and VAE and transformers' CLIP built on meta, then given the converted files' tensors.

    Read as plain contiguous tensors, one copy, whatever layout drp.load chooses: the reference runs as
    users run it, and a child holding it holds nothing else.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    source, models = Path(spec["source"]), {}
    with torch.device("meta"):
        if "unet" in components:
            models["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source / "unet"))
        if "vae" in components:
            models["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(source / "vae"))
        if "text_encoder" in components:
            models["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(source / "text_encoder"))
    for name, model in models.items():
        keys = set(model.state_dict())
        with safe_open(str(Path(spec["weights"]) / MODELS[name][2]), framework="pt") as f:
            state = {(k if k in keys else k.removeprefix("text_model.")): f.get_tensor(k).to(spec["device"], dtype)
                     for k in f.keys()}
        model.load_state_dict(state, assign=True, strict=False)
        for key, buffer in list(model.named_buffers()):
            if buffer.is_meta and key.endswith("position_ids"):  # a non-persistent buffer of transformers
                owner = model.get_submodule(key.rsplit(".", 1)[0])
                owner.register_buffer("position_ids", torch.arange(buffer.shape[-1])[None], persistent=False)
        leftover = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"the reference {name} got no value for {leftover[0]}")
        model.eval().requires_grad_(False)
    return models


def reference_pipeline(models, workdir):
    """diffusers' StableDiffusionPipeline with SD 1.5's DDIM scheduler and a CLIP tokenizer of our vocabulary."""
    import gzip

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from .tokenizer import DEFAULT_VOCAB, NUM_MERGES, bytes_to_unicode

    with gzip.open(DEFAULT_VOCAB, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 1 + NUM_MERGES]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(workdir) / "tokenizer"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer,
                                   unet=models["unet"], scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def has_reference():
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ---- timing inside a child ---------------------------------------------------------------------------

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


def load_ours(spec, dtype):
    from .model_io import load

    return load(spec["weights"], device=spec["device"], dtype=dtype)


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
        times = alternate(calls, device, spec["repeats"], warmup=1 if s == min(spec["unet_sizes"]) else 0)
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
    from .dual_reference import DualReference, Options, Reference

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
    from .attention import attend, attend_explicit

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
        from .pipeline import generate

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
    """The dual-reference generation twice with one cache folder: inverting the references, then cached."""
    from PIL import Image

    from .pipeline import generate

    px, steps = spec["size"], spec["steps"]
    sd = load_ours(spec, dtype)
    timer = UNetTimer(sd.unet, device)
    content, style = ASSETS / "chelsea.png", ASSETS / "starry_night.jpg"
    if not (content.is_file() and style.is_file()):  # outside a checkout: two made-up pictures
        content = Image.effect_mandelbrot((px, px), (-2, -1.5, 1, 1.5), 100).convert("RGB")
        style = Image.linear_gradient("L").resize((px, px)).convert("RGB")
    out = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for run in ("first", "cached"):
            timer.calls = []
            start = clock(device)
            result = generate(sd, PROMPT, steps=steps, height=px, width=px, content=content, style=style,
                              subject="cat", cache_dir=cache_dir, progress=False)
            total = clock(device) - start
            out[run] = {"seconds": total, "extrapolated": extrapolate(total, timer, steps),
                        "unet_calls": timer.calls, "timings": result.info["timings"]}
    return out


def task_load(spec, device, dtype):
    """Seconds to load the three models for fp32 compute from fp16 files (ours or diffusers')."""
    start = clock(device)
    if spec["impl"] == "ours":
        load_ours(spec, torch.float32)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        source = Path(spec["source"])
        for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
            cls.from_pretrained(source / sub, torch_dtype=torch.float32).to(device)
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


def peak_rss_mb():
    """This process's peak resident memory in MB.

    Read from /proc/self/status (VmHWM) where it exists: `ru_maxrss` starts at the parent's peak, which
    Linux carries over into a child across exec, so it would charge each child with the parent's memory.
    """
    try:
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024  # kB
    except (OSError, IndexError, ValueError):
        per_mb = 2**20 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mb


def child_main(spec_json):
    """Entry point of a child process: run one task, write its result and peak memory as JSON."""
    from .devices import resolve_device, resolve_dtype

    spec = json.loads(spec_json)
    torch.manual_seed(0)
    device = resolve_device(spec["device"])
    dtype = resolve_dtype(spec["dtype"], device)
    result = globals()["task_" + spec["task"]](spec, device, dtype)
    result["peak_rss_gb"] = peak_rss_mb() / 1024
    if device.type == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    Path(spec["out"]).write_text(json.dumps(result))


# ---- the parent: plan, run the children one at a time, report -----------------------------------------

def run_child(task, spec, workdir, **extra):
    """Runs one task in a fresh Python process; its result dict (DrpError if it failed)."""
    out = Path(workdir) / f"result-{task}-{extra.get('impl', '')}.json"
    spec = dict(spec, task=task, out=str(out), **extra)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "drp.bench", "--child", json.dumps(spec)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise DrpError(f"the {task} measurement failed in its child process:\n{tail}")
    return json.loads(out.read_text())


def count_flops(configs, unet_sizes, px):
    """FLOPs of each measured call, counted once on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    models = {name: build_on_meta(name, cfg) for name, cfg in configs.items()}
    unet, vae, text = models["unet"], models["vae"], models["text_encoder"]
    meta = dict(device="meta")
    calls = {f"unet{s}": lambda s=s: unet(torch.empty(2, 4, s, s, **meta), 1,
                                          torch.empty(2, 77, unet.cfg.context_dim, **meta))
             for s in unet_sizes}
    calls["encode"] = lambda: vae.encode(torch.empty(1, 3, px, px, **meta))
    calls["decode"] = lambda: vae.decode(torch.empty(1, 4, px // 8, px // 8, **meta))
    calls["text"] = lambda: text(torch.zeros(2, 77, dtype=torch.long, **meta))
    flops = {}
    for name, call in calls.items():
        with FlopCounterMode(display=False) as counter:
            call()
        flops[name] = counter.get_total_flops()
    return flops


def stats(seconds):
    seconds = [seconds] if isinstance(seconds, (int, float)) else seconds
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "runs": seconds}


def row(name, ours, ref=None, flops=None, note="", **extra):
    r = {"name": name, "ours": stats(ours), "note": note, **extra}
    if ref is not None:
        r["ref"] = stats(ref)
        r["ratio"] = r["ours"]["median"] / r["ref"]["median"]
    if flops:
        r["gflops"] = flops / 1e9
        r["ours"]["gflop_s"] = flops / r["ours"]["median"] / 1e9
        if ref is not None:
            r["ref"]["gflop_s"] = flops / r["ref"]["median"] / 1e9
    return r


def measure(args, spec, workdir, configs, say):
    """Runs the selected measurements; the report's rows and raw child results."""
    rows, raw, tasks = [], {}, args.only
    ref_name = "diffusers" if spec["reference"] else None
    flops = count_flops(configs, spec["unet_sizes"], spec["size"])
    px = spec["size"]

    def child(task, **extra):
        say(f"  measuring {task} {extra.get('impl', '')}".rstrip() + " …")
        result = run_child(task, spec, workdir, **extra)
        raw[task + ("_" + extra["impl"] if "impl" in extra else "")] = result
        return result

    def ours_then_reference(task, repeats, value):
        """Children for ours and the reference in turn, `repeats` rounds: their values and peak memory."""
        runs, peaks = {"ours": [], "ref": []}, {"ours": [], "ref": []}
        for _ in range(repeats):
            for impl in (["ours", "ref"] if ref_name else ["ours"]):
                result = child(task, impl=impl, **({"dtype": "fp32"} if impl == "ref" else {}))
                runs[impl].append(result[value])
                peaks[impl].append(result["peak_rss_gb"])
        peak = dict(peak_gb=max(peaks["ours"]), ref_peak_gb=max(peaks["ref"], default=None))
        return runs["ours"], runs["ref"] or None, peak

    cal = child("calibrate")
    if "unet" in tasks:
        result = child("unet")
        for s in spec["unet_sizes"]:
            t, err = result[str(s)]["times"], result[str(s)]["errors"]
            rows.append(row(f"UNet {s}×{s}, batch 2", t["ours"], t.get("ref_fp32", t.get("ref")),
                            flops[f"unet{s}"], errors=err,
                            note="vs diffusers fp32" if "ref_fp32" in t else ""))
            if "ref_fp32" in t and "ref" in t:
                rows.append(row(f"UNet {s}×{s}, batch 2, vs diffusers {spec['dtype']}", t["ours"], t["ref"],
                                flops[f"unet{s}"]))
            for stage in ("early", "late"):
                rows.append(row(f"DRP step {s}×{s} ({stage}) / plain CFG step", t[f"drp_{stage}"], t["ours"],
                                note="ours, batch 4 with the hook vs batch 2"))
    if "vae" in tasks:
        result = child("vae")
        t = result["times"]
        for part in ("encode", "decode"):
            rows.append(row(f"VAE {part} {px}×{px}", t[f"{part}_ours"], t.get(f"{part}_ref"), flops[part]))
    if "text" in tasks:
        result = child("text")
        rows.append(row("text encoder, 2 prompts", result["times"]["ours"], result["times"].get("ref"),
                        flops["text"]))
    if "attention" in tasks:
        result = child("attention")
        rows.append(row("attention 4096 tokens, batch 2: extra peak MB", result["fused"]["extra_peak_mb"],
                        result["explicit"]["extra_peak_mb"], unit="MB",
                        note="ours fused (SDPA) vs explicit softmax (the score matrix)"))
    named = {r["name"]: r for r in rows}
    parts = [named.get(n) for n in ("text encoder, 2 prompts", f"UNet {px // 8}×{px // 8}, batch 2",
                                    f"VAE decode {px}×{px}")]
    if "generate" in tasks and all(parts):  # from the calls measured alternately: robust to a busy machine
        def composed(side):
            return parts[0][side]["median"] + STEPS * parts[1][side]["median"] + parts[2][side]["median"]

        rows.append(row(f"generation {px}×{px}, {STEPS} steps, composed", composed("ours"),
                        composed("ref") if all("ref" in r for r in parts) else None,
                        note=f"text + {STEPS} × UNet step + VAE decode, as measured above"))
    if "generate" in tasks:  # diffusers in fp32: the issue's targets compare with it
        ours, ref, peaks = ours_then_reference("generate", args.gen_repeats, "extrapolated")
        rows.append(row(f"generation {px}×{px}, {STEPS} steps", ours, ref,
                        note=f"{spec['steps']} steps run, extrapolated; vs diffusers fp32", **peaks))
    if "drp" in tasks:
        result = child("drp")
        rows.append(row(f"DRP generation {px}×{px}, {STEPS} steps: first run", result["first"]["extrapolated"],
                        note=f"{spec['steps']} steps run, extrapolated; both references inverted",
                        peak_gb=result["peak_rss_gb"]))
        rows.append(row("DRP generation: cached rerun / first run", result["cached"]["extrapolated"],
                        result["first"]["extrapolated"], note="inversions read from the cache"))
    if "load" in tasks:
        ours, ref, peaks = ours_then_reference("load", args.repeats, "seconds")
        rows.append(row("load fp16 files for fp32 compute", ours, ref, note="warm page cache", **peaks))
    if "compile" in tasks:
        result = child("compile")
        t = result["times"]
        rows.append(row("torch.compile UNet 32×32: compiled / eager", t["compiled"], t["eager"],
                        flops.get("unet32"), first_call_s=result["first_call"]))
    return {"calibration": cal, "rows": rows, "raw": raw}


TARGETS = [  # (row name prefix, what, bound) from the issue; checked where the row was measured
    ("UNet 64×64, batch 2", "ratio", 1.0, "fp32"), ("UNet 64×64, batch 2", "ratio", 0.5, "half"),
    ("UNet 64×64, batch 2, vs diffusers", "ratio", 0.85, "half"), ("UNet 32×32, batch 2", "ratio", 0.5, "half"),
    ("generation", "ratio", 0.55, "half"), ("generation", "peak", 0.6, "half"),
    ("load", "ratio", 1.0, "any"), ("load", "peak", 0.8, "any"),
    ("DRP step 64×64 (late)", "ratio", 2.2, "any"), ("DRP step 64×64 (early)", "ratio", 2.2, "any"),
    ("DRP generation: cached", "ratio", 0.75, "any"),
]


def check_targets(rows, dtype):
    checks = []
    for prefix, what, bound, when in TARGETS:
        if (when == "fp32") != (dtype == "fp32") and when != "any":
            continue
        for r in rows:
            if r["name"].startswith(prefix) and (prefix.endswith("diffusers") or "vs diffusers " not in r["name"]):
                value = r.get("ratio") if what == "ratio" else (
                    r["peak_gb"] / r["ref_peak_gb"] if r.get("ref_peak_gb") else None)
                if value is not None:  # the first row of that name that has the figure
                    checks.append({"row": r["name"], "what": what, "value": value, "bound": bound,
                                   "met": value <= bound})
                    break
    return checks


def format_report(report):
    def num(x):
        return f"{x:.0f}" if x >= 100 else f"{x:.3g}"

    def span(s, unit):
        if unit == "MB":
            return f"{s['median']:.0f} MB"
        return f"{num(s['median'])} s [{num(s['min'])}–{num(s['max'])}]"

    m, cal = report["machine"], report["calibration"]
    lines = [f"drp.bench — {m['cpu']}, {m['threads']} threads, torch {m['torch']}, reference: {m['reference']}",
             f"device {report['settings']['device']}, dtype {report['settings']['dtype']}; matmul ceiling "
             f"{cal['fp32']:.0f} GFLOP/s fp32, {cal['dtype']:.0f} GFLOP/s in the compute dtype", ""]
    header = f"{'measurement':<46} {'ours':>24} {'reference':>24} {'ratio':>6} {'GFLOP/s ours/ref':>17} {'peak GB':>11}"
    lines += [header, "-" * len(header)]  # peak GB: of a process holding that one model set (ours/reference)
    for r in report["rows"]:
        unit = r.get("unit", "s")
        ref = span(r["ref"], unit) if "ref" in r else "—"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        gf = f"{r['ours']['gflop_s']:.0f}/{r['ref']['gflop_s']:.0f}" if "ref" in r and "gflops" in r else (
            f"{r['ours']['gflop_s']:.0f}" if "gflops" in r else "")
        peak = f"{r['peak_gb']:.2f}" if "peak_gb" in r else ""
        peak += f"/{r['ref_peak_gb']:.2f}" if r.get("ref_peak_gb") else ""
        lines.append(f"{r['name']:<46} {span(r['ours'], unit):>24} {ref:>24} {ratio:>6} {gf:>17} {peak:>11}")
        notes = [r["note"]] if r["note"] else []
        notes += [f"{k} {v:.2%}" for k, v in r.get("errors", {}).items()]
        notes += [f"first call {r['first_call_s']:.1f} s"] if "first_call_s" in r else []
        if notes:
            lines.append(f"{'':<4}({'; '.join(notes)})")
    if report["targets"]:
        lines += ["", "targets of the issue:"]
        for c in report["targets"]:
            verdict = "met    " if c["met"] else "MISSED "
            lines.append(f"  {verdict} {c['row']}: {c['what']} {c['value']:.2f} ≤ {c['bound']}")
    return "\n".join(lines)


def machine_info(reference):
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "reference": "none (diffusers not importable)"}
    if reference:
        import diffusers
        info["reference"] = f"diffusers {diffusers.__version__}"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m drp.bench", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512, help="image size in pixels (latents: size/8)")
    p.add_argument("--steps", type=int, default=2, help="steps run in the generations, at least 2 (extrapolated to 50)")
    p.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each call (after one warm-up)")
    p.add_argument("--quick", action="store_true", help="a run of a few minutes: 256 px (32×32 latents), 2 repeats")
    p.add_argument("--only", default=",".join(t for t in TASKS if t != "compile"),
                   help=f"comma-separated measurements among {','.join(TASKS)}")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile of the UNet")
    p.add_argument("--json", default="bench.json", help="where to write the report as JSON")
    p.add_argument("--workdir", help="keep the random weights folders here (default: a temporary folder)")
    p.add_argument("--no-reference", action="store_true", help="measure ours alone")
    p.add_argument("--tiny", action="store_true", help="tiny models instead of SD 1.5's shapes (for tests)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.repeats = 256, min(args.repeats, 2)
    args.only = [t.strip() for t in args.only.split(",") if t.strip()] + (["compile"] if args.compile else [])
    unknown = [t for t in args.only if t not in TASKS]
    if unknown:
        raise DrpError(f"unknown measurement {unknown[0]!r}; choose among {', '.join(TASKS)}.")
    if args.size % 8 or args.size < 64:
        raise DrpError(f"--size must be a multiple of 8 of at least 64 pixels, got {args.size}.")
    if args.steps < 2 or args.repeats < 1:  # 2 steps: the extrapolation needs a call after the first
        raise DrpError(f"--steps must be at least 2 and --repeats at least 1, got {args.steps} and {args.repeats}.")
    args.gen_repeats = 1 if args.quick or not args.tiny and args.size >= 512 else 2
    return args


def check_dtype_is_fast(args):
    """Refuses a half dtype the machine only emulates: a full-size run would take hours, not minutes."""
    from .devices import cpu_has_fast_bf16, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]  # "auto" made concrete
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16() and not args.tiny:
        raise DrpError("this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX), so PyTorch emulates it "
                       "10–100× slower than fp32; benchmark --dtype fp32 here, or bf16 on a CPU that has it.")
    return device


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1])
    try:
        args = parse_args(argv)
        device = check_dtype_is_fast(args)
        reference = has_reference() and not args.no_reference
        configs = ({"unet": UNetConfig.tiny(), "vae": VAEConfig.tiny(), "text_encoder": CLIPConfig.tiny()}
                   if args.tiny else {name: MODELS[name][1]() for name in MODELS})
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="drp-bench-"))
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            if not (workdir / "weights" / "model.json").is_file():
                print(f"writing random {'tiny' if args.tiny else 'SD 1.5'} weights into {workdir} …", flush=True)
                write_random_folders(workdir, configs)
            spec = {"weights": str(workdir / "weights"), "source": str(workdir / "diffusers"),
                    "device": str(device), "dtype": args.dtype, "size": args.size, "steps": args.steps,
                    "repeats": args.repeats, "tiny": args.tiny, "reference": reference,
                    "unet_sizes": sorted({32, args.size // 8})}
            measured = measure(args, spec, workdir, configs, lambda s: print(s, flush=True))
        finally:
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        report = {"machine": machine_info(reference), "settings": {k: v for k, v in vars(args).items() if k != "child"},
                  **measured, "targets": check_targets(measured["rows"], "fp32" if args.dtype == "fp32" else "half")}
        report["settings"]["device"] = str(device)
        print("\n" + format_report(report))
        tmp = Path(args.json).with_name(Path(args.json).name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, args.json)
        print(f"\nwritten to {args.json}")
    except DrpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
