"""`python -m drp.bench`: drp against diffusers on random full-size SD 1.5 weights — speed, memory, loading.

Nothing is downloaded. The benchmark writes a random fp16 diffusers folder with SD 1.5's shapes into a
temporary directory, converts it into a drp weights folder with `drp.convert`, and then runs every
measurement in a fresh child process, `python -m drp.bench.child` (so that the child's peak resident
memory belongs to that measurement alone). Inside a child, ours and the reference
(diffusers, if importable) hold the *same* tensors and are called alternately, so a machine shared
with other work slows both alike.

    unet        UNet forward, batch 2 (one classifier-free-guidance step), at 32×32 and size/8 latents;
                the dual-reference step (batch 4 with DRP-Diff's hook, early and late stage)
    vae         VAE encode and decode of one size×size image
    text        the text encoder on 2 prompts
    attention   extra peak memory of one 4,096-token self-attention: fused kernel vs explicit softmax
    generate    a whole plain generation: a few steps run, extrapolated to 50 (text + 50 × step + decode)
    drp         the dual-reference generation, first run (inverting both references) and cached rerun
    load        loading the fp16 files (CPU: for fp32 compute; GPU: in the compute dtype): drp.load vs
                diffusers' from_pretrained, all three models held; at most 3 rounds, each a process;
                warm (files in the page cache), then cold (dropped from it first; Linux, not tmpfs)
    compile     torch.compile of our UNet at 32×32: first-call cost and speed-up (only with --compile)
    ip-adapter  IP-Adapter: image encoder forward, the CFG step with the adapter and its share, loading the
                encoder (only with --only ip-adapter; drp/bench/ip_adapter.py)
    drp-ip      DRP-Diff's IP-Adapter mode (drp/bench/drp_ip.py): its step vs a plain CFG step, the 16 SVDs
    drp-ip-first  its first run vs the self-attention mode's first run (with a random ViT-H/14 encoder,
                2.5 GB more in fp32); both only with --only drp-ip,drp-ip-first
    maps        recording attention maps (two words, both references) in each mode and stage: the step with
                the recorder vs without, and its peak memory (only with --only maps; drp/bench/maps.py)

Extrapolation: a child times every UNet call with forward hooks; everything the UNet does scales with the
number of steps and nothing else does, so total(50) = total(k) + unet_time(k) × (50/k − 1).
Achieved GFLOP/s count the model's FLOPs once with `torch.utils.flop_counter` on the meta device, and
are set against a large matrix multiply measured on the same machine in the same run.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..clip import CLIPConfig
from ..errors import DrpError
from ..files import write_atomically
from ..model_io import MODELS, build_on_meta
from ..unet import UNetConfig
from ..vae import VAEConfig
from .timing import STEPS, cold_start_possible
from .weights import write_random_folders

TASKS = ["unet", "vae", "text", "attention", "generate", "drp", "load", "compile", "ip-adapter", "drp-ip",
         "drp-ip-first", "maps"]
OPT_IN = ("compile", "ip-adapter", "drp-ip", "drp-ip-first", "maps")  # measured only when asked for (--compile, --only …)


# ---- the parent: plan, run the children one at a time, report -----------------------------------------

def run_child(task, spec, workdir, **extra):
    """Runs one task in a fresh Python process; its result dict (DrpError if it failed)."""
    out = Path(workdir) / f"result-{task}-{extra.get('impl', '')}.json"
    spec = dict(spec, task=task, out=str(out), **extra)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "drp.bench.child", json.dumps(spec)], env=env,
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
        name = "_".join([task, *([extra["impl"]] if "impl" in extra else []), *(["cold"] if extra.get("cold") else [])])
        say(f"  measuring {name.replace('_', ' ')} …")
        raw[name] = result = run_child(task, spec, workdir, **extra)
        return result

    on_gpu = spec["device"].startswith("cuda")
    ref_dtype = spec["dtype"] if on_gpu else "fp32"  # on the CPU, the issue's targets compare with fp32
    peak_key = "peak_cuda_gib" if on_gpu else "peak_rss_gib"

    def ours_then_reference(task, repeats, value, **extra):
        """Children for ours and the reference in turn, `repeats` rounds: their values and peak memory."""
        runs, peaks = {"ours": [], "ref": []}, {"ours": [], "ref": []}
        for _ in range(repeats):
            for impl in (["ours", "ref"] if ref_name else ["ours"]):
                result = child(task, impl=impl, **extra, **({"dtype": ref_dtype} if impl == "ref" else {}))
                runs[impl].append(result[value])
                peaks[impl].append(result[peak_key])
        peak = dict(peak_gib=max(peaks["ours"]), ref_peak_gib=max(peaks["ref"], default=None))
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
    if "generate" in tasks:  # CPU: vs diffusers fp32, as the issue's targets; GPU: the same dtype
        ours, ref, peaks = ours_then_reference("generate", args.gen_repeats, "extrapolated")
        rows.append(row(f"generation {px}×{px}, {STEPS} steps", ours, ref,
                        note=f"{spec['steps']} steps run, extrapolated; vs diffusers {ref_dtype}", **peaks))
    if "drp" in tasks:
        result = child("drp")
        rows.append(row(f"DRP generation {px}×{px}, {STEPS} steps: first run", result["first"]["extrapolated"],
                        note=f"{spec['steps']} steps run, extrapolated; both references inverted",
                        peak_gib=result[peak_key]))
        rows.append(row("DRP generation: cached rerun / first run", result["cached"]["extrapolated"],
                        result["first"]["extrapolated"], note="inversions read from the cache"))
    if "load" in tasks:  # a process per run; cold where the files can be dropped from the page cache (Linux)
        for cold in (False, True):
            if cold and not cold_start_possible([spec["weights"], spec["source"]]):  # each child drops them again
                say("  cold load not measured: the files cannot be dropped from the page cache here (e.g. tmpfs)")
                break
            ours, ref, peaks = ours_then_reference("load", min(args.repeats, 3), "seconds", cold=cold)
            rows.append(row(f"{'cold ' if cold else ''}load fp16 files for {ref_dtype} compute", ours, ref,
                            note="files dropped from the page cache first" if cold else "warm page cache", **peaks))
    if "ip-adapter" in tasks:
        from . import ip_adapter

        rows += ip_adapter.measure(spec, child, ours_then_reference, row, args.repeats)
    if "drp-ip" in tasks or "drp-ip-first" in tasks:
        from .drp_ip import rows as drp_ip_rows

        step = child("drp-ip") if "drp-ip" in tasks else None
        first = child("drp-ip-first") if "drp-ip-first" in tasks else None
        rows += drp_ip_rows(step, first, spec, row)
    if "maps" in tasks:
        from .maps import rows as maps_rows

        rows += maps_rows(child("maps"), spec, row)
    if "compile" in tasks:
        result = child("compile")
        t = result["times"]
        rows.append(row("torch.compile UNet 32×32: compiled / eager", t["compiled"], t["eager"],
                        flops.get("unet32"), first_call_s=result["first_call"]))
    return {"calibration": cal, "rows": rows, "raw": raw}


TARGETS = [  # (row name prefix, what, bound, when) from the issue; checked where the row was measured.
    # "fp32" and "half" are the issue's CPU targets (fp32, bf16); "any" holds on every device and dtype.
    ("UNet 64×64, batch 2", "ratio", 1.0, "fp32"), ("UNet 64×64, batch 2", "ratio", 0.5, "half"),
    ("UNet 64×64, batch 2, vs diffusers", "ratio", 0.85, "half"), ("UNet 32×32, batch 2", "ratio", 0.5, "half"),
    ("generation", "ratio", 0.55, "half"), ("generation", "peak", 0.6, "half"),
    ("load", "ratio", 1.0, "any"), ("load", "peak", 0.8, "any"), ("cold load", "ratio", 1.0, "any"),
    ("DRP step 64×64 (late)", "ratio", 2.2, "any"), ("DRP step 64×64 (early)", "ratio", 2.2, "any"),
    ("DRP generation: cached", "ratio", 0.75, "any"),
    ("DRP-IP step 64×64 (early)", "ratio", 1.15, "any"), ("DRP-IP step 64×64 (late)", "ratio", 1.15, "any"),
    *[(f"attention maps 64×64, {mode} ({stage})", "ratio", 1.10, "any") for mode in ("ip-adapter", "self-attention")
      for stage in ("early", "late")],
]


def check_targets(rows, dtype, device):
    checks = []
    for prefix, what, bound, when in TARGETS:
        if when != "any" and (device != "cpu" or (when == "fp32") != (dtype == "fp32")):
            continue
        for r in rows:
            if r["name"].startswith(prefix) and (prefix.endswith("diffusers") or "vs diffusers " not in r["name"]):
                value = r.get("ratio") if what == "ratio" else (
                    r["peak_gib"] / r["ref_peak_gib"] if r.get("ref_peak_gib") else None)
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
    on_gpu = report["settings"]["device"].startswith("cuda")
    gpu = f"{m['gpu']}, " if "gpu" in m and on_gpu else ""
    lines = [f"drp.bench — {gpu}{m['cpu']} ({m['cpu_capability']}), {m['threads']} threads, torch {m['torch']}, "
             f"reference: {m['reference']}",
             f"device {report['settings']['device']}, dtype {report['settings']['dtype']}; matmul ceiling "
             f"{cal['fp32']:.0f} GFLOP/s fp32, {cal['dtype']:.0f} GFLOP/s in the compute dtype", ""]
    header = (f"{'measurement':<46} {'ours':>24} {'reference':>24} {'ratio':>6} {'GFLOP/s ours/ref':>17} "
              f"{'peak GiB':>11}")
    lines += [header, "-" * len(header)]  # peak GiB: of a process holding that one model set (ours/reference)
    if on_gpu:
        lines.insert(-2, "peak GiB: GPU memory allocated (torch.cuda.max_memory_allocated)")
    for r in report["rows"]:
        unit = r.get("unit", "s")
        ref = span(r["ref"], unit) if "ref" in r else "—"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        gf = f"{r['ours']['gflop_s']:.0f}/{r['ref']['gflop_s']:.0f}" if "ref" in r and "gflops" in r else (
            f"{r['ours']['gflop_s']:.0f}" if "gflops" in r else "")
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else ""
        peak += f"/{r['ref_peak_gib']:.2f}" if r.get("ref_peak_gib") else ""
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


def has_reference():
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


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
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "reference": "none (--no-reference)" if has_reference() else "none (diffusers not importable)"}
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
    p.add_argument("--only", default=",".join(t for t in TASKS if t not in OPT_IN),
                   help=f"comma-separated measurements among {','.join(TASKS)}")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile of the UNet")
    p.add_argument("--json", default="bench.json", help="where to write the report as JSON")
    p.add_argument("--workdir", help="keep the random weights folders here (default: a temporary folder)")
    p.add_argument("--no-reference", action="store_true", help="measure ours alone")
    p.add_argument("--tiny", action="store_true", help="tiny models instead of SD 1.5's shapes (for tests)")
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
    from ..devices import DTYPES, cpu_has_fast_bf16, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    args.dtype = {t: name for name, t in DTYPES.items()}[dtype]  # "auto" made concrete
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16() and not args.tiny:
        raise DrpError("this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX), so PyTorch emulates it "
                       "10–100× slower than fp32; benchmark --dtype fp32 here, or bf16 on a CPU that has it.")
    return device


def main(argv=None):
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
            if "ip-adapter" in args.only and not (workdir / "weights" / "image_encoder.json").is_file():
                from .ip_adapter import write_random_ip_files

                print("writing a random IP-Adapter and image encoder …", flush=True)
                write_random_ip_files(workdir, configs["unet"], args.tiny)
            spec = {"weights": str(workdir / "weights"), "source": str(workdir / "diffusers"),
                    "device": str(device), "dtype": args.dtype, "size": args.size, "steps": args.steps,
                    "repeats": args.repeats, "tiny": args.tiny, "reference": reference,
                    "ip_source": str(workdir / "ip-source"),
                    "unet_sizes": sorted({32, args.size // 8})}
            measured = measure(args, spec, workdir, configs, lambda s: print(s, flush=True))
        finally:
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        report = {"machine": machine_info(reference), "settings": dict(vars(args)),
                  **measured, "targets": check_targets(measured["rows"], args.dtype, device.type)}
        report["settings"]["device"] = str(device)
        print("\n" + format_report(report))
        text = json.dumps(report, indent=2) + "\n"
        write_atomically(args.json, lambda tmp: tmp.write_text(text), "give --json a writable path.")
        print(f"\nwritten to {args.json}")
    except DrpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
