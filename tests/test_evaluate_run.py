"""`python -m drp.evaluate run`: items and seeds, torchrun shards, batches, the modes and their knobs, resuming,
and refusing bad input.

A tiny random checkpoint (tests/tiny.py; with a tiny IP-Adapter and image encoder of tests/ip_checkpoints.py
for the IP-Adapter modes), 2 DDIM steps at 64×64, on the CPU. The torchrun run uses two
processes talking through gloo, as a CPU-only cluster would. Images the harness makes are compared with
`drp.generate` called directly, in the same process with the same thread count: the same computation,
so the pixels are equal to the bit.
"""

import ast
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

import drp
from drp.convert import convert
from drp.evaluate.__main__ import main
from drp.evaluate.data import LIVE_CLASSES, class_only, prompt_kind, read_prompts_and_classes, without_words
from drp.evaluate.plan import build_items, item_seed
from drp.evaluate.run import run_summary
from drp.sampling import initial_latents
from ip_checkpoints import adapter_file, reference_encoder, save_adapter
from tiny import tiny_weights_dir

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "dreambench"
# 3 items: cat with two prompts, red_cartoon with one; rank 0 of 2 makes two, rank 1 one
SETTINGS = ["--bench", "dreambench", "--data", str(DATA), "--subjects", "cat,red_cartoon", "--prompts", "2",
            "--images-per-prompt", "1", "--limit", "3", "--steps", "2", "--height", "64", "--width", "64",
            "--device", "cpu", "--dtype", "fp32", "--no-progress"]


def replaced(args, flag, value=None):
    """`args` with `flag`'s value set to `value`, or without the flag when `value` is None."""
    i = args.index(flag)
    return args[:i] + ([flag, value] if value is not None else []) + args[i + 2 :]


# 6 items in 4 batches of --batch 2: cat-00-00 + 01, cat-00-02, red_cartoon-00-00 + 01, red_cartoon-00-02
BATCHED = replaced(replaced(replaced(SETTINGS, "--limit"), "--prompts", "1"), "--images-per-prompt", "3") + [
    "--batch", "2"]
# one dual item: the cat photo and a painting, for the modes with references
ONE = ["--bench", "dual", "--data", str(DATA), "--subjects", "cat", "--prompts", "1", "--images-per-prompt", "1",
       "--limit", "1", "--steps", "2", "--height", "64", "--width", "64", "--device", "cpu", "--dtype", "fp32",
       "--no-progress"]
