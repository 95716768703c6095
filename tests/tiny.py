"""Tiny random Stable Diffusion models for tests: every real code path, at a size that runs in a blink.

`tiny_sd()` builds the three models at their `tiny()` configs (the seeded random weights of
tests/checkpoints.py) with the real tokenizer, straight in memory. `tiny_weights_dir(path)` goes the
way a user goes: it writes a tiny checkpoint in the original single-file layout and converts it into
a weights folder that `drp.load(path)` and `sample.py` read; the same seed gives the same weights.
`reference_tokenizer(folder)` is the tokenizer the diffusers/transformers reference pipelines use.
"""

import gzip
import hashlib
import json
from pathlib import Path

import torch

from checkpoints import tiny_checkpoint, tiny_models
from drp.convert import convert
from drp.model_io import StableDiffusion
from drp.tokenizer import CONTEXT_LENGTH, DEFAULT_VOCAB, NUM_MERGES, Tokenizer, bytes_to_unicode


def tiny_sd(dtype=torch.float32, seed=0):
    """A `StableDiffusion` of tiny random models on the CPU: the weights `tiny_weights_dir(…, seed)` holds."""
    models = {name: m.to(dtype).requires_grad_(False) for name, m in tiny_models(seed).items()}
    fingerprint = hashlib.sha256(f"tiny random weights, seed {seed}".encode()).hexdigest()  # for cache keys
    source = {"file": f"tiny-{seed}.safetensors", "layout": "single-file", "sha256": fingerprint,
              "dtype": str(dtype).removeprefix("torch.")}
    return StableDiffusion(tokenizer=Tokenizer(), device=torch.device("cpu"), dtype=dtype, source=source, **models)


def tiny_weights_dir(path, seed=0):
    """A converted weights folder at `path` from a tiny single-file checkpoint (fp32); returns `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    checkpoint = tiny_checkpoint(path.parent / f"{path.name}-source.safetensors", seed=seed)
    convert(checkpoint, path, dtype="fp32", progress=False)
    return path


def reference_tokenizer(folder):
    """transformers' CLIPTokenizer as SD 1.5 sets it up, written into `folder` from the repo's merges file.

    The vocabulary is derived from the merges the way CLIP does it: the 256 byte symbols, the same with
    the end-of-word mark `</w>`, one token per merge, then BOS and EOS.
    """
    from transformers import CLIPTokenizer

    with gzip.open(DEFAULT_VOCAB, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 1 + NUM_MERGES]  # line 0 is a version header
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=CONTEXT_LENGTH)
