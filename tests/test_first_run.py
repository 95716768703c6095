"""`python sample.py` on a fresh machine: with no converted weights it says what it downloads, downloads and
converts the checkpoint, then generates; `--no-download` refuses instead; the default file must have its
pinned sha256 whatever the server states, another URL is checked against what its server states.

A local HTTP server on 127.0.0.1 plays the checkpoint host, serving a tiny SD 1.x checkpoint with its
sha256 in the ETag. For the default URL's pinned hash, `sample.main` runs in this process with
drp.download's DEFAULT_URL (and pin) pointed at that server; the run with $DRP_WEIGHTS_URL is a fresh
process without standard input, as on CI.
"""

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import drp.download
from checkpoints import tiny_checkpoint
from local_server import QuietHandler, serving

ROOT = Path(__file__).resolve().parent.parent
NAME = "v1-5-pruned-emaonly.safetensors"
QUICK = ["--prompt", "a cat", "--steps", "2", "--height", "64", "--width", "64", "--no-progress"]


class Served:
    """The file the fake host serves, and the paths it was asked for."""

    def __init__(self, body):
        self.body, self.sha256, self.requests, self.url = body, hashlib.sha256(body).hexdigest(), [], ""


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    served = Served(tiny_checkpoint(tmp_path_factory.mktemp("host") / NAME).read_bytes())

    class Handler(QuietHandler):
        def do_GET(self):
            served.requests.append(self.path)
            if self.path != f"/{NAME}":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(served.body)))
            self.send_header("ETag", f'"{served.sha256}"')  # the host states the right hash
            self.end_headers()
            self.wfile.write(served.body)

    with serving(Handler) as base:
        served.url = f"{base}/{NAME}"
        yield served


@pytest.fixture
def as_default(host, monkeypatch):
    """The fake host's file as drp.download's default URL, its true sha256 and size pinned."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    host.requests.clear()
    monkeypatch.delenv("DRP_WEIGHTS_URL", raising=False)
    monkeypatch.setattr(drp.download, "DEFAULT_URL", host.url)
    monkeypatch.setattr(drp.download, "DEFAULT_SHA256", host.sha256)
    monkeypatch.setattr(drp.download, "DEFAULT_SIZE", len(host.body))
    yield host
    torch.set_num_threads(threads)


def sample_main(*args):
    spec = importlib.util.spec_from_file_location("sample", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def test_first_run_says_what_it_downloads_then_converts_and_generates(as_default, tmp_path, capsys):
    weights = tmp_path / "weights"
    assert sample_main("--weights", weights, "--out", tmp_path / "a.png", *QUICK) == 0
    out = capsys.readouterr().out.splitlines()
    size = f"{len(as_default.body) / 2**30:.1f} GiB"
    assert out[0] == (f"{weights} holds no converted weights: downloading {NAME} ({size}) from {as_default.url} "
                      f"into {weights / NAME}, then converting it into {weights} (--no-download stops instead)")
    assert f"saved {tmp_path / 'a.png'} (seed 42)" in out
    assert Image.open(tmp_path / "a.png").size == (64, 64)
    assert (weights / "model.json").is_file() and (weights / NAME).read_bytes() == as_default.body
    assert as_default.requests == [f"/{NAME}"]
    assert sample_main("--weights", weights, "--out", tmp_path / "b.png", *QUICK) == 0  # the second run
    assert as_default.requests == [f"/{NAME}"]  # fetched nothing
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()


def test_no_download_stops_with_the_missing_weights_sentence_and_fetches_nothing(as_default, tmp_path, capsys):
    assert sample_main("--weights", tmp_path / "weights", "--no-download", "--out", tmp_path, *QUICK) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'weights'} holds no complete set of converted weights")
    assert err.count("\n") == 1 and as_default.requests == []
    assert list(tmp_path.iterdir()) == []


def test_a_download_without_the_pinned_sha256_is_refused_and_nothing_is_left(as_default, tmp_path, capsys,
                                                                             monkeypatch):
    wrong = hashlib.sha256(b"another file").hexdigest()
    monkeypatch.setattr(drp.download, "DEFAULT_SHA256", wrong)  # the server still states the served file's hash
    assert sample_main("--weights", tmp_path / "weights", "--out", tmp_path, *QUICK) == 1
    err = capsys.readouterr().err
    assert err == (f"error: the file downloaded from {as_default.url} is corrupted (sha256 {as_default.sha256} "
                   f"instead of the published {wrong}), so {tmp_path / 'weights' / NAME}.part was deleted; "
                   "run the command again to download it afresh.\n")
    assert [p.name for p in tmp_path.rglob("*")] == ["weights"]  # an empty folder: no image, no part file


def test_another_url_from_the_environment_is_checked_against_its_server_in_a_fresh_process(host, tmp_path):
    host.requests.clear()
    env = dict(os.environ, DRP_WEIGHTS_URL=host.url, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--weights", str(tmp_path / "w"),
                           "--out", str(tmp_path / "x.png"), *QUICK], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"downloading {NAME} (size as the server states) from {host.url}" in done.stdout
    assert (tmp_path / "x.png").is_file() and host.requests == [f"/{NAME}"]
