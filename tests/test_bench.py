"""`python -m drp.bench` runs end to end on tiny models and reports what it measured, as a table and as JSON."""

import json
import mmap
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from drp.bench import run, timing
from drp.errors import DrpError
from drp.model_io import load
from drp.unet import UNetConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One tiny benchmark run: the UNet (with the DRP-Diff steps), the attention memory, loading, and the cost of
    recording attention maps."""
    tmp = tmp_path_factory.mktemp("bench")
    out = subprocess.run([sys.executable, "-m", "drp.bench", "--tiny", "--quick", "--repeats", "1",
                          "--only", "unet,attention,load,drp-ip,maps", "--workdir", str(tmp / "work"),
                          "--json", str(tmp / "bench.json")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout, json.loads((tmp / "bench.json").read_text()), tmp / "work"


def test_report_names_the_machine_and_the_matmul_ceiling(report):
    stdout, data, _ = report
    assert data["machine"]["threads"] >= 1 and data["calibration"]["fp32"] > 0
    assert "matmul ceiling" in stdout


def test_unet_rows_compare_ours_with_diffusers_on_the_same_weights(report):
    _, data, _ = report
    unet = next(r for r in data["rows"] if r["name"] == "UNet 32×32, batch 2")
    assert unet["errors"]["ours_vs_ref"] <= 1e-4  # the same tensors give the same noise prediction
    assert unet["ratio"] == pytest.approx(unet["ours"]["median"] / unet["ref"]["median"])
    assert unet["ours"]["gflop_s"] > 0 and unet["gflops"] > 0
    assert {"DRP step 32×32 (early) / plain CFG step", "DRP step 32×32 (late) / plain CFG step"} <= {
        r["name"] for r in data["rows"]}


def test_the_ip_adapter_modes_step_is_set_against_a_plain_step_and_its_svds_are_timed(report):
    _, data, _ = report
    rows = {r["name"]: r for r in data["rows"]}
    for stage in ("early", "late"):
        step = rows[f"DRP-IP step 32×32 ({stage}) / plain CFG step"]
        assert step["ratio"] == pytest.approx(step["ours"]["median"] / step["ref"]["median"]) and step["ratio"] > 0
    assert rows["DRP-IP: SVDs of the 16 image-key projections"]["ours"]["median"] > 0
    filtered = rows["DRP-IP step 32×32 (early), filter_values on / off"]  # set against the unfiltered early step
    assert filtered["ref"]["runs"] == rows["DRP-IP step 32×32 (early) / plain CFG step"]["ours"]["runs"]


def test_recording_attention_maps_is_timed_against_the_same_step_in_each_mode_and_stage(report):
    _, data, _ = report
    rows = {r["name"]: r for r in data["rows"]}
    for mode in ("ip-adapter", "self-attention"):
        for stage in ("early", "late"):
            r = rows[f"attention maps 32×32, {mode} ({stage}): recording / not"]
            assert r["ratio"] == pytest.approx(r["ours"]["median"] / r["ref"]["median"]) and r["ratio"] > 0
            assert ("peak memory" in r["note"]) == sys.platform.startswith("linux")


def test_attention_row_shows_the_fused_kernel_holds_no_score_matrix(report):
    _, data, _ = report
    attention = next(r for r in data["rows"] if r["name"].startswith("attention 4096"))
    scores_mb = 2 * 8 * 4096 * 4096 * 4 / 2**20
    assert attention["ref"]["median"] >= scores_mb  # the explicit softmax: the measurement sees it
    assert attention["ours"]["median"] <= scores_mb / 8


def test_load_rows_hold_both_peaks_and_the_table_lists_every_row(report):
    stdout, data, work = report
    loads = [r for r in data["rows"] if "load fp16 files" in r["name"]]
    can_drop = sys.platform.startswith("linux") and file_system(work) not in ("tmpfs", "ramfs")
    assert [r["name"].startswith("cold") for r in loads] == [False, True][: 1 + can_drop]
    assert can_drop or "cold load not measured: the files cannot be dropped from the page cache" in stdout
    for loading in loads:
        assert len(loading["ours"]["runs"]) == 1 and loading["peak_gib"] > 0 and loading["ref_peak_gib"] > 0
    assert {c["row"] for c in data["targets"]} >= {r["name"] for r in loads}  # the issue's bounds, cold too
    for r in data["rows"]:
        assert r["name"] in stdout


def file_system(path):
    """The type of the file system holding `path`, from /proc/mounts (Linux)."""
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    return max((m for m in mounts if Path(path).is_relative_to(m[0])), key=lambda m: len(m[0]))[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the page cache is read with Linux's mincore")
def test_the_cold_load_starts_with_the_files_out_of_the_page_cache(tmp_path):
    if file_system(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("a file in memory cannot leave the page cache")
    (tmp_path / "folder").mkdir()
    path = tmp_path / "folder" / "unet.safetensors"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, just written: all its 4 KiB pages in the page cache
    pages = -(-path.stat().st_size // mmap.PAGESIZE)
    assert timing.cached_pages(path) == pages
    timing.drop_from_page_cache([tmp_path])
    assert timing.cached_pages(path) == 0
    assert path.read_bytes() == bytes(range(256)) * 4096  # the file is as it was, and read back in
    assert timing.cached_pages(path) == pages
    assert timing.cold_start_possible([tmp_path])  # the benchmark's check: it drops them, and sees it
    assert timing.cached_pages(path) == 0


@pytest.mark.skipif(not Path("/dev/shm").is_dir() or file_system("/dev/shm") != "tmpfs", reason="no tmpfs at /dev/shm")
def test_files_held_in_memory_are_not_taken_for_a_cold_start():
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        (Path(folder) / "unet.safetensors").write_bytes(bytes(4096))
        assert not timing.cold_start_possible([folder])  # tmpfs: the page cache is the file itself


def test_random_weights_folder_loads_with_drp_and_has_the_configs_asked_for(report):
    _, _, work = report
    sd = load(work / "weights")
    assert sd.unet.cfg == UNetConfig.tiny() and sd.source["layout"] == "diffusers" and sd.source["dtype"] == "fp16"
    values = torch.cat([p.flatten() for p in sd.unet.parameters()])
    assert values.std() > 0.01  # random, not left at zero


def test_extrapolation_repeats_each_kind_of_unet_call_at_its_warm_time():
    timer = timing.UNetTimer(torch.nn.Identity(), torch.device("cpu"))
    # 2 steps: two inversion calls (batch 1) and two sampling calls (batch 4), the first of each cold
    timer.calls = [(1, 3.0), (1, 1.0), (4, 9.0), (4, 4.0)]
    expected = 20.0 + 2 * 24 * 1.0 + 2 * 24 * 4.0  # each call made 25× as often, at its warm time
    assert timing.extrapolate(20.0, timer, steps=2) == pytest.approx(expected)


def test_an_unknown_measurement_is_refused_with_one_sentence():
    out = subprocess.run([sys.executable, "-m", "drp.bench", "--only", "unet,speed"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.startswith("error: unknown measurement 'speed'")


def test_bf16_on_a_cpu_that_only_emulates_it_is_refused(monkeypatch):
    import drp.devices

    monkeypatch.setattr(drp.devices, "cpu_has_fast_bf16", lambda: False)
    with pytest.raises(DrpError, match="no native bf16"):
        run.check_dtype_is_fast(run.parse_args(["--dtype", "bf16"]))
    monkeypatch.setattr(drp.devices, "cpu_has_fast_bf16", lambda: True)
    assert run.check_dtype_is_fast(run.parse_args(["--dtype", "bf16"])).type == "cpu"


def test_the_cpu_targets_of_the_issue_are_checked_on_the_cpu_only():
    rows = [{"name": "UNet 64×64, batch 2", "ratio": 0.4}, {"name": "DRP step 64×64 (late) / plain CFG step",
                                                            "ratio": 2.5}]
    on_cpu = {(c["row"], c["bound"]): c["met"] for c in run.check_targets(rows, "bf16", "cpu")}
    assert on_cpu == {("UNet 64×64, batch 2", 0.5): True, ("DRP step 64×64 (late) / plain CFG step", 2.2): False}
    on_cpu_fp32 = {(c["row"], c["bound"]) for c in run.check_targets(rows, "fp32", "cpu")}
    assert ("UNet 64×64, batch 2", 1.0) in on_cpu_fp32 and ("UNet 64×64, batch 2", 0.5) not in on_cpu_fp32
    on_gpu = {(c["row"], c["bound"]) for c in run.check_targets(rows, "fp16", "cuda")}
    assert on_gpu == {("DRP step 64×64 (late) / plain CFG step", 2.2)}  # the bf16 CPU figures are not the GPU's
