"""DRP-Diff: dual-reference personalization as attention hooks (the design of ALGORITHM.md).

A generated image borrows from two pictures: the *subject* of a customized reference (this cat) and
the *look* of a style reference (this painting), while the prompt keeps deciding the rest. Both
references are DDIM-inverted once (`prepare`); during sampling each is *replayed* as one extra row
of the UNet batch, so at every injected self-attention layer its keys/values of the current step
are at hand. The hook of each step then lets the generated rows see a chosen part of them:

    early stage  (i < N_e): queries see [own ; content foreground ; style foreground]
    late stage  (i ≥ N_e): queries AdaIN'd to the style background, then
                            subject queries    see [own ; content foreground ; style background]
                            background queries see [own ; style background]

Reference tokens are *gathered* by mask (fewer keys, one dense attention call), never masked with
−∞. The inversion and caption encoding are the sampler's (`drp/sampling.py`), masks come from the
model itself (`drp/masks.py`), the switch step N_e from the references' entropies (`drp/entropy.py`).
The loop (`drp/pipeline.py`) imports this file; this file never imports the loop. Nothing is stored
on the model: each step gets a fresh hook object.
"""

import math
import time
import warnings
from dataclasses import dataclass

import torch

from . import cache, entropy, masks
from .attention import Attended, attend, attention_probs
from .errors import DrpError
from .images import fit, load_image, load_mask
from .method_common import (check_switch_step, entropy_switch, make_options, reference_name, subject_positions,
                            subject_tokens as find_subject)
from .sampling import TRAJECTORY_DTYPE, encode_text, invert
from .unet import under

USER_MASK = "user mask"
NO_BACKGROUND = "whole image (no background found)"  # §2: the late stage's fallback, named in the report
ADAIN_MIN_TOKENS = 16  # §3: fewer style-background tokens than this at a grid: AdaIN statistics over all of them


@dataclass(frozen=True)
class Options:
    """The knobs of DRP-Diff; the defaults are ALGORITHM.md's."""

    layers: tuple = ("up_blocks.2", "up_blocks.3")  # blocks whose self-attention (attn1) is injected
    use_masks: bool = True  # False: every reference token everywhere (StyleAligned-like concatenation)
    fixed_switch: bool = False  # True: α = 0.5 whatever the entropies
    content_bias: float = math.log(2)  # early-stage logit bias on content tokens (StyleAligned's shift)
    adain: bool = True  # late stage: AdaIN of queries/keys to the style background
    share_uncond: bool = True  # the unconditional CFG rows see the references too
    style_caption: str = ""  # the caption the style reference is inverted with
    cache_dir: object = None  # where trajectories are kept (None: cache.default_cache_dir())
    use_cache: bool = True
    mask_layers: tuple = ("down_blocks.2", "up_blocks.1")  # the 16×16 cross-attention (at 512 px)
    self_layer: str = "up_blocks.2.attentions.2.transformer_blocks.0.attn1"  # the 32×32 self-attention S
    record_t: tuple = (200, 800)  # inversion steps whose attention makes the masks
    gen_mask_warmup: int = 5  # steps before the generated subject mask is trusted
    gen_mask_threshold: float = 0.3


def in_layers(name, prefixes):
    return any(under(name, p) for p in prefixes)


class Recorder:
    """An inversion hook that averages the maps the masks are made of (ALGORITHM §2); outputs unchanged."""

    def __init__(self, opts, tokens):
        self.opts, self.tokens = opts, tokens  # subject token positions in the caption, or None
        self.cross, self.cross_n, self.self_attn, self.self_n, self.grid = 0, 0, 0, 0, None

    def __call__(self, attn, q, k, v, call):
        if call.is_cross and self.tokens and in_layers(call.name, self.opts.mask_layers):
            p = attention_probs(q, k)[..., self.tokens].mean(dim=(1, 3))  # (1, N): heads and words
            self.cross = self.cross + p.reshape(call.hw)
            self.cross_n += 1
        elif call.name == self.opts.self_layer:
            self.self_attn = self.self_attn + attention_probs(q, k).mean(dim=1)[0]  # (N, N) over heads
            self.self_n += 1
            self.grid = call.hw
        return attend(q, k, v)


