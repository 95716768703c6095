"""sample.py on a tiny converted checkpoint: the PNG and its metadata, determinism, and every bad input.

The runs that prove what a user sees (exit status, no traceback, the files) start `python sample.py`
in a fresh process. The many bad-input cases call `sample.main` in this process, which is the same
code without the few seconds of starting Python and torch each time.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from drp import devices
from drp.devices import resolve_device, resolve_dtype
from drp.errors import DrpError
from drp.png_info import parameters_text, save_png
from drp.unet import UNet
from tiny import tiny_weights_dir
from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--steps", "2", "--height", "64", "--width", "64", "--no-progress"]  # 64 px, 2 steps: a second each
FOX = ["--prompt", "a red fox, in the snow", "--negative-prompt", "blurry", "--seed", "7", "--num-images", "2", *QUICK]


sample = load_script("sample")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_weights_dir(tmp_path_factory.mktemp("tiny") / "weights")


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: one thread is fastest on a shared machine
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_images(weights, tmp_path_factory):
    """One run writing two images into a folder: seeds 7 and 8."""
    out = tmp_path_factory.mktemp("out")
    return run_cli("--weights", weights, *FOX, "--out", out), out


def test_writes_each_image_as_seed_png_and_says_where(two_images):
    done, out = two_images
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["7.png", "8.png"]
    assert f"saved {out / '7.png'} (seed 7)" in done.stdout
    assert f"saved {out / '8.png'} (seed 8)" in done.stdout
    assert "Traceback" not in done.stderr
    assert Image.open(out / "7.png").size == (64, 64)


def test_png_carries_the_parameters_in_the_web_ui_format(two_images):
    _, out = two_images
    expected = ('a red fox, in the snow\nNegative prompt: blurry\n'
                'Steps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: {}, Size: 64x64, Model: weights-source')
    assert Image.open(out / "7.png").text["parameters"] == expected.format(7)
    assert Image.open(out / "8.png").text["parameters"] == expected.format(8)


def test_the_same_command_twice_writes_identical_files(two_images, weights, tmp_path):
    first, out = two_images
    again = run_cli("--weights", weights, *FOX, "--out", tmp_path)
    assert again.returncode == 0, again.stderr
    for name in ("7.png", "8.png"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
    assert Image.open(out / "7.png").tobytes() != Image.open(out / "8.png").tobytes()


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--help"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--prompt", "--negative-prompt", "--steps", "--guidance", "--seed", "--height", "--width",
                 "--num-images", "--eta", "--out", "--weights", "--device", "--dtype", "--no-progress",
                 "--tiled-decode", "--compile", "--no-download",
                 "--content", "--style", "--subject", "--content-mask", "--style-mask", "--switch-step",
                 "--report", "--cache-dir", "--no-cache", "--clear-cache", "--no-masks", "--fixed-switch",
                 "--layers", "--style-caption", "--mode", "--rank-energy", "--rank-rule", "--scale-early",
                 "--scale-late", "--late", "--no-bg-prompt", "--ip-image", "--ip-scale"):
        assert flag in shown, flag


def test_missing_weights_with_no_download_says_in_one_line_what_to_run(tmp_path):
    done = run_cli("--weights", tmp_path / "empty", "--no-download", "--prompt", "a cat", "--out", tmp_path, *QUICK)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "python convert_weights.py --download" in lines[0] and "python convert_weights.py PATH" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_a_bad_number_fails_in_a_fresh_process_with_status_1_and_no_traceback(weights, tmp_path):
    done = run_cli("--weights", weights, "--prompt", "a cat", "--out", tmp_path, *QUICK, "--steps", 0)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "error: steps must be a whole number from 1 to 999, got 0.\n"
    assert list(tmp_path.iterdir()) == []


# --- every bad input, in this process ----------------------------------------------------------------------


BAD_INPUTS = [  # (arguments, the start of the error sentence); {tmp} is the test's own folder
    (["--steps", "0"], "steps must be a whole number from 1 to 999"),
    (["--guidance", "-1"], "guidance must be a number ≥ 0"),
    (["--height", "100"], "height must be a multiple of 8 from 64 to 2048"),
    (["--height", "56"], "height must be a multiple of 8 from 64 to 2048"),
    (["--width", "2056"], "width must be a multiple of 8 from 64 to 2048"),
    (["--eta", "1.5"], "eta must be a number from 0 to 1"),
    (["--num-images", "0"], "--num-images must be a whole number ≥ 1"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to 4294967295"),
    (["--device", "tpu"], "unknown device 'tpu'; choose one of auto, cpu, cuda, mps"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'; choose one of auto, fp32, fp16, bf16"),
    (["--device", "cpu", "--dtype", "fp16"], "fp16 is not supported on the CPU; use --dtype bf16 or --dtype fp32"),
    (["--out", "{tmp}/missing"], "the output folder {tmp}/missing does not exist"),
    (["--out", "{tmp}/missing/x.png"], "the output folder {tmp}/missing does not exist"),
    (["--out", "{tmp}/a-file"], "the output folder {tmp}/a-file is a file, not a folder"),
    (["--out", "{tmp}/x.jpg"], "images are saved as PNG"),
    (["--content", "{tmp}/nowhere.png"], "the content image {tmp}/nowhere.png does not exist"),
    (["--style", "{tmp}/notes.txt"], "the style image {tmp}/notes.txt could not be read as an image"),
    (["--content-mask", "{tmp}/empty.png"], "the content mask {tmp}/empty.png could not be read as an image"),
    (["--no-masks", "--style-mask", "{tmp}/empty.png"], "--no-masks gives every reference token to every query, "
                                                        "so it cannot take --content-mask or --style-mask"),
    (["--mode", "ip-adapter", "--content", str(ROOT / "assets/chelsea.png"), "--content-mask",
      str(ROOT / "assets/chelsea.png")], "the ip-adapter mode splits foreground from background spectrally and "
                                         "takes no masks"),
    (["--report", "{tmp}/report.txt"], "the report is a PNG picture"),
    (["--report", "{tmp}/missing/r.png"], "the report folder {tmp}/missing does not exist"),
    (["--weights", "{tmp}/no-weights", "--no-download"], "{tmp}/no-weights holds no complete set of converted weights"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_a_bad_input_gives_status_1_one_error_sentence_and_writes_nothing(weights, tmp_path, capsys, args, message):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "out").mkdir()
    before = sorted(tmp_path.rglob("*"))
    argv = ["--weights", str(weights), "--prompt", "a cat", "--out", str(tmp_path / "out"), *QUICK]
    assert sample.main(argv + [a.format(tmp=tmp_path) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(tmp=tmp_path)), err
    assert err.endswith(".\n") and err.count("\n") == 1, err
    assert sorted(tmp_path.rglob("*")) == before


def test_cuda_on_a_machine_without_it_is_refused_before_loading(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert sample.main(["--weights", str(weights), "--prompt", "a cat", "--out", str(tmp_path), *QUICK,
                        "--device", "cuda"]) == 1
    expected = "error: cuda was asked for but this machine has no CUDA device; use --device cpu.\n"
    assert capsys.readouterr().err == expected


def test_only_a_folder_without_converted_weights_is_downloaded_into_and_ip_adapter_unless_self_attention(
        weights, tmp_path):
    def downloads(folder, *more):
        return sample.first_run_downloads(sample.parse_args(["--weights", str(folder), *more]))

    fresh = tmp_path / "fresh"
    assert downloads(fresh) == ["sd15", "ip-adapter"]
    assert downloads(fresh, "--mode", "ip-adapter", "--prompt", "a cat") == ["sd15", "ip-adapter"]
    assert downloads(fresh, "--mode", "self-attention") == ["sd15"]
    assert downloads(fresh, "--no-download") == []
    assert downloads(weights) == [] and downloads(weights, "--mode", "ip-adapter") == []  # SD there: not added to


def test_on_a_fresh_folder_ip_adapter_flags_pass_the_checks_unless_the_run_fetches_sd_alone(tmp_path):
    def checked(*more):
        args = sample.parse_args(["--weights", str(tmp_path / "fresh"), "--out", str(tmp_path), *more])
        sample.with_demo(args)
        return sample.checked_settings(args)

    checked("--mode", "ip-adapter")  # the demo: its first run fetches IP-Adapter, so nothing is missing
    checked("--ip-image", str(ROOT / "assets/chelsea.png"))
    with pytest.raises(DrpError, match=r"^--ip-image needs IP-Adapter's files, and .*fresh lacks ip_adapter.json, "
                                       r"image_encoder.json; add them with `python convert_weights.py --download"):
        checked("--ip-image", str(ROOT / "assets/chelsea.png"), "--mode", "self-attention")
    assert list(tmp_path.iterdir()) == []  # nothing fetched, nothing written


@pytest.mark.parametrize("value", ["abc", "nan", "inf"])
def test_a_guidance_that_is_not_a_number_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "a cat", "--guidance", value])
    assert e.value.code == 2  # argparse's status for usage errors
    assert "error: argument --guidance:" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_an_unwritable_output_folder_is_refused(weights, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert sample.main(["--weights", str(weights), "--prompt", "a cat", "--out", str(locked), *QUICK]) == 1
    assert capsys.readouterr().err == f"error: the output folder {locked} is not writable; choose another.\n"


# --- output names, warnings, cache -------------------------------------------------------------------------


def test_several_images_into_a_file_name_are_numbered(weights, tmp_path, capsys):
    assert sample.main(["--weights", str(weights), "--prompt", "a cat", "--num-images", "2",
                        "--out", str(tmp_path / "cat.png"), *QUICK]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-0.png", "cat-1.png"]


def test_the_default_output_folder_is_created(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sample.main(["--weights", str(weights), "--prompt", "a cat", *QUICK]) == 0
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["42.png"]  # 42: the default seed


def test_a_long_prompt_warns_once_naming_the_first_dropped_word(weights, tmp_path, capsys):
    prompt = " ".join(["cat"] * 75 + ["zebra", "moon"])  # "cat" is one token: 75 of them fill the context
    assert sample.main(["--weights", str(weights), "--prompt", prompt, "--num-images", "2",
                        "--out", str(tmp_path), *QUICK]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the prompt is longer than 77 tokens; everything from 'zebra' on is ignored."]


def test_clear_cache_removes_the_cached_trajectories(weights, tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / f"drp-{'0' * 64}.safetensors").write_bytes(b"stale")
    (cache_dir / "keep.txt").write_text("not ours")
    assert sample.main(["--weights", str(weights), "--prompt", "a cat", "--out", str(tmp_path), *QUICK,
                        "--cache-dir", str(cache_dir), "--clear-cache"]) == 0
    assert [p.name for p in cache_dir.iterdir()] == ["keep.txt"]
    assert f"cache cleared: {cache_dir} (1 removed)" in capsys.readouterr().out


# --- the pieces sample.py is made of: the PNG text, devices and dtypes ---------------------------------------


INFO = dict(prompt=["a cat", "a dog"], negative_prompt="", steps=50, guidance=7.5, height=512, width=768, seed=42,
            seeds=[42, 43], eta=0.0, sampler="DDIM", model="v1-5-pruned-emaonly.safetensors")


def test_parameters_text_is_the_web_ui_format_width_first_without_an_empty_negative_line():
    assert parameters_text(INFO, 1) == ("a dog\nSteps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 43, "
                                        "Size: 768x512, Model: v1-5-pruned-emaonly")


def test_parameters_text_adds_eta_the_drp_numbers_and_quotes_values_that_would_break_the_line():
    info = dict(INFO, negative_prompt="blurry", eta=0.5, model="my, model: v2.ckpt", tiled_decode=True,
                drp=dict(H_cu=6.90094, H_st=7.8, rho=0.8847, alpha=0.39, switch_step=23, coverage={"content": 0.1}))
    assert parameters_text(info, 0) == (
        'a cat\nNegative prompt: blurry\nSteps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 768x512, '
        'Model: "my, model: v2", Eta: 0.5, Tiled decode: True, DRP H_cu: 6.9009, DRP H_st: 7.8, DRP rho: 0.8847, DRP alpha: 0.39, '
        'DRP switch step: 23')


def test_save_png_writes_the_chunk_and_leaves_no_temporary_file(tmp_path):
    image = Image.new("RGB", (8, 8), (200, 30, 30))
    save_png(image, tmp_path / "a.png", "a cat\nSteps: 2")
    save_png(image, tmp_path / "b.png", "a cat\nSteps: 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    assert Image.open(tmp_path / "a.png").text == {"parameters": "a cat\nSteps: 2"}
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_save_png_into_a_folder_that_cannot_take_it_raises_drp_error(tmp_path):
    with pytest.raises(DrpError, match="^cannot write .*; choose another folder.$"):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "missing" / "a.png", "a cat")


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_auto_dtype_is_fp16_on_cuda_bf16_on_a_cpu_with_native_bf16_else_fp32(monkeypatch):
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("auto", "mps") == torch.float32
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx512f"})
    assert resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"amx_bf16"})
    assert resolve_dtype("auto", "cpu") == torch.float32  # PyTorch would not use AVX512 kernels here


def test_named_dtypes_and_torch_objects_resolve_to_themselves():
    assert [resolve_dtype(n, "cpu") for n in ("fp32", "bf16", "FP32")] == [torch.float32, torch.bfloat16, torch.float32]
    assert resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cuda") == torch.float16


def test_compile_runs_the_unet_through_torch_compile_for_the_same_image(weights, tmp_path, monkeypatch, capsys):
    compiled, module_compile = [], torch.nn.Module.compile

    def compile_without_code_generation(module, **kwargs):  # dynamo's tracing, not minutes of C++ builds
        compiled.append(module)
        module_compile(module, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_without_code_generation)
    argv = ["--weights", str(weights), "--prompt", "a cat", *QUICK]
    assert sample.main(argv + ["--out", str(tmp_path / "eager.png")]) == 0
    assert not compiled
    assert sample.main(argv + ["--out", str(tmp_path / "compiled.png"), "--compile"]) == 0
    assert len(compiled) == 1 and isinstance(compiled[0], UNet) and "--compile" in capsys.readouterr().out
    eager, got = (np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=int) for name in ("eager", "compiled"))
    assert np.abs(eager - got).max() <= 1  # the same image, up to float rounding in the last pixel level


# DRP-Diff end to end (both references, the report, the cache) is in tests/test_sample_drp.py.
