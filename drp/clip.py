"""The CLIP ViT-L/14 text transformer: how Stable Diffusion 1.x reads the prompt.

The tokenizer turns a prompt into 77 token ids (BOS, the words, EOS, then EOS again as padding).
This model turns them into 77 vectors of 768 numbers, one per position, and the UNet attends to
all 77 of them through cross-attention. SD 1.x uses the *last hidden state*: the output of the
final LayerNorm at every position, not CLIP's pooled sentence embedding.

The network is a plain pre-LayerNorm GPT-style transformer: token + learned position embeddings,
12 layers of causal self-attention and an MLP, each wrapped as `x + f(LayerNorm(x))`.

Follows `Transformer` / `ResidualAttentionBlock` / `QuickGELU` of openai/CLIP
  https://github.com/openai/CLIP/blob/main/clip/model.py
as SD 1.x loads it through `FrozenCLIPEmbedder` of CompVis/stable-diffusion
  https://github.com/CompVis/stable-diffusion/blob/main/ldm/modules/encoders/modules.py
Parameter names are those of transformers' `CLIPTextModel` files (`text_model.encoder.layers.N...`),
so `text_encoder/model.safetensors` of a diffusers folder loads with no key map. The files also
hold `text_model.embeddings.position_ids`, which is just `arange(77)`; we compute it instead.

The evaluation harness (drp/evaluate/metrics.py) scores prompts against images with the same class,
sized from a CLIPModel's config.json (`CLIPConfig.from_transformers`; ViT-B/32's text tower is 512
wide) and with CLIP's own pooling and projection (`CLIPTextModelWithProjection`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .errors import DrpError

# transformers' CLIPTextConfig defaults (those of OpenAI's ViT-B/32), for keys a config.json leaves out
TEXT_DEFAULTS = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=512, num_hidden_layers=12,
                     num_attention_heads=8, intermediate_size=2048, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@dataclass(frozen=True)
class CLIPConfig:
    """Shape of the text encoder; the defaults are CLIP ViT-L/14's, as used by SD 1.x."""

    vocab_size: int = 49408  # 2×256 byte tokens + 48894 BPE merges + BOS (49406) and EOS (49407)
    max_len: int = 77  # the context length CLIP was trained with
    dim: int = 768
    layers: int = 12
    heads: int = 12  # 64 channels per head
    mlp_dim: int = 3072  # 4 × dim

    @classmethod
    def tiny(cls):
        """A small configuration for tests; vocabulary and context length stay real."""
        return cls(dim=128, layers=2, heads=2, mlp_dim=256)

    @classmethod
    def from_transformers(cls, config):
        """A transformers config.json dict: a CLIPTextConfig, or a CLIPModel's (its text half).

        Any size of OpenAI's CLIPs: ViT-B/32's text tower is 512 wide with 8 heads, L/14's (SD's) 768
        with 12. Keys a file leaves out take transformers' defaults, as transformers reads them.
        """
        text = (config.get("text_config") or {}) if config.get("model_type") == "clip" else config
        c = {**TEXT_DEFAULTS, **text}
        if c["hidden_act"] != "quick_gelu" or float(c["layer_norm_eps"]) != 1e-5:
            raise DrpError(f"this CLIP text config uses {c['hidden_act']} and LayerNorm eps {c['layer_norm_eps']}; "
                           "drp's text encoder is OpenAI CLIP's (quick_gelu, eps 1e-5).")
        return cls(vocab_size=c["vocab_size"], max_len=c["max_position_embeddings"], dim=c["hidden_size"],
                   layers=c["num_hidden_layers"], heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"])


def quick_gelu(x):
    """GELU(x) = x·Φ(x) approximated as x·σ(1.702x).

    1.702 is the scale at which the logistic sigmoid best matches the normal CDF Φ (Hendrycks &
    Gimpel, "Gaussian Error Linear Units", 2016). OpenAI trained CLIP with this approximation, so
    its weights expect exactly it; the exact GELU gives slightly different embeddings.
    """
    return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention: each token sees itself and the tokens before it."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)

    def split_heads(self, x):
        return rearrange(x, "b n (h d) -> b h n d", h=self.heads)

    def forward(self, x):
        q = self.split_heads(self.q_proj(x))
        k = self.split_heads(self.k_proj(x))
        v = self.split_heads(self.v_proj(x))
        # Causal even for the padding: SD passes no padding mask, so every position, padding
        # included, attends to all real tokens before it, and the UNet sees all 77 outputs.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    """The position-wise feed-forward network: widen ×4, QuickGELU, narrow back."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """One pre-LayerNorm transformer layer: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.dim, eps=1e-5)  # eps 1e-5: CLIP's (and PyTorch's) default
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.dim, eps=1e-5)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x


class CLIPTextModel(nn.Module):
    """The CLIP text transformer; returns the final-LayerNorm hidden state of every position."""

    # The token table (49,408 × 768) is only ever read 77 rows at a time. `drp.load` leaves it in the
    # files' dtype when the compute dtype holds every value of it (fp16 files, fp32 compute: 72 MiB
    # less), and `forward` casts the rows it looks up, which gives the same numbers as casting the table.
    lookup_tables = ("text_model.embeddings.token_embedding.weight",)

    def __init__(self, cfg: CLIPConfig = CLIPConfig()):
        super().__init__()
        self.cfg = cfg
        # nested dicts only to reproduce the checkpoint's key paths under "text_model."
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=nn.Embedding(cfg.vocab_size, cfg.dim),
                position_embedding=nn.Embedding(cfg.max_len, cfg.dim),
            )),
            encoder=nn.ModuleDict(dict(
                layers=nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.layers)]),
            )),
            final_layer_norm=nn.LayerNorm(cfg.dim, eps=1e-5),
        ))

    def forward(self, tokens):
        """tokens (B, 77) int64 -> last hidden state (B, 77, dim)."""
        if tokens.dim() != 2 or tokens.shape[1] > self.cfg.max_len:
            raise DrpError(f"the text encoder takes token ids of shape (batch, {self.cfg.max_len}), "
                           f"got {tuple(tokens.shape)}; tokenize the prompts with drp's Tokenizer.")
        m = self.text_model
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = m.embeddings.position_embedding(positions)
        x = m.embeddings.token_embedding(tokens).to(x.dtype) + x
        for layer in m.encoder.layers:
            x = layer(x)
        return m.final_layer_norm(x)


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIP's text embedding, as CLIP scores text against images: the first end-of-text token, projected.

    The last hidden state at the first `<|endoftext|>` (49407) sums up the prompt: attention is causal, so
    it is the first position that has seen every word. `text_projection` (no bias) maps it into the space
    the image tower projects into. Names are those of a transformers `CLIPModel` file, whose text half
    (`text_model.*`, `text_projection.weight`) loads with no map.
    """

    def __init__(self, cfg: CLIPConfig = CLIPConfig(), projection_dim: int = 768):
        super().__init__(cfg)
        self.text_projection = nn.Linear(cfg.dim, projection_dim, bias=False)

    def embed(self, tokens, eos_id=49407):
        """tokens (B, 77) from the tokenizer -> text embeddings (B, projection_dim), not normalised."""
        is_eos = tokens == eos_id
        if not is_eos.any(dim=1).all():
            raise DrpError("every row of token ids needs an end-of-text token (49407); tokenize with drp's Tokenizer.")
        first_eos = is_eos.int().argmax(dim=1)  # argmax returns the first of equal maxima
        hidden = self(tokens)  # (B, 77, dim)
        pooled = hidden[torch.arange(tokens.shape[0], device=tokens.device), first_eos]  # (B, dim)
        return self.text_projection(pooled)
