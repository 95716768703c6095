"""Other methods' images: `items` writes the list and nothing else, `import` brings a folder of outside pictures
(any format and size) into the run, and `score` and `report` treat it like a run of drp's."""

import json

import numpy as np
from PIL import Image

from drp.evaluate.__main__ import main
from test_evaluate_run import DATA
from test_evaluate_score import models, quiet_score  # noqa: F401 (a fixture)

ITEMS = ["--bench", "dreambench", "--data", str(DATA), "--subjects", "cat,red_cartoon", "--prompts", "1",
         "--images-per-prompt", "2"]
IDS = ["cat-00-00", "cat-00-01", "red_cartoon-00-00", "red_cartoon-00-01"]


def outside_pictures(folder):
    """What another tool might write: a PNG, a JPEG, a WebP and a grey PNG, of different sizes; and a stray file."""
    folder.mkdir()
    rng = np.random.RandomState(3)
    shapes = {"cat-00-00.png": (96, 80, 3), "cat-00-01.jpg": (512, 512, 3), "red_cartoon-00-00.webp": (40, 64, 3),
              "red_cartoon-00-01.png": (64, 64)}
    for name, shape in shapes.items():
        Image.fromarray(rng.randint(0, 256, shape, dtype=np.uint8)).save(folder / name)
    Image.new("RGB", (8, 8)).save(folder / "contact.png")  # no item of the run
    (folder / "notes.txt").write_text("seeds as asked")
    return folder


def error_of(capsys, argv):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_items_writes_the_list_for_another_tool_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "other"
    assert main(["items", *ITEMS, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "items.jsonl"]
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert [i["id"] for i in items] == IDS and items[0]["content"] == "dataset/cat/00.jpg"
    assert set(items[0]) == {"id", "prompt", "subject", "content", "style", "seed", "file"}
    assert json.loads((out / "config.json").read_text())["mode"] == "external"
    assert main(["items", *ITEMS, "--out", str(out)]) == 0  # the same list again: fine
    err = error_of(capsys, ["items", *ITEMS[:-1], "3", "--out", str(out)])
    assert "holds a run with other settings (images_per_prompt 2, not 3)" in err


def test_import_takes_every_items_picture_says_what_is_missing_and_extra_and_the_run_is_scored(models, tmp_path,
                                                                                               capsys):
    out, pictures = tmp_path / "other", outside_pictures(tmp_path / "rendered")
    assert main(["items", *ITEMS, "--out", str(out)]) == 0
    (pictures / "red_cartoon-00-01.png").rename(tmp_path / "later.png")
    err = error_of(capsys, ["import", str(out), "--from", str(pictures), "--method", "Other"])
    assert "lacks 1 of the 4 items (red_cartoon-00-01); render them, or add --partial" in err
    assert not (out / "images").exists()
    capsys.readouterr()
    assert main(["import", str(out), "--from", str(pictures), "--method", "Other", "--partial", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"left out the pictures in {pictures} that are no item of {out} (1): contact" in said
    assert "items still missing (1): red_cartoon-00-01" in said
    (tmp_path / "later.png").rename(pictures / "red_cartoon-00-01.png")
    for name in ("cat-00-00.png", "cat-00-01.jpg", "red_cartoon-00-00.webp"):
        (pictures / name).unlink()  # imported already: the second import completes the run
    assert main(["import", str(out), "--from", str(pictures), "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i}.png" for i in IDS]
    image = Image.open(out / "images" / "cat-00-01.png")
    assert image.format == "PNG" and image.size == (512, 512) and image.mode == "RGB"
    assert image.info["parameters"].startswith("a cat in the jungle\nMethod: Other, Seed: ")
    grey = np.asarray(Image.open(out / "images" / "red_cartoon-00-01.png"))
    assert grey.shape == (64, 64, 3) and np.array_equal(grey[..., 0], np.asarray(Image.open(pictures /
                                                                                           "red_cartoon-00-01.png")))
    err = error_of(capsys, ["import", str(out), "--from", str(pictures), "--method", "Another"])
    assert "already holds images of the method 'Other'" in err

    quiet_score(out, models / "clip", models / "dino")
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| other | Other | dreambench | 4 | 2 subjects | — | — |" in text


def test_a_run_of_drp_is_not_an_import_target(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dict(format=2, mode="plain")))
    (run / "items.jsonl").write_text("")
    err = error_of(capsys, ["import", str(run), "--from", str(tmp_path)])
    assert "holds a run made by drp (plain mode), not a list of `items`" in err
