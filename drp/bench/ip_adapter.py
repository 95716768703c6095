"""`python -m drp.bench --only ip-adapter`: IP-Adapter's cost next to diffusers/transformers, on random weights.

Part of drp/bench/ (run.py writes the SD folders and runs each measurement in a fresh child process).
This file writes a random IP-Adapter file (ip-adapter_sd15 layout, fp16) and an image-encoder folder
(the h94 `models/image_encoder` layout with the ViT-H/14 config, fp16 to match the SD files), converts
both into the weights folder, and holds the three child tasks:

    ip-encoder  the image encoder's forward on 1 picture of 224², ours vs transformers (same tensors)
    ip-step     one CFG UNet step (batch 2) at size/8 latents with the adapter's hook, ours vs diffusers'
                UNet after `_load_ip_adapter_weights` (same tensors); and each one's plain step, for the
                adapter's share of a step
    ip-load     loading the encoder for fp32 compute (CPU) or the compute dtype (GPU): drp's lazy
                `sd.image_encoder` vs transformers' `from_pretrained`; time and the process's peak memory
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..ip_adapter import IPAdapter, IPAdapterConfig, attn2_layers, file_index
from ..model_io import build_module_on_meta, load, load_ip_component
from ..vision import VisionConfig, VisionTransformer
from .timing import alternate, clock, rel_error
from .weights import random_tensor, reference_models

H14 = {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model", "hidden_act": "gelu",
       "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
       "patch_size": 14, "image_size": 224, "projection_dim": 1024, "layer_norm_eps": 1e-5, "num_channels": 3}


def encoder_json(cfg: VisionConfig):
    """transformers' config.json of a CLIP image tower of our config (for the tiny benchmark)."""
    return {**H14, "hidden_size": cfg.dim, "intermediate_size": cfg.mlp_dim, "num_attention_heads": cfg.heads,
            "num_hidden_layers": cfg.layers, "patch_size": cfg.patch_size, "projection_dim": cfg.projection_dim}


def write_random_ip_files(workdir, unet_cfg, tiny, seed=0):
    """Random h94-layout files in `workdir`/ip-source, converted into `workdir`/weights; returns the source."""
    from ..convert import convert

    source = Path(workdir) / "ip-source"
    encoder_cfg = VisionConfig.tiny() if tiny else VisionConfig.vit_h14()
    adapter_cfg = IPAdapterConfig(image_dim=encoder_cfg.projection_dim, context_dim=unet_cfg.context_dim,
                                  layers=tuple(attn2_layers(unet_cfg).items()))
    number = {name: i for i, name in file_index([n for n, _ in adapter_cfg.layers]).items()}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, t in sorted(build_module_on_meta(IPAdapter, adapter_cfg).state_dict().items()):
        if key.startswith("ip_adapter."):  # ours by attn2 name -> the file's number
            name, _, leaf = key[len("ip_adapter."):].rpartition(".to_")
            key = f"ip_adapter.{number[name]}.to_{leaf}"
        tensors[key] = random_tensor(key, tuple(t.shape), g).half()
    (source / "image_encoder").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(source / "ip-adapter_sd15.safetensors"))
    encoder = {k: random_tensor(k, tuple(t.shape), g).half()
               for k, t in sorted(build_module_on_meta(VisionTransformer, encoder_cfg).state_dict().items())}
    save_file(encoder, str(source / "image_encoder" / "model.safetensors"), metadata={"format": "pt"})
    (source / "image_encoder" / "config.json").write_text(json.dumps(encoder_json(encoder_cfg), indent=2))
    del encoder
    weights = Path(workdir) / "weights"
    for name in ("ip_adapter", "image_encoder"):  # a rerun with --workdir replaces what an earlier one wrote
        for suffix in (".json", ".safetensors"):
            (weights / f"{name}{suffix}").unlink(missing_ok=True)
    convert(source / "ip-adapter_sd15.safetensors", weights, dtype="fp16", progress=False)
    convert(source / "image_encoder", weights, dtype="fp16", progress=False)
    return source


