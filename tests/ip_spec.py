"""ALGORITHM_IP_ADAPTER.md part B written again from its text, for tests/test_dual_reference_ip_rules.py.

Nothing here uses drp/dual_reference_ip.py or drp/svd_keys.py: the SVD split (B1) in float64 with numpy
(numpy's median), each stage's group and the text schedule C_bg / C_te (B2), the entropy switch of
ALGORITHM.md §4 from a picture's grey levels, and the image attention as a hook with an explicit softmax.
What it does use is part A and the plain pipeline, proven against diffusers elsewhere: the encoder and
projection (image and unconditional tokens), the text encoder, the UNet and the DDIM step.

* `grey_picture(levels, seed)`: a 512² grey picture of exactly log2(levels) bits.
* `own_split(w, …)`: (k, W_fg, W̄, V_bg) of one key weight; `own_svd(w)`: its SVD, kept per weight.
* `own_switch(content, style, steps, fixed_switch)`: N_e; `own_entropy(picture)`: H in bits.
* `own_run(sd, prompt, latents, steps, guidance, **knobs)`: the latents B2's table gives.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from drp import ddim
from drp.sampling import encode_text
from drp.vision import clip_pixels


def grey_picture(levels, seed=None):
    """A 512² grey picture where each of `levels` grey levels covers the same area: exactly log2(levels) bits.

    Without a seed the levels form a vertical ramp (a smooth picture); with one, they are shuffled (noise).
    """
    values = np.repeat(np.arange(levels) * (256 // levels), 512 * 512 // levels).astype(np.uint8)
    if seed is not None:
        values = np.random.default_rng(seed).permutation(values)
    grey = values.reshape(512, 512)
    return Image.fromarray(np.stack([grey] * 3, axis=-1))


_SVDS = {}  # numpy's SVD of each weight, by identity: the runs below split the same 16 weights many times


def own_svd(w):
    if id(w) not in _SVDS:
        _SVDS[id(w)] = w, np.linalg.svd(w.detach().double().numpy(), full_matrices=False)
    return _SVDS[id(w)][1]


def own_split(w, rank_energy=0.5, rank_rule="energy", floor=0.05, power=2):
    """B1 in float64: (k, W_fg, W̄, V_bg) of one key weight (d, 768)."""
    U, S, Vh = own_svd(w)
    if rank_rule == "gd":  # σ_i > ω(β)·median σ, β = r / max(d, 768)
        beta = len(S) / max(w.shape)
        omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
        k = max(int((S > omega * np.median(S)).sum()), 1)
    else:  # the smallest k with Σ_{i≤k} σ_i² ≥ e·Σσ²
        share = np.cumsum(S**2) / (S**2).sum()
        k = 1 + next(i for i, x in enumerate(share) if x >= rank_energy - 1e-12)
    fg = (U[:, :k] * S[:k]) @ Vh[:k]
    weights = S * np.maximum(S, floor * S[0]) ** (-power)
    bar = (U * (weights * np.linalg.norm(S) / np.linalg.norm(weights))) @ Vh
    return k, fg, bar, Vh[k:]


def own_entropy(picture):
    """ALGORITHM.md §4 for a 512² grey picture: the entropy of its 256-bin histogram, in bits."""
    grey = np.asarray(picture)[..., 0]
    assert grey.shape == (512, 512) and (np.asarray(picture) == grey[..., None]).all()
    p = np.bincount(grey.ravel(), minlength=256) / grey.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def own_switch(content, style, steps, fixed_switch=False):
    """N_e of ALGORITHM.md §4: α from ρ = H_cu/H_st with κ = 6 (0.5 content only, 0.3 style only)."""
    if content is not None and style is not None:
        rho = own_entropy(content) / own_entropy(style)
        alpha = 0.5 if fixed_switch else 0.2 + 0.6 * rho**6 / (1 + rho**6)
    else:
        alpha = 0.5 if content is not None else 0.3
    return min(max(math.floor(alpha * steps + 0.5), 1), steps - 1)


def own_scale(scale, layers):
    """A stage's scale per layer: a number everywhere, or the longest block name each layer lies in (else 0)."""
    if not isinstance(scale, dict):
        return {n: float(scale) for n in layers}
    within = {n: [b for b in scale if n == b or n.startswith(b + ".")] for n in layers}
    return {n: float(scale[max(bs, key=len)]) if bs else 0.0 for n, bs in within.items()}


