"""`python -m drp.evaluate run`: items and seeds, torchrun shards, resuming, and refusing bad input.

A tiny random checkpoint (tests/tiny.py; with a tiny IP-Adapter and image encoder of tests/ip_checkpoints.py
for the ip-adapter mode), 2 DDIM steps at 64×64, on the CPU. The torchrun run uses two
processes talking through gloo, as a CPU-only cluster would.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from drp.convert import convert
from drp.evaluate.__main__ import main
from drp.evaluate.data import class_only, read_prompts_and_classes, without_words
from drp.evaluate.run import build_items, item_seed
from ip_checkpoints import adapter_file, reference_encoder, save_adapter
from tiny import tiny_weights_dir

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "dreambench"
# 3 items: cat with two prompts, red_cartoon with one; rank 0 of 2 makes two, rank 1 one
SETTINGS = ["--bench", "dreambench", "--data", str(DATA), "--subjects", "cat,red_cartoon", "--prompts", "2",
            "--images-per-prompt", "1", "--limit", "3", "--steps", "2", "--height", "64", "--width", "64",
            "--device", "cpu", "--dtype", "fp32", "--no-progress"]
TORCHRUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights_dir(tmp_path_factory.mktemp("weights") / "tiny")


def run_alone(argv):
    """`main(argv)` in this process with one thread, like each torchrun worker (OMP_NUM_THREADS=1): on a
    CPU the number of threads changes the order of sums, and so the last bits of the pixels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def alone(weights, tmp_path_factory):
    """A run made by one process."""
    out = tmp_path_factory.mktemp("alone") / "run"
    assert run_alone(["run", *SETTINGS, "--weights", str(weights), "--out", str(out)]) == 0
    return out