def reference_encoder(spec, dtype):
    """transformers' CLIPVisionModelWithProjection holding our converted encoder's tensors."""
    from safetensors import safe_open
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = json.loads((Path(spec["ip_source"]) / "image_encoder" / "config.json").read_text())
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    with safe_open(str(Path(spec["weights"]) / "image_encoder.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k).to(spec["device"], dtype) for k in f.keys()}
    model.load_state_dict(state, assign=True, strict=False)
    for key, buffer in list(model.named_buffers()):  # position_ids: not in the file
        if buffer.is_meta:
            owner = model.get_submodule(key.rsplit(".", 1)[0])
            owner.register_buffer(key.rsplit(".", 1)[1], torch.arange(buffer.shape[-1], device=spec["device"])[None],
                                  persistent=False)
    return model.eval().requires_grad_(False)


def task_ip_encoder(spec, device, dtype):
    """The encoder on one 224² picture: ours vs transformers, alternately; their largest relative difference."""
    encoder = load_ip_component("image_encoder", spec["weights"], None, device, dtype)
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    calls = {"ours": lambda: encoder(pixels)}
    if spec["reference"]:
        ref = reference_encoder(spec, dtype)
        calls["ref"] = lambda: ref(pixel_values=pixels, output_hidden_states=True)
    times = alternate(calls, device, spec["repeats"])
    errors = {}
    if spec["reference"]:
        with torch.no_grad():
            got, want = encoder(pixels), ref(pixel_values=pixels, output_hidden_states=True)
        errors = {"image_embeds": rel_error(got.image_embeds, want.image_embeds),
                  "hidden_states[-2]": rel_error(got.penultimate, want.hidden_states[-2])}
    return {"times": times, "errors": errors}


def task_ip_step(spec, device, dtype):
    """One CFG step (batch 2) at size/8 with the image prompt, and without: ours vs diffusers."""
    from ..ip_adapter import DecoupledCrossAttention, ImageGroup

    sd = load(spec["weights"], device=spec["device"], dtype=dtype)
    adapter = sd.ip_adapter  # the encoder is not needed here, so it is not read
    s = spec["size"] // 8
    g = torch.Generator().manual_seed(s)
    x = torch.randn(2, 4, s, s, generator=g).to(device, dtype)
    context = torch.randn(2, 77, sd.unet.cfg.context_dim, generator=g).to(device, dtype)
    embeds = torch.randn(1, adapter.cfg.image_dim, generator=g).to(device, dtype)
    with torch.no_grad():  # the tokens are made once per generation, before the steps
        tokens = torch.cat([adapter.image_proj(torch.zeros_like(embeds)), adapter.image_proj(embeds)])
    hook = DecoupledCrossAttention(adapter, [ImageGroup(tokens, 0.6)])
    calls = {"ours_plain": lambda: sd.unet(x, 500, context), "ours_ip": lambda: sd.unet(x, 500, context, hook)}
    errors = {}
    if spec["reference"]:
        from safetensors import safe_open

        unet = reference_models(spec, dtype, ["unet"])["unet"]
        plain_processors = dict(unet.attn_processors)
        with safe_open(str(Path(spec["ip_source"]) / "ip-adapter_sd15.safetensors"), framework="pt") as f:
            state = {"image_proj": {}, "ip_adapter": {}}
            for k in f.keys():
                part, _, rest = k.partition(".")
                state[part][rest] = f.get_tensor(k).to(device, dtype)
        unet._load_ip_adapter_weights([state])  # adds the image projection and IP attention processors
        ip_processors, projection = dict(unet.attn_processors), unet.encoder_hid_proj
        for p in ip_processors.values():
            if hasattr(p, "scale"):
                p.scale = [0.6]
        image_embeds = [torch.cat([torch.zeros_like(embeds), embeds])[:, None]]  # (2, 1 picture, 1024)

        def reference(ip):  # diffusers' UNet with and without the adapter: processors and projection swapped
            unet.set_attn_processor(dict(ip_processors if ip else plain_processors))  # it empties the dict
            unet.encoder_hid_proj = projection if ip else None
            kwargs = {"added_cond_kwargs": {"image_embeds": image_embeds}} if ip else {}
            return unet(x, 500, encoder_hidden_states=context, **kwargs).sample

        calls.update({"ref_plain": lambda: reference(False), "ref_ip": lambda: reference(True)})
        with torch.no_grad():
            errors = {"ours_vs_ref": rel_error(calls["ours_ip"](), reference(True))}
    return {"times": alternate(calls, device, spec["repeats"]), "errors": errors}


def task_ip_load(spec, device, dtype):
    """Seconds to load the image encoder (ours: converted fp16 file; transformers: the h94 folder)."""
    dtype = dtype if device.type == "cuda" else torch.float32
    if spec["impl"] != "ours":
        from transformers import CLIPVisionModelWithProjection  # imported before the clock starts
    start = clock(device)
    if spec["impl"] == "ours":
        held = load_ip_component("image_encoder", spec["weights"], None, device, dtype)
    else:
        held = CLIPVisionModelWithProjection.from_pretrained(Path(spec["ip_source"]) / "image_encoder",
                                                             dtype=dtype).to(device)
    seconds = clock(device) - start
    del held
    return {"seconds": seconds}


TASKS = {"ip-encoder": task_ip_encoder, "ip-step": task_ip_step, "ip-load": task_ip_load}


def measure(spec, child, ours_then_reference, row, repeats):
    """The report's rows of `--only ip-adapter` (see drp/bench/run.py measure for `child` and the rest)."""
    rows = []
    result = child("ip-encoder")
    t = result["times"]
    rows.append(row("IP-Adapter image encoder, 1 image 224²", t["ours"], t.get("ref"), errors=result["errors"]))
    result = child("ip-step")
    t, s = result["times"], spec["size"] // 8
    rows.append(row(f"IP-Adapter CFG step {s}×{s}, batch 2", t["ours_ip"], t.get("ref_ip"), errors=result["errors"]))
    rows.append(row("  its adapter share: IP step / plain step, ours", t["ours_ip"], t["ours_plain"],
                    note="the ratio − 1 is the adapter's share of the step"))
    if "ref_ip" in t:
        rows.append(row("  its adapter share: IP step / plain step, diffusers", t["ref_ip"], t["ref_plain"]))
    ours, ref, peaks = ours_then_reference("ip-load", min(repeats, 3), "seconds")
    rows.append(row("IP-Adapter image encoder: load fp16 file", ours, ref, note="vs transformers from_pretrained",
                    **peaks))
    return rows