class OwnHook:
    """B2's image attention: one softmax over a group's tokens, each part with its own key/value matrices."""

    def __init__(self, parts, scale):
        self.parts, self.scale = parts, scale  # parts: [(tokens (2, T, C), {layer: W_k}, {layer: W_v})]

    def __call__(self, attn, q, k, v, call):
        out = F.scaled_dot_product_attention(q, k, v)
        s = self.scale.get(call.name, 0.0)
        if not call.is_cross or s == 0:
            return out
        heads = lambda x: x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (2, T, h·d) -> (2, h, T, d)
        keys = heads(torch.cat([t @ wk[call.name].T for t, wk, _ in self.parts], dim=1))
        values = heads(torch.cat([t @ wv[call.name].T for t, _, wv in self.parts], dim=1))
        weights = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return out + s * (weights @ values)


def own_run(sd, prompt, latents, steps, guidance, content=None, style=None, subject=None, switch_step=None,
            rank_energy=0.5, rank_rule="energy", floor=0.05, power=2, scale_early=0.6, scale_late=0.6, bg_prompt=True,
            bg_placeholder="", late="both", ip_layers=None, fixed_switch=False, filter_values=False):
    """The latents of B2's table, computed without drp/dual_reference_ip.py and drp/svd_keys.py."""
    adapter, encoder = sd.ip_adapter, sd.image_encoder
    layers = [n for n in adapter.layer_names
              if ip_layers is None or any(n == b or n.startswith(b + ".") for b in ip_layers)]
    split = {n: own_split(adapter.key_weight(n), rank_energy, rank_rule, floor, power) for n in layers}
    f32 = lambda m: torch.from_numpy(np.ascontiguousarray(m)).float()
    w_fg, w_bar = ({n: f32(s[i]) for n, s in split.items()} for i in (1, 2))
    w_v = {n: adapter.value_weight(n) for n in layers}
    v_bg = {n: s[3] for n, s in split.items()}
    w_v_early = {n: f32(w_v[n].double().numpy() @ (np.eye(w_v[n].shape[1]) - v_bg[n].T @ v_bg[n]))
                 for n in layers} if filter_values else w_v

    with torch.no_grad():
        uncond = adapter.uncond_tokens(encoder)  # the unconditional rows see 'no image' (part A)
        rows = {kind: torch.cat([uncond, adapter.image_tokens(encoder, clip_pixels([x], size=encoder.cfg.image_size))])
                for kind, x in (("content", content), ("style", style)) if x is not None}
    early = [(rows[kind], w_fg, w_v_early) for kind in rows]
    if content is not None and style is not None:
        late_parts = ([(rows["content"], w_fg, w_v)] if late == "both" else []) + [(rows["style"], w_bar, w_v)]
    else:
        late_parts = [(rows["content"], w_fg, w_v)] if content is not None else [(rows["style"], w_bar, w_v)]
    hooks = [OwnHook(early, own_scale(scale_early, layers)), OwnHook(late_parts, own_scale(scale_late, layers))]

    words = [bg_placeholder if w == subject else w for w in prompt.split()]
    c_bg = " ".join(w for w in words if w) if bg_prompt and subject and content is not None else None
    texts = [encode_text(sd, ["", c_bg if c_bg is not None else prompt]), encode_text(sd, ["", prompt])]
    n_e = switch_step if switch_step is not None else own_switch(content, style, steps, fixed_switch)

    alphas, x = ddim.alphas_cumprod(), latents
    for i, (t, t_prev) in enumerate(ddim.ddim_pairs(steps)):
        stage = int(i >= n_e)
        with torch.no_grad():
            eps = sd.unet(torch.cat([x, x]), t, texts[stage], hooks[stage]).float()
        eps_uncond, eps_text = eps.chunk(2)
        x = ddim.ddim_step(x, eps_uncond + guidance * (eps_text - eps_uncond), t, t_prev, alphas)
    return x
