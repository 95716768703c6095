"""The vision transformer (ViT): IP-Adapter's image encoder, CLIP's image tower and DINO, one class.

A picture is cut into P×P patches; each patch becomes one token (a strided convolution), a learned
class token is put in front, learned position embeddings are added, and a stack of pre-LayerNorm
transformer layers (`x + attn(LN(x))`, `x + mlp(LN(x))`) mixes the tokens. The class token's final
state, after a LayerNorm, summarises the picture (`pooled`); CLIP projects it into the joint
image-text space (`image_embeds`, not L2-normalised here).

The models this file serves differ only in numbers and three switches (see `VisionConfig`):

| model | width | layers | heads | patch | GELU | eps | patch bias | pre-norm | final norm | projection |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| OpenCLIP ViT-H/14 (IP-Adapter) | 1280 | 32 | 16 | 14 | exact | 1e-5 | no | yes | CLS only | 1024 |
| OpenAI CLIP ViT-L/14 | 1024 | 24 | 16 | 14 | quick | 1e-5 | no | yes | CLS only | 768 |
| OpenAI CLIP ViT-B/32 | 768 | 12 | 12 | 32 | quick | 1e-5 | no | yes | CLS only | 512 |
| DINO ViT-S/16 | 384 | 12 | 6 | 16 | exact | 1e-6 | yes | no | every token | none |

Follows `VisionTransformer` of openai/CLIP (clip/model.py), `VisionTransformer` of
facebookresearch/dino (vision_transformer.py), and the OpenCLIP ViT-H/14 tower as h94/IP-Adapter
publishes it. Parameter names are those of transformers' `CLIPVisionModelWithProjection` files
(`vision_model.encoder.layers.N...`, `visual_projection`), so `image_encoder/model.safetensors` and
the vision half of a `CLIPModel` file load with no key map; DINO's two layouts are mapped onto the
same names by `dino_from_original` and `dino_from_transformers` below. The files also hold
`vision_model.embeddings.position_ids` (just `arange`), which `load_state` skips;
`clip_from_transformers` takes the image tower out of a whole CLIPModel file.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .clip import quick_gelu
from .errors import DrpError
from .image_processing import clip_pixels, dino_pixels  # noqa: F401  (re-exported: the encoders' inputs)


@dataclass(frozen=True)
class VisionConfig:
    """Shape of a vision transformer; the defaults are IP-Adapter's image encoder (OpenCLIP ViT-H/14)."""

    dim: int = 1280
    layers: int = 32
    heads: int = 16  # 80 channels per head
    mlp_dim: int = 5120  # 4 × dim
    patch_size: int = 14
    image_size: int = 224  # 16×16 patches of 14 px + the class token = 257 tokens
    act: str = "gelu"  # "gelu" (exact, erf) or "quick_gelu" (OpenAI's x·σ(1.702x))
    eps: float = 1e-5
    patch_bias: bool = False  # CLIP's patch convolution has no bias, DINO's has one
    pre_norm: bool = True  # CLIP normalises the embeddings before the layers (`pre_layrnorm`), DINO not
    norm_all_tokens: bool = False  # DINO's final `norm` covers every token; CLIP's `post_layernorm` the CLS
    projection_dim: int = 1024  # `visual_projection` width; 0 = no projection (DINO)

    @property
    def tokens(self):
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def vit_h14(cls):
        """OpenCLIP ViT-H/14, as h94/IP-Adapter's `models/image_encoder/config.json` gives it."""
        return cls()

    @classmethod
    def vit_l14(cls):
        """OpenAI CLIP ViT-L/14's image tower (`openai/clip-vit-large-patch14`)."""
        return cls(dim=1024, layers=24, heads=16, mlp_dim=4096, act="quick_gelu", projection_dim=768)

    @classmethod
    def vit_b32(cls):
        """OpenAI CLIP ViT-B/32's image tower (`openai/clip-vit-base-patch32`)."""
        return cls(dim=768, layers=12, heads=12, mlp_dim=3072, patch_size=32, act="quick_gelu",
                   projection_dim=512)

    @classmethod
    def dino_s16(cls):
        """DINO ViT-S/16 (`dino_deitsmall16_pretrain.pth`): LayerNorm eps 1e-6 as DINO's code sets it."""
        return cls(dim=384, layers=12, heads=6, mlp_dim=1536, patch_size=16, eps=1e-6, patch_bias=True,
                   pre_norm=False, norm_all_tokens=True, projection_dim=0)

    @classmethod
    def tiny(cls, **changes):
        """A small configuration for tests that still takes 224×224 pixels (7×7 patches of 32)."""
        return replace(cls(dim=64, layers=2, heads=4, mlp_dim=128, patch_size=32, projection_dim=32), **changes)

    @classmethod
    def from_transformers(cls, config):
        """A transformers `config.json` dict: CLIPVisionConfig, CLIPConfig (its vision half) or ViTConfig."""
        return _from_transformers(cls, dict(config))


