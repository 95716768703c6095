"""`python sample.py` on a fresh machine: it names the mode first, says what it downloads (SD 1.5, IP-Adapter
and its image encoder), downloads and converts them, then runs the demo in the IP-Adapter mode; `--mode
self-attention` fetches SD alone; `--no-download` refuses instead. Interrupted downloads resume on the next
run, damaged files are refused with nothing converted, and a conversion that fails after SD's leaves SD
usable for the next run to finish. A default address's pinned sha256 counts whatever the server states.

A local HTTP server on 127.0.0.1 (tests/local_server.py FileHost) plays both hosts: the tiny SD checkpoint
at /sd/, a tiny IP-Adapter and image encoder at /h94/ in h94/IP-Adapter's layout, each with its sha256 in
its ETag. $DRP_WEIGHTS_URL and $DRP_IP_ADAPTER_URL point there. The acceptance run is a fresh process
without standard input, as on CI; the others call `sample.main` in this process.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import drp
import drp.convert_ip_adapter as cia
import drp.download
from checkpoints import tiny_checkpoint
from ip_checkpoints import reference_encoder, write_h94_folder
from local_server import FileHost, serving_files
from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
NAME = "v1-5-pruned-emaonly.safetensors"
SD = f"/sd/{NAME}"
ADAPTER, CONFIG, ENCODER = (f"/h94/{f}" for f in ("models/ip-adapter_sd15.safetensors",
                                                  "models/image_encoder/config.json",
                                                  "models/image_encoder/model.safetensors"))
SMALL = ["--steps", "2", "--height", "64", "--width", "64", "--no-progress"]
QUICK = ["--prompt", "a cat", *SMALL]  # text-to-image: the quickest run after a download
CUT = 300_000  # bytes of the encoder (about 1 MB) sent before an interrupted response closes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{path on the host: bytes}: the tiny SD checkpoint and h94's three files, tiny."""
    root = tmp_path_factory.mktemp("host")
    models = write_h94_folder(root / "h94", reference_encoder(seed=5), forms=(".safetensors",))
    served = {SD: tiny_checkpoint(root / NAME).read_bytes()}
    return served | {path: (models.parent / path.removeprefix("/h94/")).read_bytes()
                     for path in (ADAPTER, CONFIG, ENCODER)}


