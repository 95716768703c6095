"""docs/HOOKS.md cannot drift from the code: its quotes are the files' text, its example runs and is right.

Each ```python block of the doc is preceded by a comment saying what it is: `quoted from FILE` (it must
appear in FILE, verbatim), `runs as a test` (it is executed here and its hook checked), or `needs the SD
weights` (compiled only).
"""

import re
from pathlib import Path

import pytest
import torch

import drp
from drp.attention import AttnCall, attend
from tiny import tiny_sd

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4  # explicit softmax against the fused kernel, relative to the largest value
BLOCK = re.compile(r"<!-- (.*?) -->\n```python\n(.*?)```", re.S)


def blocks():
    text = (ROOT / "docs" / "HOOKS.md").read_text(encoding="utf-8")
    found = BLOCK.findall(text)
    assert len(found) == text.count("```python"), "every python block of the doc says what it is"
    return found


def test_every_quote_in_the_doc_is_the_files_text_verbatim():
    quotes = [(what.removeprefix("quoted from "), code) for what, code in blocks() if what.startswith("quoted from")]
    assert len(quotes) >= 3
    for path, code in quotes:
        assert code in (ROOT / path).read_text(encoding="utf-8"), f"docs/HOOKS.md quotes {path} wrongly: {code}"
    for what, code in blocks():  # the others are whole programs
        if not what.startswith("quoted from"):
            compile(code, what, "exec")


@pytest.fixture(scope="module")
def example():
    (code,) = [code for what, code in blocks() if what == "runs as a test"]
    namespace = {}
    exec(compile(code, "docs/HOOKS.md", "exec"), namespace)
    return namespace


def test_the_reweighting_hook_scales_the_words_weights_in_the_conditional_rows_at_its_grid_only(example):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 6, 8, generator=g) for _ in range(3))  # 2 images under guidance, 6 tokens
    hook = example["reweighted"]([2, 4], 3.0, grid=(2, 3))
    weights = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8**0.5, dim=-1)
    weights[2:, :, :, [2, 4]] *= 3.0  # rows 2, 3 are the conditional ones
    got = hook(None, q, k, v, AttnCall("up_blocks.1.attentions.0.transformer_blocks.0.attn2", True, (2, 3)))
    assert (got.double() - weights @ v.double()).abs().max() <= TOL * v.abs().max()
    other = AttnCall("up_blocks.2.attentions.0.transformer_blocks.0.attn2", True, (4, 6))
    assert torch.equal(hook(None, q, k, v, other), attend(q, k, v))  # other layers: plain attention


def test_the_reweighting_example_gives_the_pipelines_image_at_factor_one_and_another_at_two(example):
    sd = tiny_sd()
    prompt = "a rowboat on the beach"
    plain = drp.generate(sd, prompt, steps=3, height=64, width=64, seed=5, progress=False).latents
    same = example["generate_reweighted"](sd, prompt, "rowboat", factor=1.0, steps=3, size=64, seed=5)
    assert (same - plain).abs().max() <= TOL * plain.abs().max()
    stronger = example["generate_reweighted"](sd, prompt, "rowboat", factor=2.0, steps=3, size=64, seed=5)
    assert (stronger - plain).abs().max() > 100 * TOL * plain.abs().max()