# transformers' defaults, for keys a config.json leaves out (older files write only what differs)
CLIP_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     patch_size=32, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                     projection_dim=512, num_channels=3)
VIT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    patch_size=16, image_size=224, hidden_act="gelu", layer_norm_eps=1e-12, num_channels=3,
                    qkv_bias=True)


def _from_transformers(cls, config):
    kind = config.get("model_type")
    if kind == "clip":  # a whole CLIPModel: its image tower, with the projection width of the pair
        vision = {**(config.get("vision_config") or {}), "model_type": "clip_vision_model",
                  "projection_dim": config.get("projection_dim", 512)}
        return _from_transformers(cls, vision)
    if kind == "clip_vision_model":
        c, switches = {**CLIP_DEFAULTS, **config}, {}
        if c.get("architectures") == ["CLIPVisionModel"]:  # saved without `visual_projection`
            c["projection_dim"] = 0
    elif kind == "vit":
        c = {**VIT_DEFAULTS, **config}
        if not c["qkv_bias"]:
            raise DrpError("this ViT config has no query/key/value biases (qkv_bias false), which the DINO "
                           "vision transformer needs; give the facebook/dino-vits16 folder.")
        c["projection_dim"] = 0
        switches = dict(patch_bias=True, pre_norm=False, norm_all_tokens=True)
    else:
        raise DrpError(f"a config of model_type {kind!r} is not a vision transformer drp can build; give a "
                       "CLIP (clip, clip_vision_model) or DINO ViT (vit) config.json.")
    size, patch = c["image_size"], c["patch_size"]
    if not (isinstance(size, int) and isinstance(patch, int)):
        raise DrpError(f"image_size {size} and patch_size {patch} must be single numbers (square images and "
                       "patches); drp's vision transformer builds no other kind.")
    checks = [
        (c["hidden_act"] in ("gelu", "quick_gelu"), f"activation {c['hidden_act']!r} (only gelu, quick_gelu)"),
        (c["num_channels"] == 3, f"{c['num_channels']} input channels (only RGB)"),
        (size % patch == 0, f"image size {size} not a multiple of the patch size {patch}"),
        (c["hidden_size"] % c["num_attention_heads"] == 0,
         f"width {c['hidden_size']} not divisible by {c['num_attention_heads']} heads"),
    ]
    for ok, what in checks:
        if not ok:
            raise DrpError(f"this vision config has {what}, which drp's vision transformer cannot represent.")
    return cls(dim=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
               mlp_dim=c["intermediate_size"], patch_size=patch, image_size=size, act=c["hidden_act"],
               eps=float(c["layer_norm_eps"]), projection_dim=c["projection_dim"] or 0, **switches)


@dataclass
class VisionOutput:
    """What the encoder gives: the projected and pooled CLS token, and two hidden states."""

    image_embeds: torch.Tensor  # (B, projection_dim) = visual_projection(pooled); None without projection
    pooled: torch.Tensor  # (B, dim) the final-norm CLS token
    penultimate: torch.Tensor  # (B, tokens, dim) output of the second-to-last layer (hidden_states[-2])
    last_hidden_state: torch.Tensor  # (B, tokens, dim) last layer's output; DINO: after its final norm


