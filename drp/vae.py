"""The variational autoencoder (AutoencoderKL) that moves Stable Diffusion between pixels and latents.

SD does not denoise pixels. The encoder squeezes a (3, H, W) image in [-1, 1] into a (4, H/8, W/8)
latent, the UNet works there (48× fewer numbers), and the decoder paints the result back into
pixels. Both halves are convolutional ResNets: three stride-2 downsamplings (÷8) in the encoder,
three nearest-neighbour ×2 upsamplings in the decoder, and at the lowest resolution a "mid block"
of ResNet + single-head self-attention + ResNet.

The encoder outputs 8 channels: the mean and the log-variance of a Gaussian over latents (the "KL"
in the name). For editing and inversion we want the deterministic latent, so `encode` returns the
mean and never samples.

Follows CompVis/stable-diffusion:
  ldm/models/autoencoder.py (AutoencoderKL: quant_conv, post_quant_conv)
  https://github.com/CompVis/stable-diffusion/blob/main/ldm/models/autoencoder.py
  ldm/modules/diffusionmodules/model.py (Encoder, Decoder, ResnetBlock, AttnBlock, Downsample, Upsample)
  https://github.com/CompVis/stable-diffusion/blob/main/ldm/modules/diffusionmodules/model.py
Parameter names are diffusers' `AutoencoderKL` (`encoder.down_blocks.0.resnets.1.conv2.weight`, ...),
with the current spelling of the mid attention (`to_q/to_k/to_v/to_out.0`; the published SD 1.5 files
use the older `query/key/value/proj_attn`, the original single file 1×1 convs `q/k/v/proj_out`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .errors import DrpError

# Multiply encoder means by this before diffusion, divide latents by it before decoding.
# Rombach et al. measured the standard deviation of the KL-f8 latents of their training images
# (≈ 1 / 0.18215) and rescale by it so the latents have unit variance, the scale the noise
# schedule assumes. It is `scale_factor` in v1-inference.yaml (`scaling_factor` in diffusers).
LATENT_SCALE = 0.18215

# Tiled decoding (VAE.decode(tiled=True)): tiles of 64×64 latents (512×512 px, the size SD was trained
# at), started every 48 latents, so neighbours share a quarter of a tile; each tile keeps its first
# 384 px per side and fades linearly into the next over 128 px. These are the values and the blending
# of diffusers' `AutoencoderKL.enable_tiling()` for SD 1.x (tests/test_vae.py: the same to the last digit).
TILE = 64
TILE_OVERLAP = 0.25


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the autoencoder; the defaults are SD 1.x's KL-f8 VAE."""

    in_channels: int = 3  # RGB
    latent_channels: int = 4
    channels: tuple = (128, 256, 512, 512)  # per resolution level, full size first
    layers_per_block: int = 2  # ResNet blocks per encoder level (the decoder has one more)
    groups: int = 32  # GroupNorm groups

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))  # JSON gives back a list

    @classmethod
    def tiny(cls):
        """A small configuration for tests."""
        return cls(channels=(32, 64, 64, 64))