@dataclass
class Reference:
    """One prepared reference: its replayed trajectory, caption context and foreground mask."""

    kind: str  # "content" or "style"
    latents: torch.Tensor  # (steps, 1, 4, h, w)
    context: torch.Tensor  # (1, 77, C)
    mask: torch.Tensor  # (H, W) float 0/1 at image resolution: the foreground
    entropy: float
    rule: str  # which rule made the mask
    cached: bool
    seconds: float = 0.0  # time spent inverting (0 when read from the cache)


def recording(opts, tokens):
    """What, besides the picture, caption, steps, size, weights and dtype, decides what a cache entry holds (§1)."""
    return dict(record_t=list(opts.record_t), mask_layers=list(opts.mask_layers), self_layer=opts.self_layer,
                subject_tokens=tokens, latents_dtype=str(TRAJECTORY_DTYPE))  # no tokens: no cross-attention map


def prepare_reference(sd, kind, image, caption, tokens, user_mask, steps, height, width, opts, progress):
    """Invert (or read from the cache) one reference and find its foreground (`user_mask`: a loaded mask or None)."""
    img = load_image(image, f"{kind} reference")
    fitted = fit(img, width, height)
    weights_id = (sd.source or {}).get("sha256")
    use_cache = opts.use_cache and weights_id is not None  # weights of unknown origin: never share entries
    key = cache.cache_key(fitted, caption, steps, width, height, weights_id, sd.dtype, recording(opts, tokens))
    folder = opts.cache_dir or cache.default_cache_dir()
    stored = cache.load(folder, key) if use_cache else None
    cached = stored is not None
    context = encode_text(sd, [caption])  # (1, 77, C): for the inversion and for replaying it
    start = time.perf_counter()
    if stored is None:
        recorder = Recorder(opts, tokens)
        lo, hi = opts.record_t
        trajectory = invert(sd, fitted, caption, steps, height, width, progress=progress, context=context,
                            hook_for_step=lambda k, t: recorder if lo <= t <= hi else None)
        stored = {"latents": trajectory.latents}
        if recorder.self_n:
            stored["self_attn"] = recorder.self_attn / recorder.self_n
            stored["grid"] = torch.tensor(recorder.grid)
        if recorder.cross_n:
            stored["cross"] = recorder.cross / recorder.cross_n
        if use_cache:
            try:
                cache.save(folder, key, stored, {"kind": kind, "caption": caption})
            except DrpError as e:  # a cache that cannot be written must not throw the inversion away
                warnings.warn(f"the {kind} reference was not cached: {e}", stacklevel=4)
    seconds = time.perf_counter() - start if not cached else 0.0

    if user_mask is not None:
        mask, rule = user_mask, USER_MASK
    elif not opts.use_masks:
        mask, rule = torch.ones(height, width), "no masks (ablation)"
    elif "self_attn" not in stored:  # too few steps fell inside record_t to make a mask
        mask, rule = torch.ones(height, width), "everything (no attention recorded)"
    else:
        cross = masks.normalise(stored["cross"]) if "cross" in stored else None
        grid = tuple(stored["grid"].tolist())
        fg, rule = masks.foreground_mask(cross, stored["self_attn"].float(), grid)
        mask = masks.upsample_mask(fg.float(), (height, width))
    return Reference(kind, stored["latents"].to(sd.device), context, mask, entropy.image_entropy(img), rule,
                     cached, seconds)