class SelfAttention(nn.Module):
    """Multi-head self-attention over all tokens (no mask: every patch sees every patch)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x):
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=self.heads)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/√d, as all three models use
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    """Widen ×4, GELU (exact or quick, per config), narrow back."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = quick_gelu if cfg.act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """One pre-LayerNorm transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    """Patches -> tokens, the class token in front, learned positions added."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.dim))
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.position_embedding = nn.Embedding(cfg.tokens, cfg.dim)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, C, H/P, W/P)
        patches = rearrange(patches, "b c h w -> b (h w) c")  # row by row, as the position table is laid out
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1 + N, C)


class VisionTransformer(nn.Module):
    """A ViT image encoder: pixels (B, 3, S, S) normalised as its preprocessing does -> `VisionOutput`."""

    def __init__(self, cfg: VisionConfig = VisionConfig()):
        super().__init__()
        if cfg.layers < 1 or cfg.act not in ("gelu", "quick_gelu"):
            raise DrpError(f"a vision transformer needs at least one layer and gelu or quick_gelu, got {cfg}.")
        self.cfg = cfg
        # nested dicts only to reproduce the checkpoint's key paths under "vision_model."
        parts = dict(embeddings=Embeddings(cfg))
        if cfg.pre_norm:
            parts["pre_layrnorm"] = nn.LayerNorm(cfg.dim, eps=cfg.eps)  # sic: "layrnorm" is the file's spelling
        parts["encoder"] = nn.ModuleDict(dict(layers=nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.layers)])))
        parts["post_layernorm"] = nn.LayerNorm(cfg.dim, eps=cfg.eps)  # DINO's final `norm`
        self.vision_model = nn.ModuleDict(parts)
        self.visual_projection = nn.Linear(cfg.dim, cfg.projection_dim, bias=False) if cfg.projection_dim else None

    def forward(self, pixels):
        """pixels (B, 3, S, S) -> VisionOutput; S is the config's image size (224)."""
        cfg, m = self.cfg, self.vision_model
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, cfg.image_size, cfg.image_size):
            raise DrpError(f"the image encoder takes pixels of shape (batch, 3, {cfg.image_size}, "
                           f"{cfg.image_size}), got {tuple(pixels.shape)}; prepare pictures with clip_pixels "
                           "or dino_pixels.")
        x = m.embeddings(pixels)
        if cfg.pre_norm:
            x = m.pre_layrnorm(x)
        *first, last = m.encoder.layers
        for layer in first:
            x = layer(x)
        penultimate = x
        x = last(x)
        if cfg.norm_all_tokens:  # DINO: one final norm over every token; the CLS token is its summary
            x = m.post_layernorm(x)
            pooled = x[:, 0]
        else:  # CLIP: the layers' output is kept, only the CLS token is normalised
            pooled = m.post_layernorm(x[:, 0])
        embeds = self.visual_projection(pooled) if self.visual_projection is not None else None
        return VisionOutput(image_embeds=embeds, pooled=pooled, penultimate=penultimate, last_hidden_state=x)


# Tensors the transformers files carry that no parameter of ours comes from.
IGNORED = ("vision_model.embeddings.position_ids",)  # arange(tokens); a persistent buffer in transformers 4.x


def load_state(model, state_dict, what="image encoder"):
    """Loads a state dict in our (= transformers file) names after checking every key and shape:
    the first missing, unexpected or misshapen tensor is named in one DrpError sentence."""
    state = {k: v for k, v in state_dict.items() if k not in IGNORED}
    want = model.state_dict()
    for key in sorted(want):
        if key not in state:
            raise DrpError(f"the {what} weights lack {key}; they are not a {_describe(model.cfg)} vision model.")
        if tuple(state[key].shape) != tuple(want[key].shape):
            raise DrpError(f"the {what} tensor {key} has shape {tuple(state[key].shape)} where a "
                           f"{_describe(model.cfg)} model has {tuple(want[key].shape)}; check the weights' config.")
    extra = sorted(set(state) - set(want))
    if extra:
        raise DrpError(f"the {what} weights hold {extra[0]}, which a {_describe(model.cfg)} model does not have; "
                       "check the weights' config.")
    on_meta = any(p.is_meta for p in model.parameters())  # built on the meta device: take the tensors as they are
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model


# The text half of a CLIPModel file (the metrics read it with drp/clip.py) and the similarity temperature.
CLIP_TEXT_SIDE = ("text_model.", "text_projection.", "logit_scale")


def clip_from_transformers(state_dict):
    """The image tower's tensors of a transformers CLIPModel or CLIPVisionModelWithProjection file, in our
    names (the same names: nothing is renamed); any tensor of neither tower -> DrpError naming it."""
    ours = (OURS, "visual_projection.")
    for key in sorted(state_dict):
        if not key.startswith(ours + CLIP_TEXT_SIDE):
            raise DrpError(f"the CLIP weights hold {key}, which is part of neither CLIP tower; give a "
                           "transformers CLIPModel or CLIPVisionModelWithProjection file.")
    return {k: v for k, v in state_dict.items() if k.startswith(ours) and k not in IGNORED}


def _describe(cfg):
    return f"{cfg.layers}-layer, {cfg.dim}-wide, patch-{cfg.patch_size}"


# --- DINO's two file layouts -> our names ---------------------------------------------------------------

OURS = "vision_model."
LAYER = OURS + "encoder.layers.{i}."


def _layer_count(state_dict, pattern, prefix):
    """1 + the largest block index in keys `prefix + pattern.format(i=N) + ...`; DrpError when there is none."""
    head = prefix + pattern.split("{i}")[0]
    found = {int(k[len(head):].split(".")[0]) for k in state_dict if k.startswith(head)
             and k[len(head):].split(".")[0].isdigit()}
    if not found:
        raise DrpError(f"these DINO weights have no {head}N.* tensors; give dino_deitsmall16_pretrain.pth or "
                       "the facebook/dino-vits16 folder.")
    return max(found) + 1