@pytest.fixture
def host(files, monkeypatch):
    """The local host, named by $DRP_WEIGHTS_URL and $DRP_IP_ADAPTER_URL (without its trailing slash)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    with serving_files(FileHost(dict(files))) as served:
        monkeypatch.setenv("DRP_WEIGHTS_URL", served.url + SD)
        monkeypatch.setenv("DRP_IP_ADAPTER_URL", served.url + "/h94")
        yield served
    torch.set_num_threads(threads)


def sample_main(*args):
    return load_script("sample").main([str(a) for a in args])


def converted(weights):
    """The files in `weights` but the SD download: the converted ones, and any temporary file."""
    return sorted(p.name for p in weights.iterdir() if p.is_file() and p.name != NAME)


def test_first_run_names_the_mode_then_fetches_sd_ip_adapter_and_its_encoder_and_makes_an_ip_adapter_image(
        host, tmp_path, capsys):
    weights, out = tmp_path / "w", tmp_path / "demo.png"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # with the fixture's DRP_WEIGHTS_URL and DRP_IP_ADAPTER_URL
    done = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--weights", str(weights), "--out", str(out),
                           *SMALL], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("mode: ip-adapter: DRP-Diff on IP-Adapter") and "; demo: " in lines[0]
    assert lines[1] == (f"{weights} holds no converted weights: downloading SD 1.5 and IP-Adapter with its image "
                        f"encoder (sizes as the server states) into {weights}, then converting them there "
                        "(--no-download stops instead; --mode self-attention fetches SD 1.5 alone):")
    keep = weights / "h94-IP-Adapter"
    assert lines[2:6] == [
        f"  SD 1.5 checkpoint: size as the server states from {host.url}{SD} into {weights / NAME}",
        f"  IP-Adapter ip-adapter_sd15: size as the server states from {host.url}{ADAPTER} into "
        f"{keep / 'models/ip-adapter_sd15.safetensors'}",
        f"  its image encoder's config (CLIP ViT-H/14): size as the server states from {host.url}{CONFIG} into "
        f"{keep / 'models/image_encoder/config.json'}",
        f"  its image encoder (CLIP ViT-H/14): size as the server states from {host.url}{ENCODER} into "
        f"{keep / 'models/image_encoder/model.safetensors'}"]
    assert host.paths() == [SD, ADAPTER, CONFIG, ENCODER]  # each fetched once
    assert converted(weights) == ["image_encoder.json", "image_encoder.safetensors", "ip_adapter.json",
                                  "ip_adapter.safetensors", "model.json", "text_encoder.safetensors",
                                  "unet.safetensors", "vae.safetensors"]
    parameters = Image.open(out).text["parameters"]
    assert "DRP mode: ip-adapter" in parameters and "DRP IP-Adapter: ip-adapter_sd15.safetensors" in parameters
    assert f"saved {out} (seed 42)" in lines

    assert sample_main("--weights", weights, "--out", tmp_path / "again.png", *SMALL) == 0  # the second run
    assert capsys.readouterr().out.splitlines()[0].startswith("mode: ip-adapter")
    assert host.paths() == [SD, ADAPTER, CONFIG, ENCODER]  # fetched nothing
    assert Image.open(tmp_path / "again.png").text["parameters"] == parameters


def test_mode_self_attention_on_a_fresh_folder_fetches_sd_alone_and_later_runs_are_not_added_to(
        host, tmp_path, capsys):
    weights = tmp_path / "w"
    assert sample_main("--weights", weights, "--out", tmp_path / "a.png", "--mode", "self-attention", *QUICK) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "mode: text-to-image"
    assert lines[1] == (f"{weights} holds no converted weights: downloading SD 1.5 (size as the server states) "
                        f"into {weights}, then converting it there (--no-download stops instead):")
    assert host.paths() == [SD] and not (weights / "h94-IP-Adapter").exists()
    # SD converted, IP-Adapter not: --mode auto runs with what is there and says how to add IP-Adapter
    assert sample_main("--weights", weights, "--out", tmp_path / "b.png", "--no-cache", *SMALL) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("mode: self-attention: ")
    assert lines[1] == (f"(IP-Adapter's files are not in {weights}, so --mode auto runs the self-attention mode; "
                        "`python convert_weights.py --download ip-adapter` adds them, 2.6 GB, for the paper's mode)")
    assert host.paths() == [SD]
    assert "DRP mode: self-attention" in Image.open(tmp_path / "b.png").text["parameters"]


def test_no_download_stops_with_the_missing_weights_sentence_and_fetches_nothing(host, tmp_path, capsys):
    assert sample_main("--weights", tmp_path / "weights", "--no-download", "--out", tmp_path, *QUICK) == 1
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {tmp_path / 'weights'} holds no complete set of converted weights")
    assert err.count("\n") == 1 and out == "" and host.requests == []
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_ip_adapter_download_converts_nothing_and_the_next_run_resumes_it(host, tmp_path, capsys):
    weights = tmp_path / "w"
    host.cut[ENCODER] = CUT
    assert sample_main("--weights", weights, "--out", tmp_path / "a.png", *QUICK) == 1
    size = len(host.files[ENCODER])
    assert capsys.readouterr().err == (f"error: the download of {host.url}{ENCODER} stopped after {CUT} of {size} "
                                       "bytes; rerun the same command to resume.\n")
    part = weights / "h94-IP-Adapter/models/image_encoder/model.safetensors.part"
    assert part.stat().st_size == CUT and converted(weights) == []  # no SD conversion either: downloads go first
    assert sample_main("--weights", weights, "--out", tmp_path / "a.png", *QUICK) == 0
    assert host.requests[-1] == (ENCODER, f"bytes={CUT}-") and host.paths().count(SD) == 1
    assert "ip_adapter.json" in converted(weights) and "image_encoder.json" in converted(weights)


def test_a_damaged_download_is_refused_in_one_sentence_and_nothing_is_converted(host, tmp_path, capsys):
    weights = tmp_path / "w"
    good = host.files[ADAPTER]
    host.damaged[ADAPTER] = bytes(b ^ 1 for b in good[:1000]) + good[1000:]  # the ETag still states the true hash
    assert sample_main("--weights", weights, "--out", tmp_path / "a.png", *QUICK) == 1
    part = weights / "h94-IP-Adapter/models/ip-adapter_sd15.safetensors.part"
    got = hashlib.sha256(host.damaged[ADAPTER]).hexdigest()
    assert capsys.readouterr().err == (f"error: the file downloaded from {host.url}{ADAPTER} is corrupted (sha256 "
                                       f"{got} instead of {hashlib.sha256(good).hexdigest()}), so {part} was "
                                       "deleted; run the command again to download it afresh.\n")
    assert converted(weights) == [] and not part.exists() and not (tmp_path / "a.png").exists()
    assert host.paths() == [SD, ADAPTER]  # refused before the encoder was fetched


def test_a_failure_while_converting_ip_adapter_leaves_sd_usable_and_the_next_run_finishes_it(
        host, tmp_path, capsys, monkeypatch):
    weights = tmp_path / "w"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    real = cia.convert_encoder
    monkeypatch.setattr(cia, "convert_encoder", interrupted)  # after SD and the adapter are converted
    assert sample_main("--weights", weights, "--out", tmp_path / "a.png", *SMALL) == 130
    assert converted(weights) == ["ip_adapter.json", "ip_adapter.safetensors", "model.json",
                                  "text_encoder.safetensors", "unet.safetensors", "vae.safetensors"]
    sd = drp.load(weights)  # SD is usable
    assert sd.has("ip_adapter") and not sd.has("image_encoder")
    capsys.readouterr()
    monkeypatch.setattr(cia, "convert_encoder", real)
    assert sample_main("--weights", weights, "--out", tmp_path / "a.png", *SMALL) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("mode: ip-adapter")
    assert lines[1].startswith(f"{weights} holds IP-Adapter's download, not yet converted: downloading IP-Adapter "
                               "with its image encoder")
    assert [line.rsplit("/", 1)[-1] for line in lines[2:4]] == ["config.json (already downloaded)",
                                                                "model.safetensors (already downloaded)"]
    assert host.paths() == [SD, ADAPTER, CONFIG, ENCODER]  # the rerun fetched nothing
    assert "DRP mode: ip-adapter" in Image.open(tmp_path / "a.png").text["parameters"]


def test_the_default_addresses_pinned_sha256_counts_whatever_the_server_states(host, tmp_path, capsys, monkeypatch):
    """The host as drp.download's DEFAULT_URL and as h94's REPO, each with a pin the served file does not have."""
    wrong = hashlib.sha256(b"another file").hexdigest()
    monkeypatch.delenv("DRP_WEIGHTS_URL")
    monkeypatch.delenv("DRP_IP_ADAPTER_URL")
    monkeypatch.setattr(drp.download, "DEFAULT_URL", host.url + SD)
    monkeypatch.setattr(drp.download, "DEFAULT_SHA256", wrong)
    monkeypatch.setattr(drp.download, "DEFAULT_SIZE", len(host.files[SD]))
    monkeypatch.setattr(cia, "REPO", host.url + "/h94/")
    assert sample_main("--weights", tmp_path / "weights", "--out", tmp_path, *QUICK) == 1
    err = capsys.readouterr().err
    assert err == (f"error: the file downloaded from {host.url}{SD} is corrupted (sha256 "
                   f"{hashlib.sha256(host.files[SD]).hexdigest()} instead of the published {wrong}), so "
                   f"{tmp_path / 'weights' / NAME}.part was deleted; run the command again to download it afresh.\n")
    assert [p.name for p in tmp_path.rglob("*")] == ["weights"]  # an empty folder: no image, no part file

    monkeypatch.setattr(drp.download, "DEFAULT_SHA256", hashlib.sha256(host.files[SD]).hexdigest())
    monkeypatch.setitem(cia.PINNED, "models/image_encoder/model.safetensors", (wrong, len(host.files[ENCODER])))
    assert sample_main("--weights", tmp_path / "weights", "--out", tmp_path, *QUICK) == 1
    assert f"{host.url}{ENCODER} is corrupted (sha256 {hashlib.sha256(host.files[ENCODER]).hexdigest()} instead " \
           f"of the published {wrong})" in capsys.readouterr().err
    assert converted(tmp_path / "weights") == []
