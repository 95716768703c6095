"""`score` and `report`: every field of scores.jsonl against transformers, rank files merged exactly once,
the table's means and standard errors, the contact sheet.

The run folder is written by hand (items of the dual benchmark, random pictures as the generated images),
so no generation is needed; the CLIP and DINO models are tiny transformers folders.
"""

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from drp.errors import DrpError
from drp.evaluate.__main__ import main
from drp.evaluate.data import without_words
from drp.evaluate.report import report
from drp.evaluate.run import build_items, make_config
from drp.evaluate.score import merge_scores, rank_file, score, score_items, write_lines
from drp.evaluate.metrics import load_clip, load_dino
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
    CLIPModel(CLIPConfig(text_config=small, vision_config=dict(small, patch_size=32), projection_dim=32)
              ).save_pretrained(root / "clip")
    ViTModel(ViTConfig(**dict(small, patch_size=32)), add_pooling_layer=False).save_pretrained(root / "dino")
    return root


@pytest.fixture
def run(tmp_path):
    """A finished dual-benchmark run: the cat × the three paintings × one prompt, random images."""
    items, _ = build_items("dual", DATA, subjects=["cat"], prompts=1, images_per_prompt=1)
    cfg = make_config("dual", data=DATA, subjects=["cat"], prompts=1, images_per_prompt=1, steps=2, height=64,
                      width=64)
    out = tmp_path / "run"
    (out / "images").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "items.jsonl").write_text("".join(json.dumps(asdict(i)) + "\n" for i in items))
    rng = np.random.RandomState(0)
    for item in items:
        Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(out / item.file)
    return out


def read_scores(run):
    return [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]


def test_every_field_equals_the_cosine_transformers_gives(models, run, tmp_path):
    from transformers import CLIPImageProcessorPil, CLIPModel, ViTModel

    score(run, models / "clip", models / "dino", device="cpu", progress=False, log=lambda *a: None)
    rows = read_scores(run)
    items = [json.loads(line) for line in (run / "items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [i["id"] for i in items]
    assert set(rows[0]) == {"id", "clip_t", "clip_t_bg", "clip_i", "clip_i_cond", "dino", "dino_cond", "style_clip"}

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
    with torch.no_grad():
        g_clip, g_dino = clip_image([run / item["file"]])[0], dino_image([run / item["file"]])[0]
        want = dict(clip_t=clip_text([item["prompt"]])[0] @ g_clip,
                    clip_t_bg=clip_text([without_words(item["prompt"], "cat")])[0] @ g_clip,
                    clip_i=(clip_image(photos) @ g_clip).mean(), clip_i_cond=clip_image(photos[:1])[0] @ g_clip,
                    dino=(dino_image(photos) @ g_dino).mean(), dino_cond=dino_image(photos[:1])[0] @ g_dino,
                    style_clip=clip_image([DATA.parents[2] / "assets" / item["style"]])[0] @ g_clip)
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
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < TOL for k in got if k != "id")
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


def test_report_tabulates_mean_and_standard_error_and_draws_a_contact_sheet(models, run, tmp_path):
    score(run, models / "clip", None, device="cpu", progress=False, log=lambda *a: None)  # CLIP only
    text = report([run], tmp_path / "report")
    rows = read_scores(run)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())[0]
    values = [r["clip_t"] for r in rows]
    sem = np.std(values, ddof=1) / math.sqrt(len(values))
    assert summary["images"] == 3 and summary["mode"] == "plain" and "dino" not in summary["metrics"]
    assert abs(summary["metrics"]["clip_t"]["mean"] - np.mean(values)) < 1e-12
    assert abs(summary["metrics"]["clip_t"]["sem"] - sem) < 1e-12
    line = text.splitlines()[2]
    assert line.startswith("| run | dual | plain | 3 | ")
    assert f"{np.mean(values):.4f} ± {sem:.4f} / {100 * np.mean(values):.2f} ± {100 * sem:.2f}" in line
    assert (tmp_path / "report" / "report.md").read_text() == text
    sheet = Image.open(run / "contact_sheet.png")
    assert sheet.size == ((2 + 1) * 128 + 8, 3 * (128 + 14))  # content + style, then 1 image; 3 pairs


def test_report_into_a_folder_that_cannot_be_made_or_of_broken_scores_is_one_sentence(models, run, tmp_path, capsys):
    score(run, models / "clip", None, device="cpu", progress=False, log=lambda *a: None)
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
    score(run, models / "clip", models / "dino", device="cpu", progress=False, log=lambda *a: None)
    one = read_scores(run)
    assert [r["id"] for r in two] == [r["id"] for r in one]
    for got, want in zip(two, one):
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < TOL for k in got if k != "id")