def _apply(state_dict, rules, ignore, prefix, layout):
    """{source key: [(our key, take)]} applied with a bijection proof: every rule's source present, every
    source key used or ignored; `take` cuts or reshapes the source tensor."""
    for src in rules:
        if prefix + src not in state_dict:
            raise DrpError(f"the DINO weights ({layout} layout) lack {prefix + src}; the file is incomplete or "
                           "of another model.")
    for key in sorted(state_dict):
        if key.startswith(prefix) and key[len(prefix):] in rules or any(key.startswith(p) for p in ignore):
            continue
        raise DrpError(f"the DINO weights ({layout} layout) hold {key}, which no parameter comes from; give "
                       "the backbone of a DINO ViT (dino_deitsmall16_pretrain.pth or facebook/dino-vits16).")
    return {ours: take(state_dict[prefix + src]) for src, outs in rules.items() for ours, take in outs}


def same(t):
    return t


def thirds(i):
    """Row block i of a fused query/key/value tensor (3·dim, ...), rows ordered q, k, v."""
    return lambda t: t.chunk(3, dim=0)[i].contiguous()


def _dino_original_rules(n):
    rules = {
        "cls_token": [(OURS + "embeddings.class_embedding", lambda t: t.reshape(-1))],  # (1, 1, C) -> (C,)
        "pos_embed": [(OURS + "embeddings.position_embedding.weight", lambda t: t[0])],  # (1, T, C) -> (T, C)
        "patch_embed.proj.weight": [(OURS + "embeddings.patch_embedding.weight", same)],
        "patch_embed.proj.bias": [(OURS + "embeddings.patch_embedding.bias", same)],
        "norm.weight": [(OURS + "post_layernorm.weight", same)],
        "norm.bias": [(OURS + "post_layernorm.bias", same)],
    }
    pairs = {"norm1": "layer_norm1", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(n):
        ours = LAYER.format(i=i)
        for p in ("weight", "bias"):
            for src, dst in pairs.items():
                rules[f"blocks.{i}.{src}.{p}"] = [(f"{ours}{dst}.{p}", same)]
            rules[f"blocks.{i}.attn.qkv.{p}"] = [(f"{ours}self_attn.{x}_proj.{p}", thirds(j))
                                                for j, x in enumerate("qkv")]
    return rules


def dino_from_original(state_dict):
    """facebookresearch/dino's backbone state dict (`dino_deitsmall16_pretrain.pth`) -> our names."""
    n = _layer_count(state_dict, "blocks.{i}.", "")
    return _apply(state_dict, _dino_original_rules(n), ignore=(), prefix="", layout="original")


def _dino_transformers_rules(n):
    rules = {
        "embeddings.cls_token": [(OURS + "embeddings.class_embedding", lambda t: t.reshape(-1))],
        "embeddings.position_embeddings": [(OURS + "embeddings.position_embedding.weight", lambda t: t[0])],
        "layernorm.weight": [(OURS + "post_layernorm.weight", same)],
        "layernorm.bias": [(OURS + "post_layernorm.bias", same)],
    }
    for p in ("weight", "bias"):
        rules[f"embeddings.patch_embeddings.projection.{p}"] = [(f"{OURS}embeddings.patch_embedding.{p}", same)]
    pairs = {"layernorm_before": "layer_norm1", "attention.attention.query": "self_attn.q_proj",
             "attention.attention.key": "self_attn.k_proj", "attention.attention.value": "self_attn.v_proj",
             "attention.output.dense": "self_attn.out_proj", "layernorm_after": "layer_norm2",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    for i in range(n):
        for src, dst in pairs.items():
            for p in ("weight", "bias"):
                rules[f"encoder.layer.{i}.{src}.{p}"] = [(f"{LAYER.format(i=i)}{dst}.{p}", same)]
    return rules


# ViTModel's pooler (dense + tanh, not part of DINO) and its masked-image-modelling token are not used.
DINO_TRANSFORMERS_IGNORED = ("pooler.", "vit.pooler.", "embeddings.mask_token", "vit.embeddings.mask_token")


def dino_from_transformers(state_dict):
    """A transformers `ViTModel` file (`facebook/dino-vits16`, keys optionally under `vit.`) -> our names."""
    prefix = "vit." if any(k.startswith("vit.") for k in state_dict) else ""
    n = _layer_count(state_dict, "encoder.layer.{i}.", prefix)
    return _apply(state_dict, _dino_transformers_rules(n), DINO_TRANSFORMERS_IGNORED, prefix, "transformers")
