"""From prompt to pixels: the sampling loop, with classifier-free guidance and DRP-Diff.

    prompt ──tokenizer──► ids ──text_encoder──► context (B, 77, 768)
    noise (B, 4, H/8, W/8) ──[UNet + guidance + DDIM step] × steps──► latent ──VAE decoder──► image

With reference images, DRP-Diff runs in one of two modes. Self-attention (`drp/dual_reference.py`): each
reference is first DDIM-inverted into a trajectory of latents; during sampling its latent at the
current step is *replayed* as extra rows of the same UNet batch, and an attention hook lets the
generated rows look at the references' self-attention keys/values. IP-Adapter
(`drp/dual_reference_ip.py`): the references become image tokens in every cross-attention, through
key matrices split by their singular values, and the early stage's text leaves the subject out.
Either way the method gives each step its extra rows, its text and its hook through one call,
`method.step_inputs(i, late, x_in, text)`; which stage a step is in is decided here, in the loop.
With an image prompt (IP-Adapter, `drp/ip_adapter.py`) and no references, one hook, the same at every
step, adds an attention over the picture's tokens to every cross-attention. `attention_maps=` wraps each
step's hook in a recorder that changes nothing (`drp/attention_maps.py`).

The loop's building blocks (text and image encoding, noise, decoding, DDIM inversion) are in
`drp/sampling.py`; the method is imported at the top, and imports only those blocks, never this file.

Follows CompVis/stable-diffusion scripts/txt2img.py and ldm/models/diffusion/ddim.py; its numbers
equal diffusers' StableDiffusionPipeline with a DDIMScheduler (tests/test_pipeline.py).
"""

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import ddim, dual_reference, dual_reference_ip, ip_adapter
from .attention_maps import AttentionMaps, check_names
from .errors import DrpError
from .images import to_pil
from .method_common import resolve_mode
from .sampling import check_settings, decode, encode_text, initial_latents


@dataclass
class Result:
    """What `generate` returns: the images, the final latents, and a report of every setting."""

    images: list  # PIL images
    latents: torch.Tensor  # (B, 4, H/8, W/8), scaled by LATENT_SCALE, float32
    info: dict  # settings, seeds, timings; the DRP-Diff numbers when references were given
    masks: dict = field(default_factory=dict)  # DRP-Diff masks (reference foregrounds, generated subject)
    attention_maps: dict = field(default_factory=dict)  # {name: {stage: (B, H/32, W/32)}} (drp/attention_maps.py)


