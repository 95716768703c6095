"""DRP-Diff on IP-Adapter: the paper-faithful mode (ALGORITHM_IP_ADAPTER.md part B).

The paper builds DRP-Diff on IP-Adapter: the two references enter the UNet's *cross-attention* as
image tokens (`drp/ip_adapter.py`), and foreground is told from background not by masks but by the
spectrum of the adapter's image-key projection (`drp/svd_keys.py`): large singular directions carry
the subject's texture (W_fg), a 1/σ re-weighting brings out the background (W̄). With C_cu, C_st the
references' image tokens, every attn2 layer adds one image softmax to the text's:

    stage               image tokens, one softmax             text of the conditional row
    early (i < N_e)     [C_cu · W_fgᵀ ; C_st · W_fgᵀ]          C_bg  (the prompt without the subject's words)
    late  (i ≥ N_e)     [C_cu · W_fgᵀ ; C_st · W̄ᵀ]            C_te  (the full prompt)

so early on both references lend only their foreground texture while the background follows a prompt
that does not name the subject; late, the style reference's background (its brushwork) comes in
through W̄ while the full prompt puts the subject back. N_e comes from the references' entropies as
in the self-attention mode (`drp/method_common.py`, ALGORITHM.md §4). Content only: [C_cu W_fgᵀ] in
both stages; style only: [C_st W_fgᵀ] then [C_st W̄ᵀ] with C_te throughout; `late="style-only"` drops
C_cu from the late group. The unconditional rows see the unconditional image tokens through the same
matrices, and the negative prompt.

Values (`to_v_ip`) are the adapter's: the early stage is blind to the references' background in which
token a query attends to, not in what that token carries. The ablation `filter_values` gives the early
stage's values `W_v (I − V_bg V_bgᵀ)` as well (B1; V_bg the directions W_fg leaves out), so that its
output ignores the background directions too; the late stage keeps W_v.

Cost: no extra UNet rows (batch 2 under CFG); one encoder pass for the references; the 16 SVDs once per
loaded adapter. Nothing is stored on the model: the hooks live as long as one `generate` call.
"""

import math
import re
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import entropy, svd_keys
from .errors import DrpError
from .images import load_image
from .ip_adapter import DecoupledCrossAttention, resolve_scale
from .method_common import (check_switch_step, entropy_switch, make_options, reference_name, resolve_mode,
                            subject_tokens)
from .sampling import encode_text
from .unet import under
from .vision import clip_pixels

LATE_GROUPS = ("both", "style-only")


@dataclass(frozen=True)
class Options:
    """The knobs of DRP-Diff on IP-Adapter; the defaults are ALGORITHM_IP_ADAPTER.md's."""

    rank_energy: float = 0.5  # W_fg keeps the leading directions holding this share of Σσ²
    rank_rule: str = "energy"  # or "gd": the Gavish–Donoho threshold instead of the energy share
    floor: float = 0.05  # ε: W̄'s re-weighting treats σ below ε·σ_1 as ε·σ_1
    power: float = 2  # p: W̄'s weights σ·σ^(−p); 2 = 1/σ, 1 = the polar factor, 0 = W
    scale_early: object = 0.6  # image-attention scale of the early stage (a number, or {block: number})
    scale_late: object = 0.6  # and of the late stage
    bg_prompt: bool = True  # the early stage's conditional text is C_bg (False: the full prompt throughout)
    bg_placeholder: str = ""  # what replaces the subject's words in C_bg
    late: str = "both"  # the late group: "both" = [C_cu W_fg ; C_st W̄], "style-only" = [C_st W̄]
    ip_layers: object = None  # attn2 layers or blocks with image attention (None: all 16): a list, or "a,b"
    fixed_switch: bool = False  # ablation: α = 0.5 whatever the entropies
    filter_values: bool = False  # ablation: the early stage's values through W_v (I − V_bg V_bgᵀ) as well


@dataclass
class Part:
    """Some image tokens and the key matrices they go through: one reference in one stage."""

    tokens: torch.Tensor  # (rows, T, 768): unconditional rows first, then conditional
    key_weights: dict  # {attn2 name: (width, 768)}
    value_weights: dict = None  # {attn2 name: (width, 768)}, or None: the adapter's to_v_ip
    kind: str = ""  # "content" or "style": whose tokens these are


