"""Multi-head attention for the UNet, and the one extension point of the project: the hook.

Every attention layer of the UNet (self-attention `attn1` and cross-attention `attn2` in each
transformer block) projects its input to queries, keys and values, and then *attends*. The
attend step is the place where methods such as DRP-Diff, StyleAligned or prompt-to-prompt change
Stable Diffusion, so it is split out:

    out = attend(q, k, v)                      # default: one fused kernel
    out = hook(attn, q, k, v, call)            # if a hook is given: anything you like

`q, k, v` are `(B, heads, tokens, head_dim)`; the hook returns the same layout as `q`. `call`
says which layer is asking (its dotted name in the checkpoint, whether it is cross-attention, and
the token grid of the queries), so a hook can decide per layer without any state on the module.
Adding reference keys/values is one `torch.cat` on the token axis (dim 2) before `attend`.

Hooks compose: `Watched(hook, watcher)` runs a hook (or plain attention for None) and shows every call
to a watcher that reads attention without changing it (drp/attention_maps.py); a hook that attends to
more than its `k` can lay each of its softmaxes open as `Attended` records through an optional method
`hook.softmaxes(attn, q, k, v, call)`, so that such a watcher sees the weights the hook really uses.
How to write one: docs/HOOKS.md.

Follows `CrossAttention` of CompVis/stable-diffusion (ldm/modules/attention.py); parameter names
are diffusers' (`to_q`, `to_k`, `to_v`, `to_out.0`).
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class AttnCall:
    """Which attention layer a hook is being called for."""

    name: str  # dotted module path, e.g. "up_blocks.2.attentions.1.transformer_blocks.0.attn1"
    is_cross: bool  # True for attn2 (queries from the image, keys/values from the text)
    hw: tuple  # (height, width) of the query token grid


Hook = Callable[["Attention", torch.Tensor, torch.Tensor, torch.Tensor, AttnCall], torch.Tensor]


def attend(q, k, v, bias=None):
    """softmax(q kᵀ / √d + bias) v with the fused kernel; shapes (B, h, N, d) and (B, h, M, d)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def attention_probs(q, k, bias=None):
    """The attention weights softmax(q kᵀ / √d + bias), (B, h, N, M), in fp32 for stability."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)


def attend_explicit(q, k, v, bias=None):
    """The same as `attend`, written out: for reading, and for methods that need the weights."""
    return (attention_probs(q, k, bias) @ v.float()).to(v.dtype)


@dataclass(frozen=True)
class Attended:
    """One softmax a hook computes, laid open: which keys some queries weigh, and whose keys they are.

    Its weights are `attention_probs(q, k, bias)`. A hook that attends to more than the layer's own
    keys (reference tokens, a second softmax over image tokens) returns one of these per softmax from
    `hook.softmaxes(attn, q, k, v, call)`, built by the same code as its forward pass.
    """

    q: torch.Tensor  # (R, h, N, d): the queries as this softmax sees them (after any change the hook makes)
    k: torch.Tensor  # (R, h, M, d): all of its keys
    rows: range  # which rows of the UNet batch q and k belong to
    labels: dict  # {source: slice of the key axis}, e.g. {"content": slice(64, 80)}: whose keys those are
    bias: Optional[torch.Tensor] = None  # (1, M): added to the logits of every row, head and query
    queries: Optional[torch.Tensor] = None  # (R, N) bool: the queries this softmax serves (None: all of them)


def plain_or(hook, attn, q, k, v, call):
    """What a layer computes under `hook`: the hook's output, or plain attention when `hook` is None."""
    return attend(q, k, v) if hook is None else hook(attn, q, k, v, call)


class Watched:
    """The hook `hook` (None: plain attention) with a watcher that sees every call and changes nothing.

    `watcher(attn, q, k, v, call, hook)` is called after the hook, and the hook's output is returned
    untouched: so a watcher (drp/attention_maps.py) cannot change a pixel. It gets `hook` to ask it
    for its `softmaxes` where the hook has them.
    """

    def __init__(self, hook, watcher):
        self.hook, self.watcher = hook, watcher

    def __call__(self, attn, q, k, v, call):
        out = plain_or(self.hook, attn, q, k, v, call)
        self.watcher(attn, q, k, v, call, self.hook)
        return out


def run_hook(hook, attn, q, k, v, call):
    """`hook(attn, q, k, v, call)`; after `keep_hooks_out_of_compile()`, outside torch.compile's graphs."""
    return hook(attn, q, k, v, call)


def keep_hooks_out_of_compile():
    """Makes every hook run as written, also inside a UNet under torch.compile (`UNet.compile`): the
    compiler then checks only a hook's type, so a sampling loop that makes a new hook every step
    compiles the UNet once per kind of hook, not once per step. Not done on import: wrapping with
    torch.compiler.disable imports the compiler (2.5 s and 70 MB)."""
    global run_hook
    if not getattr(run_hook, "keeps_out_of_compile", False):
        run_hook = torch.compiler.disable(run_hook)
        run_hook.keeps_out_of_compile = True


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections and an optional hook on the attend step."""

    def __init__(self, dim, context_dim=None, heads=8):
        super().__init__()
        self.heads = heads
        self.is_cross = context_dim is not None
        self.name = ""  # set by the owning model to the module's dotted path
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # "to_out.0" keeps the checkpoint key

    def split_heads(self, x):
        """(B, N, h·d) → (B, h, N, d): each head's channels on an axis of their own (views, no copy)."""
        return rearrange(x, "b n (h d) -> b h n d", h=self.heads)

    def forward(self, x, context=None, hw=None, hook: Optional[Hook] = None):
        context = x if context is None else context
        q = self.split_heads(self.to_q(x))
        k = self.split_heads(self.to_k(context))
        v = self.split_heads(self.to_v(context))
        if hook is None:
            out = attend(q, k, v)
        else:
            out = run_hook(hook, self, q, k, v, AttnCall(self.name, self.is_cross, tuple(hw or ())))
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))  # heads side by side again
