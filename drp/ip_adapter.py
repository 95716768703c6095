"""IP-Adapter for SD 1.5: image tokens, and the decoupled cross-attention that lets the UNet see them.

An image prompt enters Stable Diffusion next to the text prompt. The CLIP image encoder
(drp/vision.py) turns the picture into features, a small *projection* turns those into a few tokens
of the text's width (768), and every cross-attention (`attn2`) of the UNet attends to them with keys
and values of its own, in a second softmax added to the text's:

    out = attend(q, K_text, V_text) + s · attend(q, C·W_kᵀ, C·W_vᵀ)        C = image tokens (B, T, 768)

`W_k`/`W_v` are `to_k_ip`/`to_v_ip`, one pair per attn2 layer; `s` is the adapter scale. Two projections
exist in the public h94/IP-Adapter files:

    base/light  image_embeds (1024) ─Linear→ 4·768 ─LayerNorm→ 4 tokens
    plus        hidden_states[-2] (257×1280) ─Resampler (16 learned queries, 4 perceiver layers)→ 16 tokens

The cross-attention runs as an attention hook (`DecoupledCrossAttention`), so neither the UNet nor
`Attention` changes. Parameter names are the file's (`image_proj.*`); the per-layer weights are held by
the attn2 module name of our UNet (`ip_adapter.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k_ip`)
instead of the file's number, which `file_index` explains.

Follows tencent-ailab/IP-Adapter (ip_adapter/ip_adapter.py `ImageProjModel`, ip_adapter/resampler.py,
ip_adapter/attention_processor.py `IPAttnProcessor2_0`); equal to diffusers' `load_ip_adapter`
(tests/test_ip_adapter.py).
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import Attended, attend
from .errors import DrpError
from .unet import UNetConfig, under

KINDS = ("base", "plus")


def attn2_layers(unet_cfg: UNetConfig = UNetConfig()):
    """{attn2 module name: width} of our UNet, in its module order (down, mid, up), from its config."""
    ch, n, levels = unet_cfg.channels, unet_cfg.layers_per_block, len(unet_cfg.channels)
    block = "attentions.{j}.transformer_blocks.0.attn2"
    layers = {}
    for i in range(levels):
        if unet_cfg.attn_levels[i]:
            layers.update({f"down_blocks.{i}.{block.format(j=j)}": ch[i] for j in range(n)})
    layers[f"mid_block.{block.format(j=0)}"] = ch[-1]
    for i in range(levels):  # up block i mirrors down block levels-1-i and has one layer more
        if unet_cfg.attn_levels[levels - 1 - i]:
            layers.update({f"up_blocks.{i}.{block.format(j=j)}": ch[levels - 1 - i] for j in range(n + 1)})
    return layers


def file_index(layer_names):
    """{i: attn2 name}: which of our layers the file's `ip_adapter.<i>` belongs to.

    The original numbers the layers by their position in diffusers' `unet.attn_processors`, a dict
    filled by walking the UNet's children in the order they were registered: diffusers'
    UNet2DConditionModel registers `down_blocks`, then `up_blocks`, then `mid_block`, and inside each
    transformer block attn1 before attn2. So attn1 gets the even and attn2 the odd numbers, and the
    mid block, which runs between down and up, comes *last* (i = 31 in SD 1.5).
    """
    order = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
    in_diffusers_order = sorted(layer_names, key=lambda name: order[name.split(".")[0]])  # stable sort
    return {2 * k + 1: name for k, name in enumerate(in_diffusers_order)}


@dataclass(frozen=True)
class IPAdapterConfig:
    """Shape of an IP-Adapter; the defaults are ip-adapter_sd15's, `plus()` gives ip-adapter-plus_sd15's."""

    kind: str = "base"  # "base" (ip-adapter_sd15, _light) or "plus" (the Resampler: -plus_sd15, -plus-face_sd15)
    num_tokens: int = 4  # image tokens per picture
    image_dim: int = 1024  # input width: image_embeds (base) or the encoder's hidden states (plus, 1280)
    context_dim: int = 768  # width of the tokens = the UNet's cross-attention input
    layers: tuple = tuple(attn2_layers().items())  # ((attn2 name, width), ...) of the UNet it fits
    dim: int = 768  # plus: the Resampler's width
    depth: int = 4  # plus: perceiver layers
    heads: int = 12  # plus: heads of 64 channels
    ff_mult: int = 4  # plus: MLP expansion

    @classmethod
    def plus(cls, **kwargs):
        return cls(**{"kind": "plus", "num_tokens": 16, "image_dim": 1280, **kwargs})

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown IP-Adapter kind {self.kind!r}")
        # JSON gives lists; keep the config hashable
        object.__setattr__(self, "layers", tuple((name, int(width)) for name, width in self.layers))


class ImageProjection(nn.Module):
    """base/light: one image embedding -> `num_tokens` tokens (Linear, then LayerNorm per token)."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.num_tokens = cfg.num_tokens
        self.proj = nn.Linear(cfg.image_dim, cfg.num_tokens * cfg.context_dim)
        self.norm = nn.LayerNorm(cfg.context_dim)  # eps 1e-5

    def forward(self, image_embeds):  # (N, image_dim)
        tokens = rearrange(self.proj(image_embeds), "n (t c) -> n t c", t=self.num_tokens)
        return self.norm(tokens)  # (N, T, C)


