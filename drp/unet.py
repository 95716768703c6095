"""The denoising UNet of Stable Diffusion 1.x: predicts the noise in a latent at timestep t, given text.

    x (B, 4, h, w) ──conv_in──► down_blocks ──► mid_block ──► up_blocks ──conv_out──► ε (B, 4, h, w)
                                     │ skip connections ───────────▲

Each level holds ResNet blocks (conditioned on the timestep) and, at the first three levels, a
spatial transformer: self-attention over the image tokens (`attn1`), cross-attention from the image to
the 77 text tokens (`attn2`) and a GEGLU feed-forward. The hook of `drp/attention.py` is passed down
every forward call next to the text context; it is the only way methods change the model.

Follows `UNetModel` of CompVis/stable-diffusion (ldm/modules/diffusionmodules/openaimodel.py and
ldm/modules/attention.py). Parameter names are those of the diffusers folder layout
(`down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q`, ...), so that layout loads as is.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import Attention, keep_hooks_out_of_compile


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the UNet; the defaults are SD 1.5's."""

    in_channels: int = 4
    out_channels: int = 4
    channels: tuple = (320, 640, 1280, 1280)  # per resolution level, 64² → 8² latents at 512 px
    layers_per_block: int = 2
    heads: int = 8  # SD 1.x: 8 heads at every level (head widths 40, 80, 160)
    context_dim: int = 768  # width of the CLIP text embedding
    groups: int = 32
    attn_levels: tuple = (True, True, True, False)  # which levels have a spatial transformer

    @classmethod
    def tiny(cls):
        return cls(channels=(32, 64, 64, 64), context_dim=128)

    def __post_init__(self):  # JSON gives lists; keep the config hashable
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "attn_levels", tuple(self.attn_levels))


# Layers are named by their dotted module paths ("up_blocks.1.attentions.2.transformer_blocks.0.attn2"), and
# methods choose them by block ("up_blocks.1"); level i of L is the latent halved i times: down_blocks.i,
# its mirror up_blocks.{L-1-i}, and the mid block at the deepest level.

def under(name, block):
    """Whether the layer (or block) `name` is `block` or lies inside it: the one rule by which names choose layers."""
    return name == block or name.startswith(block + ".")


def level_of(name, levels):
    """The resolution level of a layer or block name: down_blocks.i → i, up_blocks.i → levels-1-i, mid → deepest."""
    kind, _, rest = name.partition(".")
    if kind == "mid_block":
        return levels - 1
    i = int(rest.split(".")[0])
    return i if kind == "down_blocks" else levels - 1 - i


