"""`sample.py --attention-maps`: the picture beside each image, the report's rows, and bad names refused first."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drp.heatmaps import PAD, PANEL
from tiny import tiny_weights_dir
from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--steps", "2", "--height", "64", "--width", "64", "--no-progress"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights_dir(tmp_path_factory.mktemp("tiny") / "weights")


def sample(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def grid_size(rows, columns):
    return PAD + columns * (PANEL + PAD), PAD + rows * (PANEL + PAD)  # square images: square panels


def test_writes_the_attention_picture_beside_each_image_one_row_per_name(weights, tmp_path):
    done = sample("--weights", weights, "--prompt", "a red fox in the snow", "--attention-maps", "fox, snow",
                  "--num-images", "2", "--out", tmp_path / "fox.png", *QUICK)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-0-attention.png", "fox-0.png", "fox-1-attention.png",
                                                         "fox-1.png"]
    assert f"saved {tmp_path / 'fox-1-attention.png'} (attention maps)" in done.stdout
    picture = Image.open(tmp_path / "fox-0-attention.png")
    assert picture.size == grid_size(rows=2, columns=1)  # plain text-to-image: the stage "all" only
    panel = np.asarray(picture.convert("RGB"))[PAD + PANEL // 2 :: PANEL + PAD, PAD + PANEL // 2]
    assert (panel.max(axis=-1) > panel.min(axis=-1) + 20).all()  # each row's panel is coloured, not grey


def find(picture, inside):
    """The row where `picture` sits inside `inside`, left-aligned, or None."""
    a, b = np.asarray(picture.convert("RGB")), np.asarray(inside.convert("RGB"))[:, : picture.width]
    for y in range(b.shape[0] - a.shape[0] + 1):
        if np.array_equal(b[y], a[0]) and np.array_equal(b[y : y + a.shape[0]], a):
            return y
    return None


def test_with_references_the_picture_has_a_column_per_stage_and_the_report_holds_the_same_rows(weights, tmp_path):
    done = sample("--weights", weights, "--attention-maps", "cat,content,style", "--mode", "self-attention",
                  "--cache-dir", tmp_path / "cache", "--out", tmp_path / "demo.png", "--report", tmp_path / "r.png",
                  *QUICK)  # the demo: a cat photo and a painting
    assert done.returncode == 0, done.stderr
    picture = Image.open(tmp_path / "demo-attention.png")
    assert picture.size == grid_size(rows=3, columns=3)  # all, early, late
    assert find(picture, Image.open(tmp_path / "r.png")) is not None


@pytest.mark.parametrize("names, says", [
    ("fox,dog", "error: the attention map 'dog' is not a word of the prompt ('a' 'red' 'fox'); name words"),
    ("content", "error: the attention map 'content' names the content reference, which this run does not have"),
])
def test_an_unknown_name_is_one_error_line_before_the_weights_are_loaded(tmp_path, capsys, names, says):
    missing = tmp_path / "no-weights"  # loading them would fail with another sentence
    code = load_script("sample").main(["--weights", str(missing), "--no-download", "--prompt", "a red fox",
                                      "--attention-maps", names, "--out", str(tmp_path / "x.png"), *QUICK])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(says) and err.count("\n") == 1
    assert not missing.exists() and not (tmp_path / "x.png").exists()