def generate(sd, prompt, negative_prompt="", steps=50, guidance=7.5, height=512, width=512, seed=0, eta=0.0,
             latents=None, num_images=1, content=None, style=None, subject=None, content_mask=None,
             style_mask=None, switch_step=None, mode="auto", tiled_decode=False, progress=True, ip_image=None,
             ip_scale=0.6, attention_maps=None, **drp_options):
    """Text (and optionally reference images) -> `Result`.

    prompt: a string or a list (one image each); `num_images` images per prompt, image k with seed
    `seed + k`. `latents` overrides the initial noise. `content`/`style`/`subject`/masks/`switch_step`
    turn on DRP-Diff; `mode` picks how: "self-attention" (ALGORITHM.md, SD alone), "ip-adapter"
    (ALGORITHM_IP_ADAPTER.md, needs the converted IP-Adapter), or "auto" = "ip-adapter" when its weights
    are there (set on `sd`, or converted in its folder). Further DRP-Diff knobs are the mode's `Options`
    (drp/dual_reference.py, drp/dual_reference_ip.py), passed by name. `tiled_decode`: decode images
    larger than 512 px in overlapping 512-px tiles, so that the decoder's memory does not grow with the
    image (VAE.decode).
    `ip_image`: an image prompt (a picture, a path, or a list of them) through IP-Adapter, at `ip_scale`
    (a number, or per block: {"up_blocks.1": 1.0}; see ip_adapter.resolve_scale).
    `attention_maps`: words of the prompt, and "content"/"style" for the references given, whose attention
    maps `Result.attention_maps` then holds (drp/attention_maps.py defines them); the image is unchanged.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise DrpError("prompt must be a string or a list of strings.")
    if not isinstance(num_images, int) or num_images < 1:
        raise DrpError(f"num_images must be a whole number ≥ 1, got {num_images!r}.")
    check_settings(steps, guidance, height, width, eta)
    mode = resolve_mode(sd, mode, references=content is not None or style is not None)  # "auto": see there
    if ip_image is not None and (content is not None or style is not None):
        raise DrpError("ip_image cannot be combined with DRP-Diff's content/style references; give the "
                       "pictures as content= and style= (mode=\"ip-adapter\" puts them in the cross-attention).")
    prompts = [p for p in prompts for _ in range(num_images)]
    map_names = check_names(sd.tokenizer, prompts, attention_maps, content is not None, style is not None)
    negatives = [negative_prompt] * len(prompts)
    seeds = [seed + k for k in range(len(prompts))]
    batch, timings = len(prompts), {}
    shape = (1, 4, height // 8, width // 8)
    if latents is None:
        latents = initial_latents(seeds, shape)
    if tuple(latents.shape) != (batch, *shape[1:]):
        raise DrpError(f"latents must have shape {(batch, *shape[1:])} for these settings, got {tuple(latents.shape)}.")

    start = time.perf_counter()
    text = encode_text(sd, negatives + prompts)  # (2B, 77, C): unconditional rows first, then conditional
    timings["text"] = time.perf_counter() - start

    # IP-Adapter: the image prompt's tokens, which a hook adds to every cross-attention.
    image_prompt = None
    if ip_image is not None:
        start = time.perf_counter()
        image_prompt = ip_adapter.image_prompt(sd, ip_image, ip_scale, batch)
        timings["image_prompt"] = time.perf_counter() - start

    # DRP-Diff: prepare the references and pick the switch step. Self-attention mode: invert them (or read
    # the cache) and find their masks; IP-Adapter mode: encode them into image tokens and split the keys.
    if mode == "ip-adapter":
        method = dual_reference_ip.prepare(sd, prompts, content=content, style=style, subject=subject,
                                           content_mask=content_mask, style_mask=style_mask, switch_step=switch_step,
                                           steps=steps, progress=progress, timings=timings, **drp_options)
    else:
        method = dual_reference.prepare(sd, prompts, content=content, style=style, subject=subject,
                                        content_mask=content_mask, style_mask=style_mask, switch_step=switch_step,
                                        steps=steps, height=height, width=width, progress=progress,
                                        timings=timings, **drp_options)

    recorder = AttentionMaps(sd, prompts, map_names, method, height, width) if map_names else None

    start = time.perf_counter()
    alphas = ddim.alphas_cumprod().to(sd.device)
    # η > 0: each image draws its step noise from its own generator, so image k equals a run with seed + k
    generators = [torch.Generator().manual_seed(s) for s in seeds] if eta > 0 else []
    x = latents.to(sd.device, torch.float32)
    for i, (t, t_prev) in enumerate(tqdm(ddim.ddim_pairs(steps), desc="sampling", disable=not progress)):
        x_in, context, hook = torch.cat([x, x]), text, image_prompt  # the image prompt's hook, or None
        late = method is not None and i >= method.switch_step  # DRP-Diff's stage: early, then late
        if method is not None:  # this step's stage decides the method's extra rows, text and attention hook
            x_in, context, hook = method.step_inputs(i, late, x_in, context)
        if recorder is not None:  # attention maps: the step's hook, watched; its output is untouched
            hook = recorder.hook(late, hook)
        with torch.no_grad():
            eps = sd.unet(x_in.to(sd.dtype), t, context, hook)[: 2 * batch].float()
        eps_uncond, eps_text = eps.chunk(2)
        eps = eps_uncond + guidance * (eps_text - eps_uncond)  # classifier-free guidance
        noise = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(x.device) if eta > 0 else None
        x = ddim.ddim_step(x, eps, t, t_prev, alphas, eta=eta, noise=noise)
    timings["sampling"] = time.perf_counter() - start

    start = time.perf_counter()
    images = to_pil(decode(sd, x, tiled=tiled_decode))
    timings["decoding"] = time.perf_counter() - start

    info = dict(prompt=prompts, negative_prompt=negative_prompt, steps=steps, guidance=guidance, height=height,
                width=width, seed=seed, seeds=seeds, eta=eta, num_images=num_images, sampler="DDIM",
                tiled_decode=tiled_decode,
                model=(sd.source or {}).get("file", "unknown"), device=str(sd.device),
                dtype=str(sd.dtype).replace("torch.", ""), timings=timings)
    masks = {}
    if image_prompt is not None:
        info["ip_adapter"] = ip_adapter.report(sd, ip_image, ip_scale)
    if method is not None:
        info["drp"] = {"mode": mode, **method.report()}
        masks = method.masks()
    return Result(images, x.cpu(), info, masks, recorder.result() if recorder is not None else {})