def grid_at(level, height, width):
    """The token grid of a level for a height × width image: the latent (H/8, W/8) halved `level` times,
    rounded up as the stride-2 convolutions round."""
    rows, cols = height // 8, width // 8
    for _ in range(level):
        rows, cols = -(-rows // 2), -(-cols // 2)
    return rows, cols


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the timestep, cosines first (SD's `flip_sin_to_cos=True`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class ResnetBlock(nn.Module):
    """Two 3×3 convolutions with GroupNorm and SiLU; the timestep embedding is added in between."""

    def __init__(self, cin, cout, temb_dim, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class GEGLU(nn.Module):
    """Linear projection to twice the width, one half gating the other through GELU."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(h)  # in place: one fewer (B, N, 4C) tensor, 10 % of this layer's time


class FeedForward(nn.Module):
    """GEGLU feed-forward, 4× wide."""

    def __init__(self, dim):
        super().__init__()
        # "net.0" / "net.2" keep the checkpoint keys ff.net.0.proj and ff.net.2 (net.1 was dropout)
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; each pre-normed and residual."""

    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads=heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, hw, hook):
        x = x + self.attn1(self.norm1(x), hw=hw, hook=hook)
        x = x + self.attn2(self.norm2(x), context, hw=hw, hook=hook)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image (B, C, h, w) → h·w tokens → transformer block → image, with a residual around it."""

    def __init__(self, dim, context_dim, heads, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Conv2d(dim, dim, 1)  # SD 1.x uses 1×1 convs here (SD 2.x: linears)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, context_dim, heads)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x, context, hook):
        h, w = x.shape[-2:]
        tokens = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")  # one token per pixel
        for block in self.transformer_blocks:
            tokens = block(tokens, context, (h, w), hook)
        return x + self.proj_out(rearrange(tokens, "b (h w) c -> b c h w", h=h))


class Downsample(nn.Module):
    """Stride-2 3×3 convolution."""

    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the size of the matching skip connection, then a 3×3 conv."""

    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x, size):
        # `size` rather than ×2, so that odd latent sizes (e.g. 520 px → 65) meet their skip exactly
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResNet blocks, each followed by a spatial transformer if the level has one."""

    def __init__(self, cins, cout, cfg, temb_dim, attention, resample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin, cout, temb_dim, cfg.groups) for cin in cins])
        if attention:
            self.attentions = nn.ModuleList(
                [SpatialTransformer(cout, cfg.context_dim, cfg.heads, cfg.groups) for _ in cins]
            )
        else:
            self.attentions = None
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(cout)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def layer(self, j, x, temb, context, hook):
        x = self.resnets[j](x, temb)
        return x if self.attentions is None else self.attentions[j](x, context, hook)


class UNet(nn.Module):
    """The SD 1.x noise predictor ε(x_t, t, text)."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        ch, n, levels = cfg.channels, cfg.layers_per_block, len(cfg.channels)
        temb_dim = ch[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(ch[0], temb_dim)
        self.time_embedding.linear_2 = nn.Linear(temb_dim, temb_dim)

        # Going down, every layer's output is kept for a skip connection; note its width.
        skips, cin = [ch[0]], ch[0]
        self.down_blocks = nn.ModuleList()
        for i, cout in enumerate(ch):
            last = i == levels - 1
            self.down_blocks.append(
                Level([cin] + [cout] * (n - 1), cout, cfg, temb_dim, cfg.attn_levels[i], None if last else "down")
            )
            skips += [cout] * n + ([] if last else [cout])
            cin = cout

        self.mid_block = nn.Module()
        self.mid_block.resnets = nn.ModuleList([ResnetBlock(cin, cin, temb_dim, cfg.groups) for _ in range(2)])
        self.mid_block.attentions = nn.ModuleList([SpatialTransformer(cin, cfg.context_dim, cfg.heads, cfg.groups)])

        # Going up, each level has one layer more than going down, each eating one skip connection.
        self.up_blocks = nn.ModuleList()
        for i, cout in enumerate(reversed(ch)):
            cins = []
            for _ in range(n + 1):
                cins.append(cin + skips.pop())
                cin = cout
            last = i == levels - 1
            self.up_blocks.append(
                Level(cins, cout, cfg, temb_dim, cfg.attn_levels[levels - 1 - i], None if last else "up")
            )

        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

        for name, module in self.named_modules():  # give every attention its checkpoint path
            if isinstance(module, Attention):
                module.name = name

    def compile(self, **kwargs):
        """torch.compile this UNet in place (`sample.py --compile`), its attention hooks left uncompiled."""
        keep_hooks_out_of_compile()
        super().compile(**kwargs)

    def forward(self, x, t, context, hook=None):
        """x: (B, 4, h, w) noisy latents; t: timestep(s), int or (B,); context: (B, 77, 768) text."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = timestep_embedding(t, self.cfg.channels[0]).to(x.dtype)
        temb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(temb)))  # (B, 4·C0)

        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for j in range(len(level.resnets)):
                h = level.layer(j, h, temb, context, hook)
                skips.append(h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
                skips.append(h)

        h = self.mid_block.resnets[0](h, temb)
        h = self.mid_block.attentions[0](h, context, hook)
        h = self.mid_block.resnets[1](h, temb)

        for level in self.up_blocks:
            for j in range(len(level.resnets)):
                h = level.layer(j, torch.cat([h, skips.pop()], dim=1), temb, context, hook)
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h, size=skips[-1].shape[-2:])

        # Convolution weights stored channels_last (faster on the CPU: README's Performance, `python -m
        # drp.bench`) carry that layout through every activation; the caller gets the usual contiguous layout back.
        return self.conv_out(F.silu(self.conv_norm_out(h))).contiguous()