class PerceiverAttention(nn.Module):
    """The learned queries attend to the image features and to themselves (one softmax over both)."""

    def __init__(self, dim, heads, dim_head=64):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # of the image features
        self.norm2 = nn.LayerNorm(dim)  # of the queries
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)  # keys and values, stacked
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x, latents):  # x (N, L, D) features, latents (N, Q, D) queries
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=self.heads) for t in (q, k, v))
        out = attend(q, k, v)  # (N, h, Q, 64)
        return self.to_out(rearrange(out, "n h q d -> n q (h d)"))


def feed_forward(dim, mult):
    """LayerNorm, then a bias-free MLP with exact GELU; indices 0/1/3 are the file's `.1.0`, `.1.1`, `.1.3`."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """plus: the encoder's penultimate hidden states -> `num_tokens` tokens through learned queries."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(1, cfg.num_tokens, cfg.dim))  # the learned queries
        self.proj_in = nn.Linear(cfg.image_dim, cfg.dim)
        # layers.{i}.0 = attention, layers.{i}.1 = feed-forward: the file's keys
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(cfg.dim, cfg.heads), feed_forward(cfg.dim, cfg.ff_mult)])
            for _ in range(cfg.depth))
        self.proj_out = nn.Linear(cfg.dim, cfg.context_dim)
        self.norm_out = nn.LayerNorm(cfg.context_dim)

    def forward(self, hidden_states):  # (N, 257, image_dim)
        x = self.proj_in(hidden_states)  # (N, 257, D)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (N, T, D)
        for attention, ff in self.layers:
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))  # (N, T, C)


class IPAdapter(nn.Module):
    """The image projection and the per-layer image keys/values of one IP-Adapter file."""

    def __init__(self, cfg: IPAdapterConfig = IPAdapterConfig()):
        super().__init__()
        self.cfg = cfg
        self.kind, self.num_tokens = cfg.kind, cfg.num_tokens
        self.layer_names = [name for name, _ in cfg.layers]
        self.image_proj = ImageProjection(cfg) if cfg.kind == "base" else Resampler(cfg)
        # ip_adapter.<attn2 name>.to_k_ip/.to_v_ip: a tree of ModuleDicts along the dotted name
        self.ip_adapter = nn.ModuleDict()
        for name, width in cfg.layers:
            node = self.ip_adapter
            for part in name.split("."):
                if part not in node:
                    node[part] = nn.ModuleDict()
                node = node[part]
            node["to_k_ip"] = nn.Linear(cfg.context_dim, width, bias=False)
            node["to_v_ip"] = nn.Linear(cfg.context_dim, width, bias=False)

    def key_weight(self, name):
        """`to_k_ip` of attn2 layer `name`: (width, 768)."""
        return self.ip_adapter.get_submodule(name)["to_k_ip"].weight

    def value_weight(self, name):
        """`to_v_ip` of attn2 layer `name`: (width, 768)."""
        return self.ip_adapter.get_submodule(name)["to_v_ip"].weight

    def features(self, image_encoder, pixels):
        """What the projection reads: image_embeds (N, 1024) for base, hidden_states[-2] (N, 257, 1280) for plus."""
        p = next(image_encoder.parameters())
        out = image_encoder(pixels.to(p.device, p.dtype))
        return out.image_embeds if self.kind == "base" else out.penultimate

    @torch.no_grad()
    def image_tokens(self, image_encoder, pixels):
        """Normalised pixels (N, 3, 224, 224) (drp.vision.clip_pixels) -> image tokens (N, T, 768)."""
        p = next(self.parameters())
        return self.image_proj(self.features(image_encoder, pixels).to(p.device, p.dtype))

    @torch.no_grad()
    def uncond_tokens(self, image_encoder):
        """The tokens of 'no image' for classifier-free guidance, as the original makes them: (1, T, 768).

        base: the projection of a zero image embedding (so LayerNorm's bias, not zeros); plus: the encoder
        run on zero *normalised* pixels (a grey-ish picture, not black).
        """
        p = next(self.parameters())
        if self.kind == "base":
            return self.image_proj(torch.zeros(1, self.cfg.image_dim, device=p.device, dtype=p.dtype))
        size = image_encoder.cfg.image_size
        return self.image_tokens(image_encoder, torch.zeros(1, 3, size, size))