def group_norm(cfg, channels):
    # eps 1e-6 everywhere in the VAE (the UNet uses 1e-5): the value of the original code.
    return nn.GroupNorm(cfg.groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv3×3 steps plus a skip connection (a 1×1 conv when channels change)."""

    def __init__(self, cfg, cin, cout):
        super().__init__()
        self.norm1 = group_norm(cfg, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cfg, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Halve height and width with a stride-2 3×3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # Pad one pixel on the right and bottom only, as the original does (TensorFlow's "SAME"
        # padding for stride 2): an even size halves exactly and windows start at the top-left.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double height and width: nearest-neighbour repeat, then a 3×3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidAttention(nn.Module):
    """Single-head self-attention over all pixels of the lowest-resolution feature map, residual."""

    def __init__(self, cfg, channels):
        super().__init__()
        self.group_norm = group_norm(cfg, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # "to_out.0" keeps the diffusers key

    def forward(self, x):
        h = x.shape[-2]
        y = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        q, k, v = (proj(y)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v)[:, 0]  # one head of width C: scale 1/√C
        return x + rearrange(self.to_out[0](y), "b (h w) c -> b c h w", h=h)


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution."""

    def __init__(self, cfg, channels):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cfg, channels, channels) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(cfg, channels)])

    def forward(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """One encoder level: ResNet blocks, then (except at the last level) a downsampling."""

    def __init__(self, cfg, cin, cout, n, downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cfg, cin if j == 0 else cout, cout) for j in range(n)])
        self.downsamplers = nn.ModuleList([Downsample(cout)] if downsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    """One decoder level: ResNet blocks, then (except at the last level) an upsampling."""

    def __init__(self, cfg, cin, cout, n, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cfg, cin if j == 0 else cout, cout) for j in range(n)])
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> mean and log-variance of the latent, (B, 8, H/8, W/8)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, last = cfg.channels, len(cfg.channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(cfg, ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, downsample=i < last)
            for i in range(len(ch))
        ])
        self.mid_block = MidBlock(cfg, ch[-1])
        self.conv_norm_out = group_norm(cfg, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (B, 4, h, w) -> image (B, 3, 8h, 8w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, last = cfg.channels[::-1], len(cfg.channels) - 1  # lowest resolution first
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(cfg, ch[0])
        self.up_blocks = nn.ModuleList([
            UpBlock(cfg, ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, upsample=i < last)
            for i in range(len(ch))
        ])
        self.conv_norm_out = group_norm(cfg, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """SD's KL-f8 autoencoder: `encode` images to unscaled latents, `decode` them back."""

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    @property
    def factor(self):
        """How much smaller the latent is than the image per side (8 for SD)."""
        return 2 ** (len(self.cfg.channels) - 1)

    def encode(self, images):
        """images (B, 3, H, W) in [-1, 1] -> posterior mean (B, 4, H/8, W/8), not yet × LATENT_SCALE."""
        f = self.factor
        if images.dim() != 4 or images.shape[1] != self.cfg.in_channels:
            raise DrpError(f"the VAE encodes images of shape (batch, {self.cfg.in_channels}, height, "
                           f"width), got {tuple(images.shape)}.")
        if images.shape[2] % f or images.shape[3] % f:
            raise DrpError(f"image height and width must be multiples of {f}, got "
                           f"{images.shape[2]}×{images.shape[3]}; resize or crop the image first.")
        moments = self.quant_conv(self.encoder(images))  # (B, 8, H/8, W/8)
        mean, _logvar = moments.chunk(2, dim=1)
        return mean.contiguous()  # channels_last weights (drp.load) give channels_last activations

    def decode(self, latents, tiled=False):
        """Unscaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1].

        The output is not clamped: values slightly outside [-1, 1] occur, and the caller clamps
        when it turns them into pixels. `tiled`: latents larger than 64 per side are decoded in
        overlapping tiles, so memory stays that of a 512×512 decode whatever the size; the result
        differs a little from a whole decode (each tile's GroupNorm sees only its tile).
        """
        if tiled and max(latents.shape[2:]) > TILE:
            images = self.decode_tiles(latents)
        else:
            images = self.decoder(self.post_quant_conv(latents))
        return images.contiguous()  # channels_last weights (drp.load) give channels_last activations

    def decode_tiles(self, latents):
        """Tiled decoding (see TILE): row by row, each tile blended into the one above and the one to its left."""
        step, blend = int(TILE * (1 - TILE_OVERLAP)), int(TILE * self.factor * TILE_OVERLAP)  # 48 latents, 128 px
        keep = TILE * self.factor - blend  # 384 px of each tile end up in the image
        above, rows = None, []
        for i in range(0, latents.shape[2], step):
            row = []
            for j in range(0, latents.shape[3], step):
                tile = self.decoder(self.post_quant_conv(latents[:, :, i : i + TILE, j : j + TILE]))
                if above is not None:
                    fade_in(above[len(row)], tile, blend, dim=2)
                if row:
                    fade_in(row[-1], tile, blend, dim=3)
                row.append(tile)
            rows.append(torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3))
            above = row
        return torch.cat(rows, dim=2)


def fade_in(before, tile, extent, dim):
    """Blends the last `extent` rows (dim 2) or columns (dim 3) of `before` into the first ones of `tile`,
    in place: weight 1 − k/extent on `before` and k/extent on `tile` at the k-th row or column."""
    extent = min(before.shape[dim], tile.shape[dim], extent)
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    # the weights in double, rounded once to fp32: what multiplying by a Python number gives
    k = torch.arange(extent, dtype=torch.float64) / extent
    w_tile, w_before = (w.float().view(shape).to(tile.device) for w in (k, 1 - k))
    head = tile.narrow(dim, 0, extent)
    head.copy_(before.narrow(dim, before.shape[dim] - extent, extent) * w_before + head * w_tile)