TORCHRUN_TIMEOUT_S = 300
PIXEL_LEVELS = 2  # a batched image against the same seed alone: float rounding of other kernels, in 8-bit levels


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights_dir(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture(scope="module")
def ip_weights(tmp_path_factory):
    """A tiny weights folder with a tiny IP-Adapter and image encoder converted into it."""
    root = tmp_path_factory.mktemp("ip")
    weights = tiny_weights_dir(root / "weights")
    convert(save_adapter(root / "h94" / "ip-adapter_sd15.safetensors", adapter_file("base", seed=2)), weights,
            dtype="fp32", progress=False)
    reference_encoder(seed=5).save_pretrained(root / "h94" / "image_encoder")
    convert(root / "h94" / "image_encoder", weights, dtype="fp32", progress=False)
    return weights


def one_thread(fn, *args, **kwargs):
    """`fn` with one thread, like each torchrun worker (OMP_NUM_THREADS=1): on a CPU the number of threads
    changes the order of sums, and so the last bits of the pixels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def run_alone(argv):
    """`main(argv)` in this process with one thread."""
    return one_thread(main, argv)


def generate_alone(sd, prompt, **kwargs):
    """drp.generate at the settings of ONE and SETTINGS, with one thread."""
    return one_thread(drp.generate, sd, prompt, steps=2, height=64, width=64, progress=False, **kwargs)


def items_of(run):
    return [json.loads(line) for line in (run / "items.jsonl").read_text().splitlines()]


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


def templates_in(path):
    """The prompt templates of prompts_and_classes.txt read plainly: each quoted string before `.format(`,
    under its list's heading."""
    lists, current = {}, None
    for line in path.read_text().splitlines():
        if line.strip() in ("Object Prompts", "Live Subject Prompts"):
            current = lists.setdefault(line.strip(), [])
        elif current is not None and ".format(" in line:
            current.append(ast.literal_eval(line.strip().split(".format(")[0]))
    return lists["Object Prompts"], lists["Live Subject Prompts"]


def test_dreambench_lists_hold_30_subjects_9_of_them_live_and_25_prompts_of_each_kind():
    listing = DATA / "dataset" / "prompts_and_classes.txt"  # a verbatim copy of DreamBench's file
    classes, objects, live = read_prompts_and_classes(listing)
    assert len(classes) == 30 and classes["bear_plushie"] == "stuffed animal"
    assert sorted(n for n, c in classes.items() if c in LIVE_CLASSES) == [
        "cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]  # DreamBench's 9 live subjects
    want_objects, want_live = templates_in(listing)
    assert len(want_objects) == len(want_live) == 25 and (objects, live) == (want_objects, want_live)
    items, _ = build_items("dreambench", DATA, subjects=["cat", "red_cartoon"], images_per_prompt=1)
    for subject, noun, templates in (("cat", "cat", want_live), ("red_cartoon", "cartoon", want_objects)):
        prompts = [i.prompt for i in items if i.id.startswith(subject + "-")]
        assert prompts == [" ".join(t.format("", noun).split()) for t in templates]  # all 25, in order
    assert class_only(objects[0], "stuffed animal") == "a stuffed animal in the jungle"
    assert class_only(live[-1], "dog") == "a cube shaped dog"
    assert without_words("a stuffed animal in the jungle", "stuffed animal") == "a in the jungle"


def test_prompt_kinds_follow_the_positions_of_docs_evaluation():
    objects, live = templates_in(DATA / "dataset" / "prompts_and_classes.txt")
    properties = ("a red {0}", "a purple {0}", "a shiny {0}", "a wet {0}", "a cube shaped {0}")
    for templates, is_live in ((objects, False), (live, True)):
        kinds = [prompt_kind(i, is_live) for i in range(25)]
        assert kinds[20:] == ["property"] * 5 and all(t.startswith(properties) for t in templates[20:])
        assert not any(t.startswith(properties) for t in templates[:20])
        assert kinds.count("accessory") == (10 if is_live else 0)
    assert all("wearing" in t or "outfit" in t for t in live[10:20])  # hats, glasses, a scarf, a shirt, outfits
    assert not any("wearing" in t or "outfit" in t for t in live[:10] + objects)


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


def test_torchrun_with_two_processes_at_batch_2_makes_the_same_bytes_as_one_process(weights, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_alone(["run", *BATCHED, "--weights", str(weights), "--out", str(one)]) == 0
    # one thread per worker, as run_alone ran: torchrun sets OMP_NUM_THREADS=1 only when it is not set already
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "drp.evaluate", "run", *BATCHED, "--weights", str(weights), "--out", str(two)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    made = {int(r): int(n) for r, n in re.findall(r"rank (\d) of 2: (\d+) made, 0 already there", done.stdout)}
    assert made == {0: 4, 1: 2}  # batches [0::2]: cat 00+01, red_cartoon 00+01; [1::2]: cat 02, red_cartoon 02
    assert (two / "items.jsonl").read_text() == (one / "items.jsonl").read_text()
    names = sorted(p.name for p in (one / "images").iterdir())
    assert len(names) == 6 and sorted(p.name for p in (two / "images").iterdir()) == names
    for name in names:
        assert (two / "images" / name).read_bytes() == (one / "images" / name).read_bytes()


def test_batch_2_gives_each_image_its_own_seed_in_one_generate_call(weights, tmp_path):
    out = tmp_path / "run"
    assert run_alone(["run", *BATCHED, "--weights", str(weights), "--out", str(out)]) == 0
    items = [i for i in items_of(out) if i["id"].startswith("cat-")]
    sd = drp.load(weights)
    pair = generate_alone(sd, items[0]["prompt"], num_images=2,
                          latents=initial_latents([i["seed"] for i in items[:2]], (1, 4, 8, 8)))
    last = generate_alone(sd, items[2]["prompt"], seed=items[2]["seed"])  # the batch of one left over
    for item, image in zip(items, pair.images + last.images):
        assert np.array_equal(pixels(out / item["file"]), np.asarray(image)), item["id"]
    alone = generate_alone(sd, items[1]["prompt"], seed=items[1]["seed"])  # the second of the pair, by itself
    diff = np.abs(pixels(out / items[1]["file"]).astype(int) - np.asarray(alone.images[0]).astype(int))
    assert diff.max() <= PIXEL_LEVELS
    assert "Batch: 2" in Image.open(out / items[0]["file"]).info["parameters"]
    config = json.loads((out / "config.json").read_text())
    assert config["batch"] == 2 and config["format"] == 2


def test_rerun_after_deleting_two_images_makes_exactly_those_and_touches_nothing_else(alone, weights, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(alone, out)
    gone = ["images/cat-00-00.png", "images/red_cartoon-00-00.png"]
    before = {name: (out / name).read_bytes() for name in gone}
    for name in gone:
        (out / name).unlink()
    left = [out / "images" / ".cat-00-00.png.99999.tmp", out / ".config.json.99999.tmp"]  # of a killed run
    for path in left:
        path.write_bytes(b"half")
    kept = stamps(out)
    assert run_alone(["run", *SETTINGS, "--weights", str(weights), "--out", str(out)]) == 0
    after = stamps(out)
    assert sorted(set(after) - set(kept)) == sorted(gone) and not any(p.exists() for p in left)
    kept = {k: v for k, v in kept.items() if k != "timings.jsonl" and "99999" not in k}
    assert {k: after[k] for k in kept} == kept  # same inode, same modification time
    for name in gone:
        assert (out / name).read_bytes() == before[name]
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    assert [t["images"] for t in timings] == [3, 2] and timings[1]["dtype"] == "fp32"
    seconds, machine = run_summary(out)
    assert seconds == sum(t["seconds"] for t in timings) / 5 > 0 and machine.endswith(", fp32")


def test_a_run_made_before_format_2_is_resumed_as_the_same_run(alone, weights, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(alone, out)
    config = json.loads((out / "config.json").read_text())
    for key in ("negative_prompt", "options", "ip_scale", "batch"):  # what format 1 did not have
        del config[key]
    (out / "config.json").write_text(json.dumps(dict(config, format=1)))
    images = stamps(out / "images")
    capsys.readouterr()
    assert run_alone(["run", *SETTINGS, "--weights", str(weights), "--out", str(out)]) == 0
    assert "rank 0 of 1: 0 made, 3 already there" in capsys.readouterr().out
    assert stamps(out / "images") == images
    assert json.loads((out / "config.json").read_text()) == json.loads((alone / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, format=9)))
    err = one_line_error(capsys, ["run", *SETTINGS, "--weights", str(weights), "--out", str(out)])
    assert "was written by a newer version of drp (run format 9" in err


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
    err = one_line_error(capsys, base + SETTINGS + ["--batch", "2"])
    assert "holds a run with other settings (batch 1, not 2)" in err
    missing = [str(tmp_path / "nowhere") if a == str(DATA) else a for a in SETTINGS]
    assert "there is no DreamBench dataset" in one_line_error(capsys, base + missing)
    unknown = [a.replace("red_cartoon", "unicorn") for a in SETTINGS]
    assert "unknown DreamBench subject 'unicorn'" in one_line_error(capsys, base + unknown)
    none = [a.replace("cat,red_cartoon", ",") for a in SETTINGS]
    assert "--subjects names no subject" in one_line_error(capsys, base + none)
    assert "--batch must be a whole number ≥ 1" in one_line_error(capsys, base + SETTINGS + ["--batch", "0"])
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
    one = [*ONE, "--weights", str(weights)]
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
    err = one_line_error(capsys, ["run", *one, "--out", str(tmp_path / "ip"), "--mode", "image-prompt"])
    assert "--mode image-prompt needs the IP-Adapter and its image encoder" in err and not (tmp_path / "ip").exists()


def test_ip_adapter_mode_records_its_mode_auto_chooses_it_and_a_rerun_makes_nothing(ip_weights, tmp_path, capsys):
    one = [*ONE, "--weights", str(ip_weights)]
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


def test_image_prompt_run_equals_generate_with_the_references_as_ip_image(ip_weights, tmp_path):
    out = tmp_path / "run"
    settings = replaced(replaced(ONE, "--images-per-prompt", "2"), "--limit", "2")  # two images, one prompt
    argv = ["run", *settings, "--weights", str(ip_weights), "--out", str(out), "--mode", "image-prompt",
            "--ip-scale", "up_blocks.1=1,mid_block=0.5", "--negative-prompt", "blurry, dark"]
    assert run_alone(argv) == 0
    items = items_of(out)
    assert len(items) == 2 and all(i["content"] and i["style"] for i in items)
    sd = drp.load(ip_weights)
    for item in items:
        want = generate_alone(sd, item["prompt"], seed=item["seed"], negative_prompt="blurry, dark",
                              ip_image=[str(DATA / item["content"]), str(REPO / "assets" / item["style"])],
                              ip_scale={"up_blocks.1": 1.0, "mid_block": 0.5})
        assert np.array_equal(pixels(out / item["file"]), np.asarray(want.images[0])), item["id"]
    text = Image.open(out / items[0]["file"]).info["parameters"]
    assert "\nNegative prompt: blurry, dark\n" in text
    assert 'IP-Adapter images: dataset/cat/00.jpg | shipwreck.jpg' in text
    config = json.loads((out / "config.json").read_text())
    assert config["mode"] == "image-prompt" and config["ip_scale"] == {"up_blocks.1": 1.0, "mid_block": 0.5}


def test_set_reaches_generate_and_is_recorded_in_the_config_and_every_png(ip_weights, tmp_path):
    out = tmp_path / "run"
    knobs = ["--set", "bg_prompt=false", "--set", "rank_energy=0.8", "--set", "switch_step=1",
             "--set", "scale_late=up_blocks.1=1"]
    assert run_alone(["run", *ONE, "--weights", str(ip_weights), "--out", str(out), "--mode", "ip-adapter",
                      *knobs]) == 0
    item = items_of(out)[0]
    sd = drp.load(ip_weights)
    references = dict(content=str(DATA / item["content"]), style=str(REPO / "assets" / item["style"]),
                      subject="cat", mode="ip-adapter", seed=item["seed"])
    want = generate_alone(sd, item["prompt"], bg_prompt=False, rank_energy=0.8, switch_step=1,
                          scale_late={"up_blocks.1": 1.0}, **references)
    assert np.array_equal(pixels(out / item["file"]), np.asarray(want.images[0]))
    default = generate_alone(sd, item["prompt"], **references)
    assert not np.array_equal(pixels(out / item["file"]), np.asarray(default.images[0]))  # the knobs matter
    config = json.loads((out / "config.json").read_text())
    assert config["options"] == dict(bg_prompt=False, rank_energy=0.8, switch_step=1,
                                     scale_late={"up_blocks.1": 1.0})
    text = Image.open(out / item["file"]).info["parameters"]
    assert ("DRP bg prompt: False, DRP rank energy: 0.8, DRP scale late: up_blocks.1=1, "
            "DRP switch step: 1") in text


def test_a_bad_knob_is_one_sentence_before_any_weights_are_loaded(ip_weights, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(drp, "load", no_loading)
    base = ["run", *ONE, "--weights", str(ip_weights), "--out", str(tmp_path / "run")]
    cases = {("ip-adapter", "colour=red"): "unknown knob 'colour' for the ip-adapter mode; its knobs are: ",
             ("ip-adapter", "use_masks=false"): "use_masks is a knob of the self-attention mode, not of the ip-adapter",
             ("self-attention", "bg_prompt=false"): "bg_prompt is a knob of the ip-adapter mode, not of the self",
             ("ip-adapter", "bg_prompt=maybe"): "--set bg_prompt='maybe' is not a value of bg_prompt, which takes "
                                                "true or false",
             ("ip-adapter", "rank_energy=2"): "rank_energy must be a number in (0, 1]",
             ("ip-adapter", "ip_layers=up_blocks.9"): "ip_layers names 'up_blocks.9', which is no attn2 layer",
             ("ip-adapter", "scale_early=down_blocks.7=1"): "the IP-Adapter scale names 'down_blocks.7'",
             ("ip-adapter", "switch_step=3"): "switch_step must be a whole number from 0 to 2",
             ("self-attention", "layers=up_blocks.3,up_block.2"): "layers names 'up_block.2', which is no block",
             ("plain", "late=both"): "--set sets DRP-Diff's knobs, and the plain mode has none"}
    for (mode, knob), sentence in cases.items():
        assert sentence in one_line_error(capsys, base + ["--mode", mode, "--set", knob]), knob
    err = one_line_error(capsys, base + ["--mode", "image-prompt", "--ip-scale", "up_blocks.1=x"])
    assert "the IP-Adapter scale 'up_blocks.1=x' is neither a number nor BLOCK=NUMBER pairs" in err
    assert "--ip-scale is the image-prompt mode's scale" in one_line_error(capsys, base + ["--ip-scale", "1"])
    assert not (tmp_path / "run").exists()


def maps_in(path):
    with np.load(path) as f:
        return {key: f[key] for key in f.files}


def test_attention_maps_are_kept_beside_each_png_and_change_no_pixel(ip_weights, tmp_path, capsys):
    one = [*ONE, "--weights", str(ip_weights), "--mode", "ip-adapter"]
    names = "cat,jungle,content,style"  # ONE's prompt is "a cat in the jungle"
    assert run_alone(["run", *one, "--out", str(tmp_path / "maps"), "--attention-maps", names]) == 0
    assert run_alone(["run", *one, "--out", str(tmp_path / "plain")]) == 0
    item = items_of(tmp_path / "maps")[0]
    png = Path(item["file"])
    assert (tmp_path / "maps" / png).read_bytes() == (tmp_path / "plain" / png).read_bytes()  # no pixel changed
    assert not (tmp_path / "plain" / png.with_suffix(".npz")).exists()
    got = maps_in(tmp_path / "maps" / png.with_suffix(".npz"))
    assert sorted(got) == sorted(f"{n}/{s}" for n in names.split(",") for s in ("all", "early", "late"))
    want = generate_alone(drp.load(ip_weights), item["prompt"], seed=item["seed"], mode="ip-adapter", subject="cat",
                          content=str(DATA / item["content"]), style=str(REPO / "assets" / item["style"]),
                          attention_maps=names.split(","))
    for key, array in got.items():
        name, stage = key.split("/")
        assert array.dtype == np.float32 and np.array_equal(array, want.attention_maps[name][stage][0].numpy()), key
    assert got["jungle/all"].max() > 0 and got["content/all"].max() > 0

    # maps lost (or asked for later): the batch is made again for them, and its PNG is left as it is
    (tmp_path / "maps" / png.with_suffix(".npz")).unlink()
    kept = (tmp_path / "maps" / png).stat().st_mtime_ns
    assert run_alone(["run", *one, "--out", str(tmp_path / "maps"), "--attention-maps", names]) == 0
    assert maps_in(tmp_path / "maps" / png.with_suffix(".npz")).keys() == got.keys()
    assert (tmp_path / "maps" / png).stat().st_mtime_ns == kept


def test_attention_map_words_missing_from_an_items_prompt_are_left_out_of_its_file(weights, tmp_path):
    out = tmp_path / "run"  # cat's prompts name the cat, red_cartoon's the cartoon
    assert run_alone(["run", *SETTINGS, "--weights", str(weights), "--out", str(out), "--attention-maps",
                      "cat,jungle"]) == 0
    for item in items_of(out):
        keys = set(maps_in(out / Path(item["file"]).with_suffix(".npz")))
        words = [w for w in ("cat", "jungle") if w in item["prompt"].split()]
        assert keys == {f"{w}/all" for w in words}, item["id"]  # no DRP-Diff: the "all" stage alone


def test_bad_attention_map_names_are_one_sentence_before_any_weights_are_loaded(ip_weights, tmp_path, monkeypatch,
                                                                                 capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(drp, "load", no_loading)
    base = ["run", *ONE, "--weights", str(ip_weights), "--out", str(tmp_path / "run")]
    err = one_line_error(capsys, base + ["--mode", "ip-adapter", "--attention-maps", "dog"])
    assert "--attention-maps names 'dog', which is a word of none of the run's 1 prompts" in err
    err = one_line_error(capsys, base + ["--attention-maps", "style"])  # the plain mode has no references
    assert "--attention-maps names the style reference, which the items of this plain run do not all have" in err
    err = one_line_error(capsys, base + ["--mode", "image-prompt", "--attention-maps", "content"])
    assert "names the content reference" in err
    assert not (tmp_path / "run").exists()
