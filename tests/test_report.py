"""The one-picture report of a run (drp/report.py), drawn from a fake `Result` with tiny images."""

import numpy as np
import pytest
import torch
from PIL import Image

from drp.errors import DrpError
from drp.pipeline import Result
from drp.report import MIN_WIDTH, PAD, save_report, text_lines

W, H = 40, 32  # output size of the fake result
GREY = 128
TINTED = (round(0.6 * GREY + 0.4 * 255), round(0.6 * GREY), round(0.6 * GREY))  # 40 % red over grey

DRP = dict(H_cu=7.1234, H_st=6.5, rho=1.0959, alpha=0.566, switch_step=28, steps=50,
           coverage={"content": 0.25, "style": None, "generated": 0.5})


def left_half(h=H, w=W):
    m = torch.zeros(h, w)
    m[:, : w // 2] = 1
    return m


def fake_result(masks=None, drp=DRP):
    out = Image.new("RGB", (W, H), (GREY, GREY, GREY))
    info = dict(prompt=["a cat on the beach, in the style of a painting"], seed=7, seeds=[7], steps=50, guidance=7.5)
    if drp is not None:
        info["drp"] = drp
    return Result([out], torch.zeros(1, 4, H // 8, W // 8), info, masks or {})


def grey_reference(size=(80, 64)):
    return Image.new("RGB", size, (GREY, GREY, GREY))  # same aspect as the output: fitted by resizing only


def panel(report, k):
    """The k-th panel of a report as an (H, W, 3) array."""
    arr = np.asarray(report)
    x = PAD + k * (W + PAD)
    return arr[PAD : PAD + H, x : x + W]


def test_report_shows_both_references_with_red_foreground_and_the_output(tmp_path):
    masks = {"content": left_half(), "style": left_half().flip(1), "generated": left_half()}
    path = save_report(tmp_path / "report.png", fake_result(masks), content=grey_reference(), style=grey_reference())
    report = Image.open(path)
    assert report.mode == "RGB"
    assert report.width == max(MIN_WIDTH, 4 * (W + PAD) + PAD) and report.height > H + 2 * PAD
    content, style, generated, output = (panel(report, k) for k in range(4))
    assert (content[:, : W // 2] == TINTED).all() and (content[:, W // 2 :] == GREY).all()
    assert (style[:, W // 2 :] == TINTED).all() and (style[:, : W // 2] == GREY).all()
    assert (generated[:, : W // 2] == TINTED).all() and (generated[:, W // 2 :] == GREY).all()
    assert (output == GREY).all()
    below = np.asarray(report)[PAD + H :]
    assert (below < 100).any()  # the text was drawn


def test_masks_of_another_size_are_fitted_to_the_panel(tmp_path):
    masks = {"content": left_half(8, 10)}
    path = save_report(tmp_path / "r.png", fake_result(masks), content=grey_reference())
    content = panel(Image.open(path), 0)
    assert (content[:, : W // 2] == TINTED).all() and (content[:, W // 2 :] == GREY).all()


@pytest.mark.parametrize("content, style, masks, panels", [
    (None, "style", {"style": left_half()}, 2),
    ("content", None, {"content": left_half(), "generated": left_half()}, 3),
    ("content", "style", {}, 3),  # references without masks are shown plainly
    (None, None, {}, 1),
])
def test_report_works_with_missing_references_or_masks(tmp_path, content, style, masks, panels):
    refs = {"content": grey_reference() if content else None, "style": grey_reference() if style else None}
    path = save_report(tmp_path / "r.png", fake_result(masks, drp=DRP if masks else None), **refs)
    report = Image.open(path)
    assert report.width == max(MIN_WIDTH, panels * (W + PAD) + PAD)
    assert (panel(report, panels - 1) == GREY).all()  # the output is always the last panel
    if not masks:
        assert all((panel(report, k) == GREY).all() for k in range(panels))


def test_text_lines_state_the_drp_numbers_and_tolerate_missing_ones():
    text = "\n".join(text_lines(fake_result().info))
    for piece in ("a cat on the beach", "seed: 7", "H_cu = 7.123", "H_st = 6.500", "rho = H_cu/H_st = 1.096",
                  "alpha = 0.566", "N_e = 28 of 50", "content 25.0 %", "style n/a", "generated 50.0 %"):
        assert piece in text
    sparse = "\n".join(text_lines(fake_result(drp=dict(DRP, H_st=None, rho=None, coverage={})).info))
    assert "H_st = n/a" in sparse and "coverage" not in sparse
    assert not any("H_cu" in line for line in text_lines(fake_result(drp=None).info))


def test_a_long_non_latin_prompt_is_wrapped_and_drawn(tmp_path):
    result = fake_result()
    result.info["prompt"] = ["一只猫 " * 40 + "a cat with a very long description " * 10]
    path = save_report(tmp_path / "r.png", result)
    short = Image.open(save_report(tmp_path / "s.png", fake_result()))
    assert Image.open(path).height > short.height  # more lines


def test_a_missing_folder_is_a_user_error_and_nothing_is_left_behind(tmp_path):
    with pytest.raises(DrpError, match="does not exist"):
        save_report(tmp_path / "absent" / "r.png", fake_result())
    save_report(tmp_path / "r.png", fake_result())
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]


def test_the_generated_coverage_of_each_image_and_an_infinite_rho_are_written_out():
    drp = dict(DRP, rho=float("inf"), coverage={"content": 0.25, "generated": [0.5, 0.125]})
    text = "\n".join(text_lines(fake_result(drp=drp).info))
    assert "rho = H_cu/H_st = inf" in text and "generated 50.0 %, 12.5 %" in text


def test_the_spectrum_plots_group_the_layers_by_their_token_grid_even_for_some_blocks_only():
    from drp.ip_adapter import attn2_layers
    from drp.report import by_grid

    layers = list(attn2_layers())  # SD 1.5's 16 attn2 layers
    grids = {grid: sorted({n.split(".attentions")[0] for n in names})
             for grid, names in by_grid(layers, 512, 512).items()}
    assert grids == {"64x64": ["down_blocks.0", "up_blocks.3"], "32x32": ["down_blocks.1", "up_blocks.2"],
                     "16x16": ["down_blocks.2", "up_blocks.1"], "8x8": ["mid_block"]}
    some = [n for n in layers if n.startswith(("up_blocks.1.", "mid_block."))]  # ip_layers="up_blocks.1,mid_block"
    assert list(by_grid(some, 512, 512)) == ["16x16", "8x8"]
    assert list(by_grid(some, 512, 776)) == ["16x25", "8x13"]  # the latent 64x97 halved, rounded up as the UNet does