@dataclass
class ImageGroup:
    """Image tokens that share one softmax in every attn2, with their scale."""

    tokens: torch.Tensor  # (rows, T, 768): the UNet batch's rows, unconditional rows first, then conditional
    scale: object  # a float for every layer, or {attn2 name: float} (absent layers: 0); see resolve_scale

    def scale_at(self, name):
        return float(self.scale.get(name, 0.0)) if isinstance(self.scale, dict) else float(self.scale)


class DecoupledCrossAttention:
    """The attention hook of IP-Adapter: each attn2 adds one scaled attention over each group's image tokens.

    `layers` limits it to some attn2 names (default: all of the adapter's). Image keys and values are
    computed once per layer and group and kept for the following steps: the tokens do not change
    during sampling.
    """

    def __init__(self, adapter: IPAdapter, groups, layers=None):
        self.adapter = adapter
        self.groups = list(groups)
        self.layers = set(adapter.layer_names if layers is None else layers)
        self._keys_values = {}

    def keys_values(self, attn, g, name, dtype):
        """(K, V) of group `g` at layer `name`, heads split: (rows, h, T, d) each."""
        if (g, name) not in self._keys_values:
            tokens = self.groups[g].tokens.to(dtype)
            k = attn.split_heads(F.linear(tokens, self.adapter.key_weight(name).to(dtype)))
            v = attn.split_heads(F.linear(tokens, self.adapter.value_weight(name).to(dtype)))
            self._keys_values[(g, name)] = k, v
        return self._keys_values[(g, name)]

    def __call__(self, attn, q, k, v, call):
        out = attend(q, k, v)  # the text (or, in attn1, the image itself) as usual
        for s, k_ip, v_ip, _ in self.image_attention(attn, q, call):
            out = out + s * attend(q, k_ip, v_ip)
        return out

    def image_attention(self, attn, q, call):
        """(scale, K, V, group number) of each image softmax at this layer: none outside `layers`, and
        none for a group whose scale is 0 there (skipped, so scale 0 is plain text-to-image to the bit)."""
        if not call.is_cross or call.name not in self.layers:
            return []
        found = []
        for g, group in enumerate(self.groups):
            s = group.scale_at(call.name)
            if s == 0:
                continue
            k_ip, v_ip = self.keys_values(attn, g, call.name, q.dtype)
            if k_ip.shape[0] != q.shape[0]:
                raise DrpError(f"the image tokens have {k_ip.shape[0]} rows but the UNet batch has "
                               f"{q.shape[0]}; give one row of tokens per row of the batch.")
            found.append((s, k_ip, v_ip, g))
        return found

    def softmaxes(self, attn, q, k, v, call):
        """The image softmaxes at this layer, laid open for readers of attention (`attention.Attended`,
        drp/attention_maps.py): the keys the forward pass uses, labelled by `labels`."""
        return [Attended(q, k_ip, range(q.shape[0]), self.labels(g)) for _, k_ip, _, g in
                self.image_attention(attn, q, call)]

    def labels(self, g):
        """{source: slice of group g's image tokens}; an image prompt's pictures have no names."""
        return {}


