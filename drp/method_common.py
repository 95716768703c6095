"""What DRP-Diff's two modes share: choosing the mode, the subject, option checking, the entropy switch.

DRP-Diff exists here twice, in one family (STYLE.md, "Two modes, one family"):

    self-attention  drp/dual_reference.py     SD 1.5 alone: replayed inversions, masked self-attention
    ip-adapter      drp/dual_reference_ip.py  + IP-Adapter: image tokens in the cross-attention, an SVD split

Both read the same inputs (prompt, `subject`, `content`, `style`, `switch_step`), find the subject's
words in the prompt the same way, switch from the early to the late stage at the step the references'
entropies give (ALGORITHM.md §4, `drp/entropy.py`), refuse unknown knobs with the same sentence, and
report the same numbers (plus each mode's own).
"""

import math
import os
from dataclasses import fields
from pathlib import Path

from . import entropy
from .errors import DrpError
from .model_io import GET_IP_ADAPTER

MODES = ("auto", "self-attention", "ip-adapter")


def has_ip_adapter(sd):
    """Whether the IP-Adapter and its image encoder are there, without reading them (`drp.load` reads
    them on first use): set on `sd`, or converted into its folder (StableDiffusion.has)."""
    return sd.has("ip_adapter") and sd.has("image_encoder")


def resolve_mode(sd, mode="auto", references=True):
    """"auto" -> "ip-adapter" when its weights are there, else "self-attention"; the others are checked.

    Without references nothing is checked but the name: plain text-to-image needs no IP-Adapter."""
    if mode not in MODES:
        raise DrpError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}.")
    if not references:
        return mode
    if mode == "auto":
        return "ip-adapter" if has_ip_adapter(sd) else "self-attention"
    if mode == "ip-adapter" and not has_ip_adapter(sd):
        raise DrpError(f"the ip-adapter mode needs the IP-Adapter and its image encoder in the weights folder; "
                       f"{GET_IP_ADAPTER}.")
    return mode


def make_options(options_class, options, mode):
    """The mode's frozen Options from keyword knobs; an unknown knob is one sentence naming the known ones."""
    known = {f.name for f in fields(options_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DrpError(f"unknown option {unknown[0]!r} for the {mode} mode; its options are: "
                       f"{', '.join(sorted(known))}.")
    return options_class(**options)


def subject_positions(sd, text, subject):
    """Token positions (in the 77-token row, BOS at 0) of the words of `subject` inside `text`, or None."""
    words, ids = sd.tokenizer.encode(subject), sd.tokenizer.encode(text)
    for start in range(len(ids) - len(words) + 1):
        if ids[start : start + len(words)] == words:
            return [1 + start + j for j in range(len(words)) if 1 + start + j < 76]
    return None


def subject_tokens(sd, prompts, subject):
    """Per prompt, the positions of the subject's words (None for every prompt without a subject)."""
    if not subject:
        return [None] * len(prompts)
    found = [subject_positions(sd, p, subject) for p in prompts]
    for p, tokens in zip(prompts, found):
        if tokens is None:
            words = " ".join(repr(w) for w in p.split())
            raise DrpError(f"the subject {subject!r} is not a word of the prompt ({words}); "
                           "pass one of the prompt's words as subject.")
    return found


def check_switch_step(switch_step, steps):
    if switch_step is not None and not (isinstance(switch_step, int) and not isinstance(switch_step, bool)
                                        and 0 <= switch_step <= steps):
        raise DrpError(f"switch_step must be a whole number from 0 to {steps} (the number of steps), "
                       f"got {switch_step!r}.")


def entropy_switch(h_cu, h_st, steps, switch_step=None, fixed=False):
    """The report's switch numbers: H_cu, H_st, ρ, α and N_e (ALGORITHM.md §4), the user's N_e winning."""
    alpha = 0.5 if fixed else entropy.switch_fraction(h_cu, h_st)
    n_e = entropy.switch_step(alpha, steps) if switch_step is None else switch_step
    return dict(H_cu=h_cu, H_st=h_st, rho=rho(h_cu, h_st), alpha=alpha, switch_step=n_e, steps=steps)


def rho(h_cu, h_st):
    """ρ = H_cu / H_st for the report: math.inf for a constant style picture, 1 for two, None without both."""
    if h_cu is None or h_st is None:
        return None
    if h_st == 0:
        return math.inf if h_cu > 0 else 1.0  # the ρ that switch_fraction uses for α (0.8, resp. 0.5)
    return h_cu / h_st


def reference_name(image):
    """How a reference is named in reports: its file name, or "<image>" for an image given in memory."""
    return Path(image).name if isinstance(image, (str, os.PathLike)) else "<image>"