class DualReference:
    """The prepared references of one generation, and the hook of each sampling step."""

    def __init__(self, refs, opts, batch, subject_tokens, switch_step, report):
        self.refs, self.opts, self.batch = refs, opts, batch
        self.subject_tokens = subject_tokens  # per prompt: positions of the subject in the prompt, or None
        self.switch_step = switch_step
        self.context = torch.cat([r.context for r in refs.values()])  # (R, 77, C)
        self._report, self._index, self.generated_mask = report, {}, None

    def latents_at(self, i):
        """The replayed reference rows of step i: the stored inversion latents, (R, 4, h, w)."""
        return torch.cat([r.latents[i] for r in self.refs.values()])

    def hook(self, i, late):
        return StepHook(self, i, late)

    def step_inputs(self, i, late, x_in, text):
        """The UNet's input, text and hook at step i: the replayed reference rows join the batch."""
        return torch.cat([x_in, self.latents_at(i)]), torch.cat([text, self.context]), self.hook(i, late)

    def tokens(self, kind, part, hw):
        """Indices of a reference's foreground ("fg"), background ("bg") or "all" tokens at grid hw."""
        key = (kind, part, hw)
        if key not in self._index:
            ref = self.refs[kind]
            fg = masks.resize_mask(ref.mask, hw).flatten() > 0.5
            chosen = fg if part == "fg" else ~fg
            if part == "all" or not self.opts.use_masks:
                chosen = torch.ones_like(fg)
            elif part == "bg" and not chosen.any() and ref.rule != USER_MASK:
                chosen = torch.ones_like(fg)  # §2: an automatic mask must not switch the late stage off
                self.no_background(kind, hw)
            self._index[key] = chosen.nonzero().squeeze(1).to(self.context.device)
        return self._index[key]

    def no_background(self, kind, hw):
        """Say, once per run, that the whole reference stands in for its background (ALGORITHM.md §2)."""
        if self._report["mask_rule"].get(kind) != NO_BACKGROUND:
            self._report["mask_rule"][kind] = NO_BACKGROUND
            warnings.warn(f"the automatic {kind} mask leaves no background at the {hw[0]}×{hw[1]} attention grid; "
                          f"the late stage takes the whole {kind} reference as its background there.", stacklevel=2)

    def report(self):
        report = dict(self._report, mask_rule=dict(self._report["mask_rule"]))
        if self.generated_mask is not None:  # one coverage per generated image
            report["coverage"] = dict(report["coverage"], generated=self.generated_mask.mean(dim=(1, 2)).tolist())
        return report

    def masks(self):
        out = {kind: r.mask for kind, r in self.refs.items()}
        if self.generated_mask is not None:  # the last step's subject mask of each image, at image resolution
            size = next(iter(out.values())).shape
            out["generated"] = torch.stack([masks.upsample_mask(m, size) for m in self.generated_mask])
        return out


def adain(x, ref):
    """Give x (B, h, N, d) the per-head, per-channel mean/std over tokens of ref (1, h, M, d)."""
    def stats(t):
        t = t.float()
        return t.mean(dim=2, keepdim=True), (t.var(dim=2, keepdim=True, unbiased=False) + 1e-5).sqrt()

    mx, sx = stats(x)
    mr, sr = stats(ref)
    return ((x.float() - mx) / sx * sr + mr).to(x.dtype)