def resolve_scale(scale, layer_names):
    """A scale for every attn2 layer: {name: float}.

    `scale` is a number (every layer), or a dict from block names to numbers, InstantStyle-style:
    {"up_blocks.1": 1.0} sets the style blocks of SD 1.5, {"down_blocks.2": 1.0, "mid_block": 1.0} the
    layout blocks. A key names a block, an attention of a block ("up_blocks.1.attentions.1") or one
    layer; the longest matching key wins; layers no key names get 0, as in diffusers'
    `set_ip_adapter_scale`. A key that names none of the layers is an error, never a silent zero.
    """
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

    if number(scale):
        return {name: float(scale) for name in layer_names}
    if not isinstance(scale, dict) or not all(isinstance(k, str) and number(v) for k, v in scale.items()):
        raise DrpError(f"the IP-Adapter scale must be a number or a dict of block names to numbers, got {scale!r}.")
    blocks = sorted({".".join(name.split(".")[:2]) for name in layer_names if not name.startswith("mid_block")})
    for key in scale:
        if not any(under(name, key) for name in layer_names):
            raise DrpError(f"the IP-Adapter scale names {key!r}, which is no block with cross-attention; "
                           f"use {', '.join(blocks + ['mid_block'])} (or one of their attentions).")
    resolved = {}
    for name in layer_names:
        keys = [key for key in scale if under(name, key)]
        resolved[name] = float(scale[max(keys, key=len)]) if keys else 0.0
    return resolved


def parse_scale(text):
    """A scale written as text -> a number or {block: number}: "0.6", or "up_blocks.1=1,mid_block=0.5".

    The one reading of `--ip-scale` (and of the ip-adapter mode's scale knobs given as text); which
    blocks exist is `resolve_scale`'s to check, against the adapter's layers.
    """
    def number(part):
        value = float(part)  # ValueError for text that is no number
        if not math.isfinite(value):
            raise ValueError(part)
        return value

    try:
        return number(text)
    except ValueError:
        pass
    pairs = [part.partition("=") for part in str(text).split(",")]
    try:
        if all(eq and block.strip() for block, eq, _ in pairs):
            return {block.strip(): number(value) for block, _, value in pairs}
    except ValueError:
        pass
    raise DrpError(f"the IP-Adapter scale {text!r} is neither a number nor BLOCK=NUMBER pairs separated by "
                   "commas; write e.g. 0.6 or up_blocks.1=1,mid_block=0.5.")


def image_prompt(sd, images, scale, rows):
    """The hook that adds an image prompt to `sd`'s text-to-image, for a batch of `rows` images.

    `images`: a picture (path or PIL) or a list of them; several pictures share one softmax (their
    tokens side by side in one group), as diffusers does for a list of images given to one adapter.
    The UNet batch is [unconditional rows; conditional rows] (classifier-free guidance), so the
    tokens are [no-image tokens × rows; image tokens × rows].
    """
    from .vision import clip_pixels

    missing = " and ".join(what for name, what in (("ip_adapter", "IP-Adapter"), ("image_encoder", "image encoder"))
                           if not sd.has(name))  # asked before reading either: the encoder alone is 2.5 GB
    if missing:
        raise DrpError(f"an image prompt needs IP-Adapter's files, and the {missing} is not converted in "
                       f"{sd.folder or 'the weights folder'}; add them with "
                       "`python convert_weights.py --download ip-adapter` (or ip-adapter-plus).")
    adapter, encoder = sd.ip_adapter, sd.image_encoder
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise DrpError("ip_image is an empty list; give a picture, a path, or a list of them.")
    scales = resolve_scale(scale, adapter.layer_names)
    pixels = clip_pixels(images, size=encoder.cfg.image_size)  # (n, 3, 224, 224)
    tokens = adapter.image_tokens(encoder, pixels)  # (n, T, C)
    cond = rearrange(tokens, "n t c -> 1 (n t) c")  # all pictures in one row: one joint softmax
    uncond = adapter.uncond_tokens(encoder).repeat(1, len(images), 1)  # 'no image' once per picture
    tokens = torch.cat([uncond.expand(rows, -1, -1), cond.expand(rows, -1, -1)])  # (2·rows, n·T, C)
    return DecoupledCrossAttention(adapter, [ImageGroup(tokens, scales)])


def report(sd, images, scale):
    """What `Result.info["ip_adapter"]` records: the adapter file, its kind, the scale and the pictures."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    source = getattr(sd.ip_adapter, "source", None) or {}

    def name(im):  # a path's file name; a PIL picture's file name if it was opened from one
        return os.path.basename(im if isinstance(im, (str, os.PathLike)) else getattr(im, "filename", "") or "picture")

    return dict(file=source.get("file", "unknown"), kind=sd.ip_adapter.kind, scale=scale,
                images=[name(im) for im in images])
