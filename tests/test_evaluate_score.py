"""`score` and `report`: every field of scores.jsonl against transformers, the weights recorded, resuming, rank
files merged exactly once, the table's means and bootstrap intervals, refusals, real-vs-real, the contact sheet.

The run folder is written by hand (items of the dual benchmark, random pictures as the generated images),
so no generation is needed; the CLIP and DINO models are tiny transformers folders.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import drp.evaluate.score as score_module
from drp.errors import DrpError
from drp.evaluate.__main__ import main
from drp.evaluate.data import without_words
from drp.evaluate.plan import build_items, write_lines
from drp.evaluate.report import report
from drp.evaluate.run import make_config
from drp.evaluate.score import merge_scores, rank_file, score, score_items
from drp.evaluate.metrics import load_clip, load_dino
from drp.evaluate.stats import estimate, units_of
from drp.vision import dino_pixels
from test_evaluate_run import DATA
from tiny import reference_tokenizer

TOL = 1e-5  # cosines, fp32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random CLIPModel and ViT (DINO) folders, as transformers writes them."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2)
    for name in ("clip", "clip2"):  # two CLIPs of the same shape, different weights
        CLIPModel(CLIPConfig(text_config=small, vision_config=dict(small, patch_size=32), projection_dim=32)
                  ).save_pretrained(root / name)
    ViTModel(ViTConfig(**dict(small, patch_size=32)), add_pooling_layer=False).save_pretrained(root / "dino")
    return root


def made_run(out, bench="dual", subjects=("cat",), prompts=1, seed=0):
    """A finished run written by hand: its items, and random pictures as its images."""
    items, _ = build_items(bench, DATA, subjects=list(subjects), prompts=prompts, images_per_prompt=1)
    cfg = make_config(bench, data=DATA, subjects=list(subjects), prompts=prompts, images_per_prompt=1, steps=2,
                      height=64, width=64)
    (out / "images").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "items.jsonl").write_text("".join(json.dumps(asdict(i)) + "\n" for i in items))
    rng = np.random.RandomState(seed)
    for item in items:
        Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(out / item.file)
    return out


@pytest.fixture
def run(tmp_path):
    """A finished dual-benchmark run: the cat × the three paintings × one prompt, random images."""
    return made_run(tmp_path / "run")


def quiet_score(run, clip, dino=None):
    score(run, clip, dino, device="cpu", progress=False, log=lambda *a: None)


def read_scores(run):
    return [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]


def test_every_field_equals_the_cosine_transformers_gives(models, run, tmp_path):
    from transformers import CLIPImageProcessorPil, CLIPModel, ViTModel

    quiet_score(run, models / "clip", models / "dino")
    rows = read_scores(run)
    items = [json.loads(line) for line in (run / "items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [i["id"] for i in items]
    assert set(rows[0]) == {"id", "clip_t", "clip_t_bg", "clip_i", "clip_i_cond", "dino", "dino_cond", "style_clip",
                            "content_leak", "weights", "image"}
    weights = rows[0]["weights"]
    assert weights["clip"]["kind"] == "ViT (64 wide, 2 layers, patch 32)"
    assert weights["clip"]["file"] == "clip/model.safetensors"
    assert weights["clip"]["sha256"] == hashlib.sha256((models / "clip" / "model.safetensors").read_bytes()).hexdigest()
    assert weights["dino"]["eps"] == 1e-12 and weights["dino"]["model"] == "DINO"  # transformers ViTConfig's

    clip, dino = CLIPModel.from_pretrained(models / "clip").eval(), ViTModel.from_pretrained(models / "dino").eval()
    processor, tokenizer = CLIPImageProcessorPil(), reference_tokenizer(tmp_path)
    photos = sorted((DATA / "dataset" / "cat").glob("*.jpg"))
    assert len(photos) == 5

    def clip_image(paths):
        pixels = processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt").pixel_values
        return F.normalize(getattr(out := clip.get_image_features(pixel_values=pixels), "pooler_output", out), dim=-1)

    def clip_text(texts):
        ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return F.normalize(getattr(out := clip.get_text_features(input_ids=ids), "pooler_output", out), dim=-1)

    def dino_image(paths):
        return F.normalize(dino(pixel_values=dino_pixels(list(paths))).last_hidden_state[:, 0], dim=-1)

    item, row = items[1], rows[1]
    caption = (DATA.parents[2] / "assets" / item["style"]).with_suffix(".txt").read_text().strip()
    with torch.no_grad():
        g_clip, g_dino = clip_image([run / item["file"]])[0], dino_image([run / item["file"]])[0]
        want = dict(clip_t=clip_text([item["prompt"]])[0] @ g_clip,
                    clip_t_bg=clip_text([without_words(item["prompt"], "cat")])[0] @ g_clip,
                    clip_i=(clip_image(photos) @ g_clip).mean(), clip_i_cond=clip_image(photos[:1])[0] @ g_clip,
                    dino=(dino_image(photos) @ g_dino).mean(), dino_cond=dino_image(photos[:1])[0] @ g_dino,
                    style_clip=clip_image([DATA.parents[2] / "assets" / item["style"]])[0] @ g_clip,
                    content_leak=clip_text([f"a photo of {caption}"])[0] @ g_clip)
    assert without_words(item["prompt"], "cat") == "a in the jungle"
    for name, value in want.items():
        assert abs(row[name] - value.item()) < TOL, name


def test_two_ranks_score_files_merge_into_every_image_exactly_once(models, run):
    items = [json.loads(line) for line in (run / "items.jsonl").read_text().splitlines()]
    clip, dino = load_clip(models / "clip"), load_dino(models / "dino")
    alone = score_items(items, run, clip, dino, DATA, DATA.parents[2] / "assets", batch_size=2, progress=False)
    for r in range(2):
        rows = score_items(items[r::2], run, clip, dino, DATA, DATA.parents[2] / "assets", batch_size=2,
                           progress=False)
        write_lines(rank_file(run, r, 2), rows)
    merge_scores(run, [i["id"] for i in items], 2)
    merged = read_scores(run)
    assert [r["id"] for r in merged] == [i["id"] for i in items]  # none missing, none twice, in item order
    for got, want in zip(merged, alone):
        assert got.keys() == want.keys() and got["image"] == want["image"]
        assert all(abs(got[k] - want[k]) < TOL for k in got if k not in ("id", "image"))
    assert not list(run.glob("scores.rank-*"))  # merged files are removed

    write_lines(rank_file(run, 0, 2), merged[:2])
    write_lines(rank_file(run, 1, 2), merged[1:2])
    with pytest.raises(DrpError, match=f"image {merged[1]['id']} was scored twice"):
        merge_scores(run, [i["id"] for i in items], 2)
    write_lines(rank_file(run, 1, 2), [])
    with pytest.raises(DrpError, match=f"no score for {merged[2]['id']}"):
        merge_scores(run, [i["id"] for i in items], 2)


def test_score_refuses_a_run_with_missing_images_and_weights_of_the_wrong_kind(models, run, capsys):
    (run / "images" / "cat-shipwreck-00-00.png").unlink()
    assert main(["score", str(run), "--clip", str(models / "clip"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: 1 of the run's 3 images are missing (first: images/cat-shipwreck-00-00.png); "
                   "finish the run with its run command first.\n")
    Image.new("RGB", (64, 64)).save(run / "images" / "cat-shipwreck-00-00.png")
    assert main(["score", str(run), "--clip", str(models / "dino"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not 'clip'; --clip takes" in err and err.count("\n") == 1
    assert not (run / "scores.jsonl").exists()


def test_report_tabulates_means_with_bootstrap_intervals_breakdowns_and_a_contact_sheet(models, tmp_path):
    runs = [made_run(tmp_path / name, "dreambench", ("cat", "red_cartoon"), prompts=2, seed=seed)
            for name, seed in (("first", 0), ("second", 1))]
    for r in runs:
        quiet_score(r, models / "clip")  # CLIP only
    text = report(runs, tmp_path / "report")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    first, second = summary["runs"]
    rows = [read_scores(r) for r in runs]
    labels = [dict(subject=row["id"].split("-")[0]) for row in rows[0]]  # cat-00-00, red_cartoon-01-00
    values = [[row["clip_t"] for row in rs] for rs in rows]
    want = estimate(units_of(labels), values[0])  # stats.py's own tests check it by hand
    assert first["metrics"]["clip_t"] == want and first["units"] == {"subject": 2} and first["images"] == 4
    assert abs(want["mean"] - np.mean(values[0])) < 1e-12 and "dino" not in first["metrics"]
    assert summary["weights"]["clip"]["sha256"] == rows[0][0]["weights"]["clip"]["sha256"]
    assert abs(second["difference"]["clip_t"]["mean"] - (np.mean(values[1]) - np.mean(values[0]))) < 1e-12
    cat = [row["clip_t"] for row in rows[0] if row["id"].startswith("cat-")]
    assert first["breakdown"]["subject"]["cat"]["clip_t"] == dict(mean=sum(cat) / 2, images=2)
    assert set(first["breakdown"]["prompt kind"]) == {"recontextualisation"}  # prompts 1 and 2 of both lists
    line = next(x for x in text.splitlines() if x.startswith("| first |"))
    lo, hi = want["ci"]
    assert line.startswith("| first | plain | dreambench | 4 | 2 subjects | — | — | ")
    assert f"{100 * want['mean']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]" in line
    assert "## Paired differences to first" in text and "## By subject" in text and "| first | cat | 2 |" in text
    assert (tmp_path / "report" / "report.md").read_text() == text
    sheet = Image.open(runs[0] / "contact_sheet.png")
    assert sheet.size == ((1 + 2) * 128 + 8, 2 * (128 + 14))  # the photo, then 2 images; 2 subjects


def test_report_refuses_runs_scored_with_other_weights_or_over_other_items(models, tmp_path, capsys):
    a, b, c = (made_run(tmp_path / name, "dreambench", ("cat",), prompts=p) for name, p in (("a", 2), ("b", 2),
                                                                                           ("c", 1)))
    quiet_score(a, models / "clip")
    quiet_score(b, models / "clip2")
    quiet_score(c, models / "clip")
    assert main(["report", str(a), str(b)]) == 1
    err = capsys.readouterr().err
    sha = {name: hashlib.sha256((models / name / "model.safetensors").read_bytes()).hexdigest()[:12]
           for name in ("clip", "clip2")}
    assert err.startswith(f"error: {a} was scored with CLIP ViT (64 wide, 2 layers, patch 32) (clip/model.safetensors, "
                          f"sha256 {sha['clip']}…) without DINO and {b} with CLIP") and sha["clip2"] in err
    assert err.count("\n") == 1
    assert main(["report", str(a), str(c)]) == 1
    err = capsys.readouterr().err
    assert "hold different items (2 and 1), so their paired differences cannot be computed" in err
    assert err.count("\n") == 1
    assert main(["report", str(a), str(c), "--unpaired"]) == 0
    assert "## Paired differences" not in (a / "report.md").read_text()


def test_a_run_in_the_format_before_2_is_reported(models, run, tmp_path):
    config = json.loads((run / "config.json").read_text())
    for key in ("negative_prompt", "options", "ip_scale", "batch"):
        del config[key]
    (run / "config.json").write_text(json.dumps(dict(config, format=1)))
    quiet_score(run, models / "clip")
    summary = report([run], tmp_path / "report")
    assert "| run | plain | dual | 3 | 1 subject × 3 style pictures |" in summary


def test_the_real_row_compares_distinct_photos_of_each_subject(models, tmp_path):
    from transformers import CLIPImageProcessorPil, CLIPModel

    run = made_run(tmp_path / "run", "dreambench", ("cat", "red_cartoon"))
    quiet_score(run, models / "clip")
    clip, processor = CLIPModel.from_pretrained(models / "clip").eval(), CLIPImageProcessorPil()
    per_subject = []
    for name in ("cat", "red_cartoon"):
        photos = sorted((DATA / "dataset" / name).glob("*.jpg"))
        with torch.no_grad():
            pixels = processor([Image.open(p).convert("RGB") for p in photos], return_tensors="pt").pixel_values
            out = clip.get_image_features(pixel_values=pixels)
            e = F.normalize(getattr(out, "pooler_output", out), dim=-1)
        pairs = [(e[i] @ e[j]).item() for i in range(len(photos)) for j in range(len(photos)) if i != j]
        per_subject.append(sum(pairs) / len(pairs))
    text = report([run], tmp_path / "report", real=DATA, progress=False)
    real = json.loads((tmp_path / "report" / "summary.json").read_text())["real"]
    assert abs(real["metrics"]["clip_i"]["mean"] - np.mean(per_subject)) < TOL  # per subject, then over subjects
    assert real["images"] == 9 and real["units"] == {"subject": 2} and "dino" not in real["metrics"]
    assert "| real photos | DreamBench photos" in text
    moved = tmp_path / "elsewhere"
    shutil.copytree(models / "clip", moved)
    shutil.rmtree(models / "clip")  # the weights that scored the run are gone from where they were
    try:
        with pytest.raises(DrpError, match="are not at .*; give --clip where they are now"):
            report([run], tmp_path / "report", real=DATA, progress=False)
        assert report([run], tmp_path / "report", real=DATA, clip=moved, progress=False) == text
        with pytest.raises(DrpError, match="holds other CLIP weights than the ones that scored the runs"):
            report([run], tmp_path / "report", real=DATA, clip=models / "clip2", progress=False)
    finally:
        shutil.copytree(moved, models / "clip")


def test_score_resumes_keeping_rows_of_the_same_weights_and_merging_a_crashed_rank_file(models, run, monkeypatch):
    quiet_score(run, models / "clip", models / "dino")
    full = read_scores(run)
    scored = []
    real_score_items = score_module.score_items

    def counting(items, *args, **kwargs):
        scored.extend(item["id"] for item in items)
        return real_score_items(items, *args, **kwargs)

    monkeypatch.setattr(score_module, "score_items", counting)
    write_lines(run / "scores.jsonl", [full[0], full[2]])  # a row deleted
    quiet_score(run, models / "clip", models / "dino")
    assert scored == [full[1]["id"]]
    again = read_scores(run)
    assert [r["id"] for r in again] == [r["id"] for r in full] and again[0] == full[0] and again[2] == full[2]
    assert all(abs(again[1][k] - full[1][k]) < TOL for k in full[1] if k not in ("id", "weights", "image"))

    scored.clear()
    (run / "scores.jsonl").unlink()
    write_lines(rank_file(run, 1, 2), full[1:])  # what a crashed rank 1 of 2 left: two rows
    (run / ".scores.jsonl.99999.tmp").write_text("half")  # and a temporary file of the killed merge
    quiet_score(run, models / "clip", models / "dino")
    assert scored == [full[0]["id"]] and read_scores(run)[1:] == full[1:]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".scores", "scores"))) == ["scores.jsonl"]

    scored.clear()
    Image.new("RGB", (64, 64), "red").save(run / "images" / f"{full[2]['id']}.png")  # an image made again
    quiet_score(run, models / "clip", models / "dino")
    assert scored == [full[2]["id"]] and read_scores(run)[2]["image"] != full[2]["image"]

    scored.clear()
    quiet_score(run, models / "clip")  # other weights (no DINO): every row again
    assert scored == [r["id"] for r in full] and "dino" not in read_scores(run)[0]


def test_report_into_a_folder_that_cannot_be_made_or_of_broken_scores_is_one_sentence(models, run, tmp_path, capsys):
    quiet_score(run, models / "clip")
    (tmp_path / "a_file").write_text("mine")
    assert main(["report", str(run), "--out", str(tmp_path / "a_file" / "report")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot create the folder ") and err.count("\n") == 1, err
    assert (tmp_path / "a_file").read_text() == "mine"
    with open(run / "scores.jsonl", "a") as f:
        f.write('{"id": "cut short')  # a line cut in the middle
    assert main(["report", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "scores.jsonl is broken" in err and err.count("\n") == 1, err


def test_torchrun_with_two_processes_scores_every_image_once(models, run):
    repo = DATA.parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "drp.evaluate", "score", str(run), "--clip", str(models / "clip"), "--dino", str(models / "dino"),
           "--device", "cpu", "--no-progress"]
    done = subprocess.run(cmd, cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "scored 3 images" in done.stdout
    two = read_scores(run)
    assert not list(run.glob("scores.rank-*"))
    (run / "scores.jsonl").unlink()  # else the next score would keep every row
    quiet_score(run, models / "clip", models / "dino")
    one = read_scores(run)
    assert [r["id"] for r in two] == [r["id"] for r in one]
    for got, want in zip(two, one):
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) < TOL for k in got if k not in ("id", "weights", "image"))
        assert got["weights"] == want["weights"]
