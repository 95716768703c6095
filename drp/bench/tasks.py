"""What runs inside a child process of `python -m drp.bench`: one measurement per fresh process.

drp/bench.py writes the random weights (`write_random_folders`, here) and then starts
`python -m drp.bench_tasks SPEC` once per measurement: `child_main` runs the task the JSON spec names
and writes its result, with the process's peak memory, as JSON to the spec's `out` file. Also here:
the reference (diffusers) models and pipeline, and the timing helpers.
"""

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model_io import MODELS, build_on_meta

STEPS = 50  # every generation figure is extrapolated to SD's usual 50 DDIM steps
PROMPT = "a cat sitting on a bench, in the style of a painting"
ASSETS = Path(__file__).resolve().parents[2] / "assets"


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
    from ..convert import FOLDER_FILES, convert

    source, weights = Path(workdir) / "diffusers", Path(workdir) / "weights"
    for i, (component, config) in enumerate(folder_configs(configs).items()):
        folder = source / component
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(seed * 10 + i)
        shapes = {k: tuple(v.shape) for k, v in build_on_meta(component, configs[component]).state_dict().items()}
        tensors = {k: random_tensor(k, s, generator).half() for k, s in sorted(shapes.items())}
        file = folder / FOLDER_FILES[component][0]  # the plain file of a diffusers folder
        save_file(tensors, str(file) + ".tmp", metadata={"format": "pt"})
        os.replace(str(file) + ".tmp", file)
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
                owner.register_buffer("position_ids", torch.arange(buffer.shape[-1], device=spec["device"])[None],
                                      persistent=False)
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

    from ..tokenizer import DEFAULT_VOCAB, NUM_MERGES, bytes_to_unicode

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
    from ..model_io import load

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
    """The dual-reference generation twice with one cache folder: inverting the references, then cached."""
    from PIL import Image

    from ..pipeline import generate

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


def task_drp_ip(spec, device, dtype):  # DRP-Diff's IP-Adapter mode has its own file
    from .drp_ip import task_drp_ip

    return task_drp_ip(spec, device, dtype)


def task_drp_ip_first(spec, device, dtype):
    from .drp_ip import task_drp_ip_first

    return task_drp_ip_first(spec, device, dtype)


TASK_FUNCTIONS = {"calibrate": task_calibrate, "unet": task_unet, "vae": task_vae, "text": task_text,
                  "attention": task_attention, "generate": task_generate, "drp": task_drp, "load": task_load,
                  "compile": task_compile, "drp-ip": task_drp_ip, "drp-ip-first": task_drp_ip_first}


def task_function(name):
    """The task `name`; IP-Adapter's are in drp/bench_ip_adapter.py."""
    if name.startswith("ip-"):
        from .ip_adapter import TASKS

        return TASKS[name]
    return TASK_FUNCTIONS[name]


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
