"""Attention maps: where in the image each word of the prompt, and each DRP-Diff reference, acts.

    r = drp.generate(sd, "a cat on a beach", content="cat.png", style="painting.jpg", subject="cat",
                     attention_maps=["cat", "beach", "content", "style"])
    r.attention_maps["style"]["late"]        # float32 (B, H/32, W/32) on the CPU: 16×16 at 512 px

This file is also the worked example of a hook that *reads* attention (docs/HOOKS.md). Each step, the
loop (drp/pipeline.py) wraps the hook the step already has — none, the image prompt's, a DRP-Diff
stage's — in `attention.Watched`, which returns that hook's output untouched and shows the call to
`StepRecorder`: the UNet and the methods do not know it is there, no pixel changes, and nothing is
left on the model. It keeps running sums only: one (B, h, w) map per name for the step, and one per
name and stage over the steps.

What a map is (the definition the tests check):

  grid       the tokens of the UNet level whose latent is downsampled 4×, down_blocks.2 and up_blocks.1
             (`MAP_LEVEL`): H/32 × W/32, rounded up as the stride-2 convolutions round. The mid block
             is coarser and left out.
  a word     (or phrase) of the prompt: the conditional rows' cross-attention (attn2) probability summed
             over the word's tokens — every BPE token of every occurrence of it in the text the row
             reads at that step — averaged over the heads and the attn2 layers at the grid. Each row
             reads its own prompt; a row whose text lacks the word scores 0. In the IP-Adapter mode the
             early stage reads C_bg, which lacks the subject's words: they score 0 in those steps.
  "content", "style"   the share of each generated (conditional) query's attention mass that falls on
             that reference's tokens, in the softmax the method's hook really computes (its `softmaxes`):
             IP-Adapter mode  the image softmax (over every image token of the stage's group) at the attn2
                              layers at the grid where the image attention acts (ip_layers, scale ≠ 0);
                              a reference left out of the stage's group scores 0;
             self-attention   the injected attn1 softmax (own tokens and the reference tokens the stage
                              lets in, with its bias and AdaIN) at the injected level nearest the grid —
                              up_blocks.2 (32×32 at 512 px) for the default layers, the finer one on a
                              tie — area-resized to the grid.
  stages     "all": the mean over every step; with DRP-Diff also "early" and "late", over each stage's
             steps. A step's map is the mean over its recorded layers (0 without any), a stage without
             steps gives 0.

Names are checked before any work (`check_names`). "content" and "style", in lower case, name the
references; "Style" or "STYLE" is the word (the tokenizer lower-cases it).
"""

import numpy as np
import torch
import torch.nn.functional as F

from .attention import Watched, attention_probs
from .dual_reference import DualReference
from .dual_reference_ip import DualReferenceIP
from .errors import DrpError
from .files import write_atomically
from .tokenizer import CONTEXT_LENGTH
from .unet import grid_at, level_of

REFERENCES = ("content", "style")
MAP_LEVEL = 2  # the UNet level downsampled 4× (16×16 tokens at 512 px): where layout and words meet
STAGES = ("all", "early", "late")


def parse_names(names):
    """A list of names from a comma-separated string or a list; empty ones and repeats dropped."""
    if names is None:
        return []
    if isinstance(names, str):
        names = names.split(",")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise DrpError(f"attention_maps must be a list of words of the prompt (or \"content\"/\"style\"), "
                       f"got {names!r}.")
    return list(dict.fromkeys(n.strip() for n in names if n.strip()))


def word_positions(tokenizer, text, word):
    """Positions (in the 77-token row, BOS at 0) of every token of every occurrence of `word` in `text`."""
    ids, w = tokenizer.encode(text), tokenizer.encode(word)
    found = {1 + start + j for start in range(len(ids) - len(w) + 1) if w and ids[start : start + len(w)] == w
             for j in range(len(w))}
    return sorted(p for p in found if p < CONTEXT_LENGTH - 1)  # the row keeps 75 prompt tokens, then EOS


def check_names(tokenizer, prompts, names, content=False, style=False):
    """The names to map, checked before any work: words of some prompt, or references that are given."""
    names = parse_names(names)
    given = {"content": content, "style": style}
    for name in names:
        if name in REFERENCES:
            if not given[name]:
                raise DrpError(f"the attention map {name!r} names the {name} reference, which this run does not "
                               f"have; give {name}= (--{name}), or write {name.capitalize()!r} for the word.")
        elif not any(word_positions(tokenizer, p, name) for p in prompts):
            words = " ".join(dict.fromkeys(repr(w) for p in prompts for w in p.split()))
            raise DrpError(f"the attention map {name!r} is not a word of the prompt ({words}); name words of "
                           "the prompt, or content/style for the references.")
    return names


def reference_level(method, levels):
    """The level whose attention shows the references: the map's own, or in the self-attention mode the
    injected level nearest it (the finer of two equally near)."""
    if not isinstance(method, DualReference):
        return MAP_LEVEL
    injected = {level_of(block, levels) for block in method.opts.layers}
    return min(injected, key=lambda level: (abs(level - MAP_LEVEL), level))