@dataclass
class Group:
    """The parts that share one image softmax, with its scale per layer."""

    parts: list
    scale: dict  # {attn2 name: float}

    def scale_at(self, name):
        return self.scale.get(name, 0.0)


class StageAttention(DecoupledCrossAttention):
    """IP-Adapter's decoupled cross-attention, where tokens of one softmax may have different key matrices.

    One instance serves every step of a stage: the image keys and values of each layer are computed at
    its first step and reused, since the tokens and matrices stay the same.
    """

    def keys_values(self, attn, g, name, dtype):
        if (g, name) not in self._keys_values:
            parts, w_v = self.groups[g].parts, self.adapter.value_weight(name)
            k = torch.cat([F.linear(p.tokens.to(dtype), p.key_weights[name].to(dtype)) for p in parts], dim=1)
            v = torch.cat([F.linear(p.tokens.to(dtype), (p.value_weights or {}).get(name, w_v).to(dtype))
                           for p in parts], dim=1)  # (rows, ΣT, width)
            self._keys_values[(g, name)] = attn.split_heads(k), attn.split_heads(v)  # (rows, h, ΣT, d)
        return self._keys_values[(g, name)]

    def labels(self, g):
        """{"content"/"style": slice of the image tokens of group g}: the parts side by side, in order."""
        spans, start = {}, 0
        for p in self.groups[g].parts:
            spans[p.kind] = slice(start, start + p.tokens.shape[1])
            start += p.tokens.shape[1]
        return spans


def background_prompt(prompt, subject, placeholder=""):
    """C_bg as text: the prompt with the subject's words (any case, whole words) replaced by `placeholder`."""
    words = r"\s+".join(re.escape(w) for w in subject.split())
    text = re.sub(rf"(?<!\w){words}(?!\w)", placeholder, prompt, flags=re.IGNORECASE)
    return " ".join(text.split())


def wanted_layers(ip_layers):
    """`ip_layers` as a list of names (None: all layers); "a, b" is split at the commas."""
    if ip_layers is None:
        return None
    if isinstance(ip_layers, str):
        wanted = [w.strip() for w in ip_layers.split(",") if w.strip()]
    elif isinstance(ip_layers, (list, tuple)) and all(isinstance(w, str) for w in ip_layers):
        wanted = [w.strip() for w in ip_layers]
    else:
        raise DrpError(f"ip_layers must be a list of block or layer names (or one string, comma-separated), "
                       f"got {ip_layers!r}.")
    if not wanted or not all(wanted):
        raise DrpError(f"ip_layers {ip_layers!r} names no layer, which would leave no image attention; name blocks "
                       "such as up_blocks.1, or leave it unset (None) for every attn2 layer.")
    return wanted


def chosen_layers(layer_names, ip_layers):
    """The attn2 names that get image attention: all of `layer_names`, or those under the names in `ip_layers`."""
    wanted = wanted_layers(ip_layers)
    if wanted is None:
        return list(layer_names)
    for w in wanted:
        if not any(under(n, w) for n in layer_names):
            raise DrpError(f"ip_layers names {w!r}, which is no attn2 layer or block of the adapter; "
                           f"use block names such as up_blocks.1, or leave it unset for all {len(layer_names)}.")
    return [n for n in layer_names if any(under(n, w) for w in wanted)]


def check_scale(knob, scale, wanted, layer_names=None):
    """A stage's scale: a number ≥ 0, or {block: number ≥ 0} naming blocks that have image attention."""
    def good(v):
        return svd_keys.is_number(v) and math.isfinite(v) and v >= 0

    if svd_keys.is_number(scale) or not isinstance(scale, dict):
        if not good(scale):
            raise DrpError(f"{knob} must be a finite number ≥ 0 (0.6 is the default) or a dict of block names to "
                           f"such numbers, got {scale!r}.")
        return
    for block, v in scale.items():
        if not isinstance(block, str) or not good(v):
            raise DrpError(f"{knob} must map block names to finite numbers ≥ 0, got {block!r}: {v!r}.")
        if wanted is not None and not any(under(block, w) or under(w, block) for w in wanted):
            raise DrpError(f"{knob} names {block!r}, which is outside ip_layers ({', '.join(wanted)}), so it has no "
                           "image attention to scale; name a block of ip_layers, or add it to ip_layers.")
    if layer_names is not None:
        resolve_scale(scale, chosen_layers(layer_names, wanted))  # a name no layer has: one sentence