class StepHook:
    """The attention hook of one sampling step: records the subject's cross-attention, injects references."""

    def __init__(self, method, step, late):
        self.m, self.step, self.late = method, step, late
        self.cross, self.cross_n, self._gen = 0, 0, {}

    def __call__(self, attn, q, k, v, call):
        m, g = self.m, 2 * self.m.batch  # rows: g generated (unconditional, conditional), then references
        if call.is_cross:
            if self.step >= m.opts.gen_mask_warmup and in_layers(call.name, m.opts.mask_layers):
                self.record_subject(q[m.batch : g], k[m.batch : g], call.hw)
            return attend(q, k, v)
        if not self.injects(call):
            return attend(q, k, v)
        start = 0 if m.opts.share_uncond else m.batch  # rows before `start` attend as in plain SD
        plain = [attend(q[:start], k[:start], v[:start])] if start else []
        injected = self.inject(q[start:g], k[start:g], v[start:g], k[g:], v[g:], q[g:], call.hw)
        replayed = attend(q[g:], k[g:], v[g:])  # the references attend to themselves, as when inverted
        return torch.cat(plain + [injected, replayed])

    def injects(self, call):
        """Whether this layer is one whose self-attention sees the references."""
        return not call.is_cross and call.name.endswith("attn1") and in_layers(call.name, self.m.opts.layers)

    def softmaxes(self, attn, q, k, v, call):
        """The generated rows' injected softmaxes, laid open (`attention.Attended`, for drp/attention_maps.py)
        from the same `attended` as `inject`; [] where nothing is injected."""
        if not self.injects(call):
            return []
        g, start = 2 * self.m.batch, 0 if self.m.opts.share_uncond else self.m.batch
        q, fore, back, fg = self.attended(q[start:g], k[start:g], v[start:g], k[g:], v[g:], q[g:], call.hw)
        sets = [(fore, fg)] + ([(back, ~fg)] if back is not None else [])  # subject queries, then the others
        return [Attended(q, s.k, range(start, g), s.labels, s.bias, served) for s, served in sets]

    def record_subject(self, q, k, hw):
        """Accumulate the prompt's subject cross-attention of the conditional rows: (B, h', w')."""
        maps = []
        for b, tokens in enumerate(self.m.subject_tokens):
            if tokens is None:
                return
            maps.append(attention_probs(q[b : b + 1], k[b : b + 1])[..., tokens].mean(dim=(1, 3)).reshape(hw))
        self.cross = self.cross + torch.stack(maps)
        self.cross_n += 1

    def generated_foreground(self, hw, rows):
        """M_gen at grid hw as (rows, N) bool, or None while every query counts as foreground."""
        if not self.cross_n:
            return None
        if hw not in self._gen:
            maps = [masks.normalise(c) >= self.m.opts.gen_mask_threshold for c in self.cross / self.cross_n]
            fine = torch.stack([masks.resize_mask(mk.float(), hw) for mk in maps])  # (B, h, w)
            self.m.generated_mask = torch.stack(maps).float()  # (B, h', w'): every image's subject
            self._gen[hw] = fine
        fine = self._gen[hw].flatten(1) > 0.5  # (B, N); the unconditional and conditional rows share it
        return torch.cat([fine] * (rows // fine.shape[0]))

    def inject(self, q, k, v, k_ref, v_ref, q_ref, hw):
        """DRP-Diff attention for the generated rows q/k/v (G, h, N, d) given the reference rows."""
        q, fore, back, fg = self.attended(q, k, v, k_ref, v_ref, q_ref, hw)
        if fg is None:  # every query sees the same keys
            return attend(q, fore.k, fore.v, fore.bias)
        return attend_split(q, fg, (fore.k, fore.v), (back.k, back.v))

    def attended(self, q, k, v, k_ref, v_ref, q_ref, hw):
        """What the generated queries attend to (ALGORITHM.md §3), as (q, fore, back, fg): the queries (AdaIN'd
        in the late stage), the `Keys` of the subject's queries and of the others, and the subject mask fg
        (rows, N) bool; fg and back are None when every query sees `fore`."""
        m, rows = self.m, q.shape[0]
        index = {kind: j for j, kind in enumerate(m.refs)}

        def part(kind, which, t):  # a reference's fg/bg tokens, repeated for every generated row
            return t[index[kind] : index[kind] + 1][:, :, m.tokens(kind, which, hw)].expand(rows, -1, -1, -1)

        has_cu, has_st = "content" in m.refs, "style" in m.refs
        if not self.late:
            ks, vs, bias, labels = [k], [v], [torch.zeros(k.shape[2])], {}
            for kind, b in (("content", m.opts.content_bias), ("style", 0.0)):
                if kind in m.refs:
                    ks.append(part(kind, "fg", k_ref))
                    vs.append(part(kind, "fg", v_ref))
                    labels[kind] = following(ks[:-1], ks[-1])
                    bias.append(torch.full((ks[-1].shape[2],), b))
            bias = torch.cat(bias).to(q.device, q.dtype)[None]  # (1, M): the same for every query
            return q, Keys(torch.cat(ks, dim=2), torch.cat(vs, dim=2), labels, bias if bias.any() else None), None, None

        if has_st:  # late stage: the style's background is the texture source
            k_bg, v_bg = part("style", "bg", k_ref), part("style", "bg", v_ref)
            if m.opts.adain:  # statistics of the background, or of every style token when it is a handful (§3)
                stats = "bg" if k_bg.shape[2] >= ADAIN_MIN_TOKENS else "all"
                q = adain(q, part("style", stats, q_ref)[:1])
                k = adain(k, part("style", stats, k_ref)[:1])
            back = Keys(torch.cat([k, k_bg], dim=2), torch.cat([v, v_bg], dim=2), {"style": following([k], k_bg)})
        else:
            back = Keys(k, v, {})
        if not has_cu:  # style only: every query sees [own ; style background]
            return q, back, None, None
        k_cu = part("content", "fg", k_ref)
        fore = Keys(torch.cat([back.k, k_cu], dim=2), torch.cat([back.v, part("content", "fg", v_ref)], dim=2),
                    dict(back.labels, content=following([back.k], k_cu)))
        fg = self.generated_foreground(hw, rows)  # None: every query counts as the subject
        return q, fore, None if fg is None else back, fg


@dataclass
class Keys:
    """What some generated queries attend to at one layer: their own keys, then reference tokens."""

    k: torch.Tensor  # (rows, h, M, d), and v alike
    v: torch.Tensor
    labels: dict  # {"content"/"style": slice of the key axis}: which keys are that reference's
    bias: object = None  # (1, M) logit bias, or None


def following(before, t):
    """The slice of the key axis that `t` takes when concatenated after the tensors `before` (dim 2)."""
    start = sum(x.shape[2] for x in before)
    return slice(start, start + t.shape[2])


def attend_split(q, fg, fore, back):
    """Subject queries (fg, (rows, N) bool) attend to the `fore` keys/values, the others to `back`.

    The same as blending the two full attention outputs by the binary mask, at about half the cost:
    each query is computed once, against the key set it is allowed to see.
    """
    out = torch.empty_like(q)
    for r in range(q.shape[0]):
        for chosen, (k, v) in ((fg[r], fore), (~fg[r], back)):
            idx = chosen.nonzero().squeeze(1)
            if len(idx):
                out[r : r + 1, :, idx] = attend(q[r : r + 1, :, idx], k[r : r + 1], v[r : r + 1])
    return out


def prepare(sd, prompts, content=None, style=None, subject=None, content_mask=None, style_mask=None,
            switch_step=None, steps=50, height=512, width=512, progress=True, timings=None, **options):
    """Everything DRP-Diff needs before sampling, or None when there is no reference (plain text-to-image)."""
    if "layers" in options and isinstance(options["layers"], str):
        options["layers"] = tuple(s.strip() for s in options["layers"].split(",") if s.strip())
    opts = make_options(Options, options, "self-attention")
    if not opts.use_masks and (content_mask is not None or style_mask is not None):
        raise DrpError("use_masks=False (--no-masks) gives every reference token to every query, so it cannot "
                       "take a user mask; drop the mask or the ablation.")
    if subject is not None and content is None:  # no subject is placed, so no generated subject mask either
        in_caption = style is not None and subject_positions(sd, opts.style_caption, subject) is not None
        warnings.warn("a subject was given without a content reference, so nothing uses it"
                      + (" but the style mask (it is a word of the style caption)" if in_caption else "")
                      + "; give a content reference too, or leave the subject out.", stacklevel=3)
    if content is None and style is None:
        return None
    check_switch_step(switch_step, steps)

    # per prompt, the subject's token positions; only a content reference's subject is looked for
    subject_tokens = find_subject(sd, prompts, subject if content is not None else None)
    if content is not None and not subject:
        warnings.warn("no subject was given: the content reference's foreground is guessed from its borders; "
                      "pass subject= (the word naming it in the prompt) for a better mask.", stacklevel=3)

    start, refs = time.perf_counter(), {}
    for kind, image, user_mask in (("content", content, content_mask), ("style", style, style_mask)):
        if image is None:
            continue
        caption = f"a photo of a {subject}" if kind == "content" and subject else (
            "a photo" if kind == "content" else opts.style_caption)
        tokens = subject_positions(sd, caption, subject) if subject else None
        if user_mask is not None:
            user_mask = load_mask(user_mask, width, height, f"{kind} mask")
            if not user_mask.any():  # before inverting it: a reference that selects nothing costs nothing
                warnings.warn(f"the {kind} mask is all black: it selects nothing, so the {kind} reference is "
                              "ignored.", stacklevel=3)
                continue
        ref = prepare_reference(sd, kind, image, caption, tokens, user_mask, steps, height, width, opts, progress)
        coverage = float(ref.mask.mean())
        if coverage == 1 and user_mask is not None:
            warnings.warn(f"the {kind} mask is all white: the whole {kind} reference counts as foreground"
                          + (", so no style background is left for the late stage." if kind == "style" else "."),
                          stacklevel=3)
        refs[kind] = ref
    if timings is not None:  # "references" includes "inversion", and the masks and entropies
        timings["inversion"] = sum(r.seconds for r in refs.values())
        timings["references"] = time.perf_counter() - start
    if not refs:
        return None

    h_cu = refs["content"].entropy if "content" in refs else None
    h_st = refs["style"].entropy if "style" in refs else None
    report = dict(subject=subject, content=reference_name(content) if "content" in refs else None,
                  style=reference_name(style) if "style" in refs else None,
                  **entropy_switch(h_cu, h_st, steps, switch_step, opts.fixed_switch),
                  coverage={k: float(r.mask.mean()) for k, r in refs.items()},
                  mask_rule={k: r.rule for k, r in refs.items()}, cached={k: r.cached for k, r in refs.items()},
                  layers=list(opts.layers))
    return DualReference(refs, opts, len(prompts), subject_tokens, report["switch_step"], report)