class AttentionMaps:
    """The maps of one generation: a watcher for each step's hook, and the running sums over steps."""

    def __init__(self, sd, prompts, names, method, height, width):
        levels = len(sd.unet.cfg.channels)
        self.names, self.batch, self.levels = names, len(prompts), levels
        self.grid = grid_at(MAP_LEVEL, height, width)
        self.ref_level = reference_level(method, levels)
        self.stages = STAGES if method is not None else STAGES[:1]
        # the text each conditional row reads, per stage (late: True): C_bg in the IP-Adapter mode's early stage
        early = method.bg_prompts if isinstance(method, DualReferenceIP) and method.bg_prompts else prompts
        words = [n for n in names if n not in REFERENCES]
        self.tokens = {late: token_weights(sd.tokenizer, texts, words)  # {late: {word: (B, 77)}}
                       for late, texts in ((False, early), (True, prompts))}
        self.refs = [n for n in names if n in REFERENCES]
        self.totals = {stage: {n: torch.zeros(self.batch, *self.grid) for n in names} for stage in self.stages}
        self.steps = dict.fromkeys(self.stages, 0)
        self.current = None

    def hook(self, late, hook):
        """The hook of the next step: `hook` (None: plain attention) watched by a new StepRecorder."""
        self.end_step()
        self.current = StepRecorder(self, late)
        return Watched(hook, self.current)

    def end_step(self):
        """Add the last step's maps to the sums of "all" and of its stage."""
        if self.current is None:
            return
        stages = ["all"] + (["late" if self.current.late else "early"] if len(self.stages) > 1 else [])
        for name in self.names:
            m = self.current.step_map(name, self.grid)
            for stage in stages:
                self.totals[stage][name] += m
        for stage in stages:
            self.steps[stage] += 1
        self.current = None

    def result(self):
        """{name: {stage: (B, h, w) float32 on the CPU}}: each stage's mean over its steps."""
        self.end_step()
        return {name: {stage: self.totals[stage][name] / max(self.steps[stage], 1) for stage in self.stages}
                for name in self.names}


def token_weights(tokenizer, texts, words):
    """{word: (B, 77) float}: 1 at the word's tokens in each row's text, 0 elsewhere."""
    weights = {}
    for word in words:
        w = torch.zeros(len(texts), CONTEXT_LENGTH)
        for row, text in enumerate(texts):
            w[row, word_positions(tokenizer, text, word)] = 1.0
        weights[word] = w
    return weights


class StepRecorder:
    """The watcher of one step's attention: per name, the sum of its recorded layers' maps and their number."""

    def __init__(self, maps, late):
        self.maps, self.late = maps, late
        self.sums, self.layers = {}, {}

    def __call__(self, attn, q, k, v, call, hook):
        m = self.maps
        level = level_of(call.name, m.levels)
        if call.is_cross and level == MAP_LEVEL:  # (the mid block is the deepest level, never MAP_LEVEL)
            self.record_words(q, k, call.hw)
        if m.refs and level == m.ref_level and hasattr(hook, "softmaxes"):
            self.record_references(hook.softmaxes(attn, q, k, v, call), call.hw)

    def record_words(self, q, k, hw):
        """attn2: each word's probability in the conditional rows, summed over its tokens, mean over heads."""
        words = self.maps.tokens[self.late]
        if not words:
            return
        cond = slice(self.maps.batch, 2 * self.maps.batch)  # rows: unconditional, conditional, (references)
        p = attention_probs(q[cond], k[cond])  # (B, h, N, 77)
        for word, weights in words.items():
            self.add(word, torch.einsum("bhnm,bm->bn", p, weights.to(p.device)) / p.shape[1], hw)

    def record_references(self, softmaxes, hw):
        """Each reference's share of the conditional queries' attention mass, summed over the softmaxes that
        serve them (a query is served by one of them, or by several separate ones, as IP-Adapter's groups)."""
        if not softmaxes:
            return  # this layer attends to no reference
        b, heads, device = self.maps.batch, softmaxes[0].q.shape[1], softmaxes[0].q.device
        shares = {kind: torch.zeros(b, hw[0] * hw[1], device=device) for kind in self.maps.refs}
        for s in softmaxes:
            cond = slice(b - s.rows.start, 2 * b - s.rows.start)  # the conditional rows among s.rows
            served = 1.0 if s.queries is None else s.queries[cond].float()
            for h in range(heads):  # one head at a time: (B, N, M) weights, 1/heads of the memory
                p = attention_probs(s.q[cond, h], s.k[cond, h], s.bias)  # (B, N, M)
                for kind in self.maps.refs:
                    if kind in s.labels:
                        shares[kind] += p[..., s.labels[kind]].sum(dim=-1) * served / heads
        for kind, share in shares.items():
            self.add(kind, share, hw)

    def add(self, name, m, hw):
        """One layer's map (B, N) of `name` at grid hw, added to the step's sum."""
        self.sums[name] = self.sums.get(name, 0) + m.float().cpu().reshape(-1, *hw)
        self.layers[name] = self.layers.get(name, 0) + 1

    def step_map(self, name, grid):
        """The step's map of `name`: the mean over its layers, area-resized to `grid`; 0 without layers."""
        if name not in self.sums:
            return torch.zeros(self.maps.batch, *grid)
        m = self.sums[name] / self.layers[name]
        return m if m.shape[-2:] == grid else F.interpolate(m[:, None], size=grid, mode="area")[:, 0]


def save_npz(path, maps, index):
    """Image `index`'s maps as a .npz file (one (h, w) float32 array per "name/stage"), written atomically."""
    arrays = {f"{name}/{stage}": m[index].numpy() for name, stages in maps.items() for stage, m in stages.items()}

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to the temporary name
            np.savez_compressed(f, **arrays)

    return write_atomically(path, write, "choose a writable folder.")