def check_options(opts, layer_names=None):
    """One sentence (DrpError) for the first bad knob of `opts`, an `Options`; reads no model.

    Every knob's type and range is checked. The names in `ip_layers` and in per-block scales are checked
    against each other, and, given `layer_names` (the adapter's attn2 names, e.g. `list(attn2_layers())`
    for SD 1.5), against the layers that exist.
    """
    svd_keys.check_split_options(opts.rank_energy, opts.rank_rule, opts.floor, opts.power)
    if opts.late not in LATE_GROUPS:
        raise DrpError(f"late must be \"both\" or \"style-only\", got {opts.late!r}.")
    if not isinstance(opts.bg_placeholder, str):
        raise DrpError(f"bg_placeholder must be a string (\"\" removes the subject's words), "
                       f"got {opts.bg_placeholder!r}.")
    for knob in ("bg_prompt", "fixed_switch", "filter_values"):
        if not isinstance(getattr(opts, knob), bool):
            raise DrpError(f"{knob} must be True or False, got {getattr(opts, knob)!r}.")
    wanted = wanted_layers(opts.ip_layers)
    if layer_names is not None:
        chosen_layers(layer_names, wanted)
    for knob in ("scale_early", "scale_late"):
        check_scale(knob, getattr(opts, knob), wanted, layer_names)


def reference_tokens(sd, images):
    """{kind: image tokens (1, T, 768)} of the references (PIL pictures), one encoder pass; and the
    unconditional tokens (1, T, 768)."""
    kinds = list(images)
    pixels = clip_pixels([images[k] for k in kinds], size=sd.image_encoder.cfg.image_size)  # (R, 3, 224, 224)
    tokens = sd.ip_adapter.image_tokens(sd.image_encoder, pixels)  # (R, T, 768)
    return {k: tokens[j : j + 1] for j, k in enumerate(kinds)}, sd.ip_adapter.uncond_tokens(sd.image_encoder)


class DualReferenceIP:
    """The prepared references of one generation: each stage's text and hook."""

    def __init__(self, switch_step, hooks, bg_context, report, bg_prompts=None):
        self.switch_step = switch_step
        self.hooks = hooks  # {False: early-stage hook, True: late-stage hook}
        self.bg_context = bg_context  # (B, 77, C) C_bg for the conditional rows of the early stage, or None
        self.bg_prompts = bg_prompts  # C_bg as text, one per prompt, or None
        self._report = report

    def step_inputs(self, i, late, x_in, text):
        """The UNet's input, text and hook at step i: the same rows; C_bg early; the stage's image attention."""
        if not late and self.bg_context is not None:
            text = torch.cat([text[: len(self.bg_context)], self.bg_context])  # negative prompt, then C_bg
        return x_in, text, self.hooks[late]

    def report(self):
        return dict(self._report)

    def masks(self):
        return {}  # this mode finds foreground spectrally, not with masks


