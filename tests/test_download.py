"""drp.download against a local HTTP server on 127.0.0.1 that plays the checkpoint host.

The server serves a fake checkpoint at `/file` with Range support, and at `/resolve/file` answers
like Hugging Face's resolve endpoint: a 302 to `/file` carrying `X-Linked-ETag` (the sha256) and
`X-Linked-Size`, while `/file` itself sends a CDN-style ETag that is not a sha256.
"""

import hashlib
import random
import socket
from dataclasses import dataclass, field

import pytest

from drp.convert_ip_adapter import planned_downloads
from drp import download as dl
from drp.download import DEFAULT_URL, download, sha256_from_etag, weights_url
from drp.errors import DrpError
from local_server import TIMEOUT_S, QuietHandler, serving

DATA = random.Random(0).randbytes(300_000)  # the fake checkpoint
SHA = hashlib.sha256(DATA).hexdigest()
MD5_ETAG = '"' + hashlib.md5(DATA).hexdigest() + '"'  # what a CDN might send: 32 hex, not a sha256
CUT = 100_000  # bytes sent before an interrupted first response closes the connection


@dataclass
class Host:
    """What the fake server sends, and the (path, Range header) of every request it saw."""

    url: str = ""
    body: bytes = DATA
    file_headers: dict = field(default_factory=lambda: {"ETag": MD5_ETAG})
    redirect_headers: dict = field(default_factory=lambda: {"X-Linked-ETag": f'"{SHA}"', "X-Linked-Size": str(len(DATA))})
    redirect_to: str = ""  # the Location of /resolve/file (default: /file on the same host)
    cut_first_response: bool = False
    ignore_range: bool = False
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes
    requests: list = field(default_factory=list)


def make_handler(host):
    class Handler(QuietHandler):
        def do_GET(self):
            host.requests.append((self.path, self.headers.get("Range")))
            if self.path == "/resolve/file":
                self.send_response(302)
                self.send_header("Location", host.redirect_to or "/file")
                for k, v in host.redirect_headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path != "/file":
                self.send_error(404)
                return
            body, start = host.body, 0
            if self.headers.get("Range") and not host.ignore_range:
                start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            for k, v in host.file_headers.items():
                self.send_header(k, v)
            if host.send_length:
                self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if host.cut_first_response:
                host.cut_first_response = False
                self.wfile.write(body[start : start + CUT])  # then the connection closes
            else:
                self.wfile.write(body[start:])

    return Handler


@pytest.fixture
def host():
    h = Host()
    with serving(make_handler(h)) as h.url:
        yield h


def fetch(url, dest, progress=False):
    return download(url, dest, progress=progress, timeout=TIMEOUT_S)


@pytest.mark.parametrize("path", ["/file", "/resolve/file"])
def test_full_download_writes_the_file_and_leaves_no_part_file(host, tmp_path, path):
    dest = tmp_path / "sub" / "model.safetensors"
    assert fetch(host.url + path, dest, progress=True) == dest
    assert dest.read_bytes() == DATA
    assert not (tmp_path / "sub" / "model.safetensors.part").exists()


@pytest.mark.parametrize("path", ["/file", "/resolve/file"])
def test_interrupted_download_resumes_with_a_range_request(host, tmp_path, path):
    host.cut_first_response = True
    dest = tmp_path / "model.safetensors"
    part = tmp_path / "model.safetensors.part"
    with pytest.raises(DrpError, match="resume"):
        fetch(host.url + path, dest)
    assert part.stat().st_size == CUT and not dest.exists()
    fetch(host.url + path, dest)
    assert dest.read_bytes() == DATA and not part.exists()
    assert ("/file", f"bytes={CUT}-") in host.requests


@pytest.mark.parametrize("path", ["/file", "/resolve/file"])
def test_wrong_bytes_are_refused_and_the_part_file_deleted(host, tmp_path, path):
    host.body = bytes(b ^ 1 for b in DATA[:1000]) + DATA[1000:]  # same size, wrong content
    if path == "/file":  # no redirect: the host's own weak ETag states the sha256
        host.file_headers = {"ETag": f'W/"{SHA}"'}
    dest = tmp_path / "model.safetensors"
    with pytest.raises(DrpError, match="corrupted.*deleted"):
        fetch(host.url + path, dest)
    assert list(tmp_path.iterdir()) == []


def test_resumed_bytes_are_checked_together_with_those_already_on_disk(host, tmp_path):
    part = tmp_path / "model.safetensors.part"
    part.write_bytes(b"\0" * CUT)  # a .part whose bytes are wrong: only the hash can tell
    with pytest.raises(DrpError, match="sha256"):
        fetch(host.url + "/resolve/file", tmp_path / "model.safetensors")
    assert ("/file", f"bytes={CUT}-") in host.requests
    assert list(tmp_path.iterdir()) == []


def test_server_without_hash_headers_still_gets_its_size_checked(host, tmp_path):
    host.file_headers = {"ETag": MD5_ETAG}  # not a sha256: ignored
    dest = tmp_path / "model.safetensors"
    fetch(host.url + "/file", dest)
    assert dest.read_bytes() == DATA
    dest.unlink()
    host.cut_first_response = True  # a short transfer is caught by the size alone
    with pytest.raises(DrpError, match=f"stopped after {CUT} of {len(DATA)} bytes"):
        fetch(host.url + "/file", dest)