def stamps(folder):
    """{file: (inode, mtime)} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def pixels(path):
    return np.asarray(Image.open(path))


def test_dreambench_lists_hold_30_subjects_9_of_them_live_and_25_prompts_of_each_kind():
    classes, objects, live = read_prompts_and_classes(DATA / "dataset" / "prompts_and_classes.txt")
    assert len(classes) == 30 and sum(c in ("cat", "dog") for c in classes.values()) == 9
    assert classes["bear_plushie"] == "stuffed animal" and len(objects) == len(live) == 25
    assert class_only(objects[0], "stuffed animal") == "a stuffed animal in the jungle"
    assert class_only(live[-1], "dog") == "a cube shaped dog"
    assert without_words("a stuffed animal in the jungle", "stuffed animal") == "a in the jungle"


def test_items_are_sorted_and_each_seed_depends_only_on_the_base_seed_and_the_id():
    items, _ = build_items("dreambench", DATA, subjects=["red_cartoon", "cat"], prompts=3, images_per_prompt=2)
    ids = [i.id for i in items]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == 2 * 3 * 2
    assert items[0].id == "cat-00-00" and items[0].prompt == "a cat in the jungle"
    assert items[0].content == "dataset/cat/00.jpg" and items[0].subject == "cat"
    assert [i.seed for i in items] == [item_seed(0, i.id) for i in items]
    assert len({i.seed for i in items}) == len(items)
    assert build_items("dreambench", DATA, subjects=["cat"], prompts=1, seed=1)[0][0].seed != items[0].seed
    cartoon = [i for i in items if i.subject == "cartoon"]
    assert cartoon[0].prompt == "a cartoon in the jungle"  # an object: the object prompts


def test_style_and_dual_items_pair_every_style_picture_with_every_prompt():
    style, folder = build_items("style", prompts=2, images_per_prompt=1)
    assert len(style) == 3 * 2 and folder.name == "assets"
    assert {i.style for i in style} == {"shipwreck.jpg", "starry_night.jpg", "the_scream.jpg"}
    dual, _ = build_items("dual", DATA, subjects=["cat"], prompts=2, images_per_prompt=1)
    assert len(dual) == 3 * 2 and all(i.content == "dataset/cat/00.jpg" and i.style for i in dual)


def test_one_process_run_writes_items_config_and_one_png_per_item_with_its_settings(alone):
    items = [json.loads(line) for line in (alone / "items.jsonl").read_text().splitlines()]
    assert [i["id"] for i in items] == ["cat-00-00", "cat-01-00", "red_cartoon-00-00"]
    assert set(items[0]) == {"id", "prompt", "subject", "content", "style", "seed", "file"}
    assert sorted(p.name for p in (alone / "images").iterdir()) == [f"{i['id']}.png" for i in items]
    text = Image.open(alone / items[0]["file"]).info["parameters"]
    assert text.startswith("a cat in the jungle\n") and f"Seed: {items[0]['seed']}" in text
    assert json.loads((alone / "config.json").read_text())["mode"] == "plain"


def test_torchrun_with_two_processes_makes_every_item_once_and_the_same_images(alone, weights, tmp_path):
    out = tmp_path / "run"
    # one thread per worker, as `alone` ran: torchrun sets OMP_NUM_THREADS=1 only when it is not set already
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "drp.evaluate", "run", *SETTINGS, "--weights", str(weights), "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    made = {int(r): int(n) for r, n in re.findall(r"rank (\d) of 2: (\d+) made, 0 already there", done.stdout)}
    assert made == {0: 2, 1: 1}  # items[0::2] and items[1::2]: every item once
    assert (out / "items.jsonl").read_text() == (alone / "items.jsonl").read_text()
    names = sorted(p.name for p in (alone / "images").iterdir())
    assert sorted(p.name for p in (out / "images").iterdir()) == names
    for name in names:
        assert np.array_equal(pixels(out / "images" / name), pixels(alone / "images" / name))
        assert (out / "images" / name).read_bytes() == (alone / "images" / name).read_bytes()


def test_rerun_after_deleting_two_images_makes_exactly_those_and_touches_nothing_else(alone, weights, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(alone, out)
    gone = ["images/cat-00-00.png", "images/red_cartoon-00-00.png"]
    before = {name: (out / name).read_bytes() for name in gone}
    for name in gone:
        (out / name).unlink()
    kept = stamps(out)
    assert run_alone(["run", *SETTINGS, "--weights", str(weights), "--out", str(out)]) == 0
    after = stamps(out)
    assert sorted(set(after) - set(kept)) == sorted(gone)
    assert {k: after[k] for k in kept} == kept  # same inode, same modification time
    for name in gone:
        assert (out / name).read_bytes() == before[name]


def one_line_error(capsys, argv):
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


def test_bad_input_is_one_sentence_and_leaves_the_run_folder_untouched(alone, weights, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(alone, out)
    kept = stamps(out)
    base = ["run", "--weights", str(weights), "--out", str(out)]
    changed = [a if a != "2" else "3" for a in SETTINGS]  # 3 steps instead of 2 (and 3 prompts)
    err = one_line_error(capsys, base + changed)
    assert "holds a run with other settings (steps 2, not 3)" in err
    missing = [str(tmp_path / "nowhere") if a == str(DATA) else a for a in SETTINGS]
    assert "there is no DreamBench dataset" in one_line_error(capsys, base + missing)
    unknown = [a.replace("red_cartoon", "unicorn") for a in SETTINGS]
    assert "unknown DreamBench subject 'unicorn'" in one_line_error(capsys, base + unknown)
    none = [a.replace("cat,red_cartoon", ",") for a in SETTINGS]
    assert "--subjects names no subject" in one_line_error(capsys, base + none)
    assert stamps(out) == kept
    foreign = tmp_path / "documents"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("mine")
    err = one_line_error(capsys, ["run", *SETTINGS, "--weights", str(weights), "--out", str(foreign)])
    assert "holds no run of drp.evaluate" in err and sorted(os.listdir(foreign)) == ["thesis.txt"]
    (foreign / "config.json").write_text("[1, 2]")  # JSON, but not a run's settings
    err = one_line_error(capsys, ["run", *SETTINGS, "--weights", str(weights), "--out", str(foreign)])
    assert "config.json is not a run's config.json" in err and (foreign / "config.json").read_text() == "[1, 2]"


def test_drp_mode_gives_the_references_to_generate_and_resumes(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DRP_CACHE_DIR", str(tmp_path / "cache"))  # the references' inversions
    one = ["--bench", "dual", "--data", str(DATA), "--subjects", "cat", "--prompts", "1", "--images-per-prompt", "1",
           "--limit", "1", "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--dtype", "fp32",
           "--no-progress", "--weights", str(weights)]
    assert run_alone(["run", *one, "--out", str(tmp_path / "drp"), "--mode", "auto"]) == 0
    assert run_alone(["run", *one, "--out", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "drp" / "config.json").read_text())["mode"] == "self-attention"  # no IP-Adapter
    image = tmp_path / "drp" / "images" / "cat-shipwreck-00-00.png"
    text = Image.open(image).info["parameters"]
    assert ("DRP mode: self-attention, DRP subject: cat, DRP content: dataset/cat/00.jpg, "
            "DRP style: shipwreck.jpg") in text
    assert not np.array_equal(pixels(image), pixels(tmp_path / "plain" / "images" / image.name))  # same seed
    capsys.readouterr()
    assert run_alone(["run", *one, "--out", str(tmp_path / "drp"), "--mode", "self-attention"]) == 0
    assert "rank 0 of 1: 0 made, 1 already there" in capsys.readouterr().out
    err = one_line_error(capsys, ["run", *one, "--out", str(tmp_path / "ip"), "--mode", "ip-adapter"])
    assert "the ip-adapter mode needs the IP-Adapter" in err and not (tmp_path / "ip").exists()


def test_ip_adapter_mode_records_its_mode_auto_chooses_it_and_a_rerun_makes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DRP_CACHE_DIR", str(tmp_path / "cache"))
    weights = tiny_weights_dir(tmp_path / "weights")  # its own folder: the module's `weights` has no adapter
    convert(save_adapter(tmp_path / "h94" / "ip-adapter_sd15.safetensors", adapter_file("base", seed=2)), weights,
            dtype="fp32", progress=False)
    reference_encoder(seed=5).save_pretrained(tmp_path / "h94" / "image_encoder")
    convert(tmp_path / "h94" / "image_encoder", weights, dtype="fp32", progress=False)
    one = ["--bench", "dual", "--data", str(DATA), "--subjects", "cat", "--prompts", "1", "--images-per-prompt", "1",
           "--limit", "1", "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--dtype", "fp32",
           "--no-progress", "--weights", str(weights)]
    assert run_alone(["run", *one, "--out", str(tmp_path / "ip"), "--mode", "ip-adapter"]) == 0
    assert run_alone(["run", *one, "--out", str(tmp_path / "auto"), "--mode", "auto"]) == 0
    image = Path("images") / "cat-shipwreck-00-00.png"
    text = Image.open(tmp_path / "ip" / image).info["parameters"]
    assert ("DRP mode: ip-adapter, DRP subject: cat, DRP content: dataset/cat/00.jpg, "
            "DRP style: shipwreck.jpg") in text
    ip, auto = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("ip", "auto"))
    assert ip["mode"] == auto["mode"] == "ip-adapter" and ip["ip_adapter"] == auto["ip_adapter"] is not None
    assert (tmp_path / "auto" / image).read_bytes() == (tmp_path / "ip" / image).read_bytes()
    kept = stamps(tmp_path / "ip")
    capsys.readouterr()
    assert run_alone(["run", *one, "--out", str(tmp_path / "ip"), "--mode", "auto"]) == 0  # auto = ip-adapter here
    assert "rank 0 of 1: 0 made, 1 already there" in capsys.readouterr().out
    assert stamps(tmp_path / "ip") == kept