def prepare(sd, prompts, content=None, style=None, subject=None, content_mask=None, style_mask=None,
            switch_step=None, steps=50, progress=True, timings=None, **options):
    """Everything the IP-Adapter mode needs before sampling, or None without a reference (plain text-to-image)."""
    resolve_mode(sd, "ip-adapter", references=content is not None or style is not None)  # or how to get it
    opts = make_options(Options, options, "ip-adapter")
    check_options(opts)  # before the adapter is read
    if content_mask is not None or style_mask is not None:
        raise DrpError("the ip-adapter mode splits foreground from background spectrally and takes no masks; "
                       "leave out content_mask/style_mask or choose mode=\"self-attention\".")
    check_switch_step(switch_step, steps)
    if subject is not None and content is None:
        warnings.warn("a subject was given without a content reference; the ip-adapter mode then keeps "
                      "the full prompt throughout.", stacklevel=3)
    if content is None and style is None:
        return None
    subject_tokens(sd, prompts, subject if content is not None else None)  # not a word of the prompt: one sentence
    if content is not None and not subject and opts.bg_prompt:
        warnings.warn("no subject was given: the early stage keeps the full prompt; pass subject= (the word "
                      "naming it in the prompt) to take it out of the early stage's text.", stacklevel=3)
    use_bg = opts.bg_prompt and bool(subject) and content is not None
    bg_prompts = [background_prompt(p, subject, opts.bg_placeholder) for p in prompts] if use_bg else None
    if use_bg and not all(bg_prompts):
        warnings.warn(f"the prompt is only the subject {subject!r}, so C_bg, the early stage's text, is empty: the "
                      "early steps see the empty prompt (as the unconditional rows do) and the references' "
                      "foreground alone; add words for the rest of the picture, or bg_prompt=False "
                      "(--no-bg-prompt) to keep the full prompt.", stacklevel=3)

    adapter, batch = sd.ip_adapter, len(prompts)
    # layer and block names the adapter lacks: refused here, before any picture is read
    layers = chosen_layers(adapter.layer_names, opts.ip_layers)
    scales = {stage: resolve_scale(scale, layers) for stage, scale in
              (("early", opts.scale_early), ("late", opts.scale_late))}

    start = time.perf_counter()
    images = {k: load_image(v, f"{k} reference") for k, v in (("content", content), ("style", style)) if v is not None}
    tokens, uncond = reference_tokens(sd, images)
    # each reference's tokens for the UNet rows: 'no image' for the unconditional rows, then its own
    rows = {k: torch.cat([uncond.expand(batch, -1, -1), t.expand(batch, -1, -1)]) for k, t in tokens.items()}
    h = {k: entropy.image_entropy(images[k]) if k in images else None for k in ("content", "style")}
    if timings is not None:
        timings["references"] = time.perf_counter() - start

    start = time.perf_counter()
    spectra = svd_keys.spectra(adapter, layers)  # computed once per adapter, then kept beside it
    splits = {n: svd_keys.split_keys(adapter.key_weight(n), spectra[n], opts.rank_energy, opts.rank_rule,
                                     opts.floor, opts.power) for n in layers}
    if timings is not None:
        timings["svd"] = time.perf_counter() - start
    fg = {n: s.fg for n, s in splits.items()}
    bar = {n: s.style for n, s in splits.items()}
    # the ablation: the early stage's values blind to the background directions too (one matrix per layer)
    values = {n: svd_keys.filtered_values(adapter.value_weight(n), spectra[n], s.k)
              for n, s in splits.items()} if opts.filter_values else None

    early = [Part(rows[k], fg, values, kind=k) for k in rows]  # the foreground texture of every reference
    keep_content = "content" in rows and (opts.late == "both" or "style" not in rows)
    late = ([Part(rows["content"], fg, kind="content")] if keep_content else []) + (
        [Part(rows["style"], bar, kind="style")] if "style" in rows else [])
    hooks = {False: StageAttention(adapter, [Group(early, scales["early"])], layers),
             True: StageAttention(adapter, [Group(late, scales["late"])], layers)}

    bg_context = encode_text(sd, bg_prompts) if use_bg else None

    report = dict(mode="ip-adapter", subject=subject, content=reference_name(content) if content is not None else None,
                  style=reference_name(style) if style is not None else None,
                  **entropy_switch(h["content"], h["style"], steps, switch_step, opts.fixed_switch),
                  adapter=adapter_name(sd), rank_energy=opts.rank_energy, rank_rule=opts.rank_rule,
                  floor=opts.floor, power=opts.power, scale_early=opts.scale_early, scale_late=opts.scale_late,
                  late=opts.late, filter_values=opts.filter_values, ip_layers=wanted_layers(opts.ip_layers),
                  C_bg=bg_prompts[0] if bg_prompts else None,
                  rank={n: s.k for n, s in splits.items()},
                  spectrum={n: [round(x, 6) for x in s.sigma.tolist()] for n, s in splits.items()})
    return DualReferenceIP(report["switch_step"], hooks, bg_context, report, bg_prompts)


def adapter_name(sd):
    """The adapter's file as converted (its JSON's record), or its kind when unknown."""
    source = getattr(sd.ip_adapter, "source", None) or {}
    return source.get("file") or f"IP-Adapter ({sd.ip_adapter.kind})"