def test_body_longer_than_the_stated_size_is_refused_and_deleted(host, tmp_path):
    host.redirect_headers = {"X-Linked-Size": str(len(DATA) - 1000)}  # the only size stated
    host.send_length = False
    with pytest.raises(DrpError, match=f"corrupted \\({len(DATA)} bytes instead of {len(DATA) - 1000}\\)"):
        fetch(host.url + "/resolve/file", tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_etag_of_another_host_is_not_taken_for_the_sha256(host, tmp_path):
    host.redirect_headers = {}  # like a resolve endpoint that states nothing
    host.redirect_to = host.url.replace("127.0.0.1", "localhost") + "/file"
    host.file_headers = {"ETag": '"' + "0" * 64 + '"'}  # 64 hex, but from the CDN host
    dest = tmp_path / "model.safetensors"
    fetch(host.url + "/resolve/file", dest)
    assert dest.read_bytes() == DATA


def test_server_that_ignores_range_restarts_from_zero(host, tmp_path):
    host.ignore_range = True
    (tmp_path / "model.safetensors.part").write_bytes(b"x" * 1000)
    dest = tmp_path / "model.safetensors"
    fetch(host.url + "/resolve/file", dest)
    assert ("/file", "bytes=1000-") in host.requests
    assert dest.read_bytes() == DATA


def test_complete_part_file_answered_with_416_is_verified_and_kept(host, tmp_path):
    (tmp_path / "model.safetensors.part").write_bytes(DATA)
    dest = tmp_path / "model.safetensors"
    fetch(host.url + "/resolve/file", dest)
    assert host.requests[-1] == ("/file", f"bytes={len(DATA)}-")
    assert dest.read_bytes() == DATA and list(tmp_path.iterdir()) == [dest]


def test_part_file_longer_than_the_file_is_restarted(host, tmp_path):
    (tmp_path / "model.safetensors.part").write_bytes(DATA + b"extra")
    dest = tmp_path / "model.safetensors"
    fetch(host.url + "/file", dest)
    assert [r for _, r in host.requests] == [f"bytes={len(DATA) + 5}-", None]
    assert dest.read_bytes() == DATA


def test_existing_destination_is_returned_without_downloading(host, tmp_path):
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(b"the user's own file")
    assert fetch(host.url + "/file", dest) == dest
    assert dest.read_bytes() == b"the user's own file"
    assert host.requests == []


def test_network_errors_name_the_url_and_suggest_a_rerun_or_url(host, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/file"
    for url in (dead, host.url + "/missing"):
        with pytest.raises(DrpError) as err:
            fetch(url, tmp_path / "model.safetensors")
        assert url in str(err.value) and "again" in str(err.value) and "--url" in str(err.value)
    assert "HTTP 404" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_ip_adapter_download_names_its_own_address_variable(host, tmp_path):
    planned = planned_downloads("ip-adapter", tmp_path, base_url=host.url + "/missing/")[0]
    with pytest.raises(DrpError) as err:
        dl.fetch(planned, progress=False, timeout=TIMEOUT_S)
    assert str(err.value) == (f"downloading {host.url}/missing/models/ip-adapter_sd15.safetensors failed (HTTP 404 "
                              "Not Found); run the same command again to resume, or set DRP_IP_ADAPTER_URL "
                              "(convert_weights.py: --ip-adapter-url) to another address of h94/IP-Adapter's files.")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_sizes_are_said_as_hugging_face_lists_them():
    assert [dl.how_big(n) for n in (dl.DEFAULT_SIZE, 44_642_768, 1_500, 560, None)] == [
        "4.3 GB", "44.6 MB", "1.5 kB", "560 bytes", "size as the server states"]


def test_the_planned_checkpoint_is_the_default_file_with_its_pins_and_another_address_has_none(monkeypatch, tmp_path):
    monkeypatch.delenv("DRP_WEIGHTS_URL", raising=False)
    default = dl.planned_checkpoint(tmp_path)
    assert (default.url, default.dest, default.sha256, default.size) == (
        DEFAULT_URL, tmp_path / "v1-5-pruned-emaonly.safetensors", dl.DEFAULT_SHA256, dl.DEFAULT_SIZE)
    other = dl.planned_checkpoint(tmp_path, "http://mirror/sd.safetensors?download=1")
    assert (other.dest, other.sha256, other.size) == (tmp_path / "sd.safetensors", None, None)


def test_sha256_is_read_from_quoted_or_weak_etags_and_other_etags_are_ignored():
    assert sha256_from_etag(SHA) == SHA
    assert sha256_from_etag(f'"{SHA}"') == SHA
    assert sha256_from_etag(f'W/"{SHA.upper()}"') == SHA
    assert sha256_from_etag(MD5_ETAG) is None
    assert sha256_from_etag('"' + "g" * 64 + '"') is None
    assert sha256_from_etag(None) is None


def test_url_precedence_is_flag_then_environment_then_default(monkeypatch):
    monkeypatch.delenv("DRP_WEIGHTS_URL", raising=False)
    assert weights_url() == DEFAULT_URL
    monkeypatch.setenv("DRP_WEIGHTS_URL", "http://mirror/env.safetensors")
    assert weights_url() == "http://mirror/env.safetensors"
    assert weights_url("http://mirror/flag.safetensors") == "http://mirror/flag.safetensors"
