"""sample.py with both references, end to end, on a tiny checkpoint the test converts itself."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drp.images import fit, load_image
from drp.report import PAD
from tiny import tiny_weights_dir

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--steps", "6", "--height", "64", "--width", "64", "--no-progress", "--seed", "5"]


def sample(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One dual-reference run of the bundled references, with a report, and a second one from the cache."""
    tmp = tmp_path_factory.mktemp("drp")
    weights = tiny_weights_dir(tmp / "weights")
    args = ["--weights", weights, "--prompt", "a cat on a beach, in the style of a painting", "--subject", "cat",
            "--content", ROOT / "assets/chelsea.png", "--style", ROOT / "assets/starry_night.jpg",
            "--cache-dir", tmp / "cache", *QUICK]
    first = sample(*args, "--out", tmp / "first.png", "--report", tmp / "report.png")
    second = sample(*args, "--out", tmp / "second.png")
    return tmp, first, second


def test_both_references_give_an_image_with_its_parameters(run):
    tmp, first, _ = run
    assert first.returncode == 0, first.stderr
    image = Image.open(tmp / "first.png")
    assert image.size == (64, 64)
    text = image.text["parameters"]
    assert text.startswith("a cat on a beach, in the style of a painting\n")
    assert "Steps: 6, Sampler: DDIM" in text and "Seed: 5" in text and "Size: 64x64" in text
    assert "DRP switch step:" in text


def test_the_report_shows_references_masks_and_result(run):
    tmp, first, _ = run
    assert f"saved {tmp / 'report.png'}" in first.stdout
    report = np.asarray(Image.open(tmp / "report.png").convert("RGB"))
    assert report.shape[1] >= 4 * 64 and report.shape[0] > 64  # four panels side by side, text below
    panels = [report[PAD : PAD + 64, PAD + k * (64 + PAD) :][:, :64] for k in range(4)]  # content, style, generated, output
    assert np.array_equal(panels[3], np.asarray(Image.open(tmp / "first.png").convert("RGB")))
    style = np.asarray(fit(load_image(ROOT / "assets/starry_night.jpg"), 64, 64))
    tinted = (panels[1] != style).any(axis=2)  # the style's foreground, tinted red, and nothing else
    assert 0 < tinted.mean() < 1 and (panels[1][tinted][:, 0] >= style[tinted][:, 0]).all()


def test_a_second_run_reads_the_references_from_the_cache_and_gives_the_same_image(run):
    tmp, first, second = run
    assert second.returncode == 0, second.stderr
    a, b = (np.asarray(Image.open(tmp / name)) for name in ("first.png", "second.png"))
    assert np.array_equal(a, b)
    assert len(list((tmp / "cache").glob("*.safetensors"))) == 2


def test_a_subject_that_is_not_in_the_prompt_is_one_clear_error(run, tmp_path):
    tmp, *_ = run
    done = sample("--weights", tmp / "weights", "--prompt", "a dog", "--subject", "cat", "--content",
                  ROOT / "assets/chelsea.png", "--out", tmp_path / "x.png", *QUICK)
    assert done.returncode == 1
    assert done.stderr.startswith("error: the subject 'cat' is not a word of the prompt") and "Traceback" not in done.stderr
    assert not (tmp_path / "x.png").exists()
