"""`python -m drp.evaluate download dreambench` against a local HTTP server on 127.0.0.1 playing GitHub.

The server answers `/tree` like GitHub's git-trees API (every file of the commit with its size and git
blob id) and serves the files under `/raw/<path>` with HTTP Range support, as raw.githubusercontent.com does.
"""

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from drp.errors import DrpError
from drp.evaluate.__main__ import main
from drp.evaluate.fetch import RAW_ENV, TREE_ENV, download_dreambench
from local_server import TIMEOUT_S, QuietHandler, serving

SAMPLE = Path(__file__).parent / "data" / "dreambench"
CUT = 1000  # bytes sent before an interrupted response closes the connection
rng = random.Random(0)
FILES = {  # the repository at the pinned commit: what is fetched, and two files that are not
    "LICENSE": (SAMPLE / "LICENSE.md").read_bytes(),
    "README.md": b"not part of the dataset",
    "dataset/prompts_and_classes.txt": (SAMPLE / "dataset" / "prompts_and_classes.txt").read_bytes(),
    "dataset/references_and_licenses.txt": (SAMPLE / "dataset" / "references_and_licenses.txt").read_bytes(),
    "dataset/cat/00.jpg": rng.randbytes(5000),
    "dataset/cat/02.jpg": rng.randbytes(4000),
    "dataset/dog/01.jpg": rng.randbytes(3000),
    "scripts/x.py": b"print()",
}
FETCHED = sorted(p for p in FILES if p.startswith("dataset/") or p == "LICENSE")


def blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class GitHub:
    """What the fake host sends, and the (path, Range header) of every request it saw."""

    url: str = ""
    files: dict = field(default_factory=lambda: dict(FILES))
    listed_size: dict = field(default_factory=dict)  # path -> a size the listing states instead of the real one
    cut: set = field(default_factory=set)  # paths whose next response stops after CUT bytes
    requests: list = field(default_factory=list)

    def tree(self):
        entries = [dict(path=p, mode="100644", type="blob", sha=blob_id(d), size=self.listed_size.get(p, len(d)))
                   for p, d in self.files.items()]
        entries += [dict(path="dataset", mode="040000", type="tree", sha="0" * 40)]
        return json.dumps(dict(sha="4f887af", tree=entries, truncated=False)).encode()


def make_handler(host):
    class Handler(QuietHandler):
        def do_GET(self):
            host.requests.append((self.path, self.headers.get("Range")))
            if self.path == "/tree":
                body, start = host.tree(), 0
            elif self.path.startswith("/raw/") and self.path[5:] in host.files:
                body = host.files[self.path[5:]]
                asked = self.headers.get("Range")
                start = int(asked.removeprefix("bytes=").rstrip("-")) if asked else 0
            else:
                self.send_error(404)
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if self.path[5:] in host.cut:
                host.cut.discard(self.path[5:])
                self.wfile.write(body[start : start + CUT])  # then the connection closes
            else:
                self.wfile.write(body[start:])

    return Handler


@pytest.fixture
def github():
    host = GitHub()
    with serving(make_handler(host)) as host.url:
        yield host


def fetch(host, out):
    return download_dreambench(out, host.url + "/tree", host.url + "/raw/", progress=False, timeout=TIMEOUT_S)


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_download_writes_the_dataset_folder_and_licence_in_the_repository_layout(github, tmp_path):
    assert fetch(github, tmp_path / "data") == len(FETCHED)
    assert files_under(tmp_path / "data") == sorted(FETCHED + [".dreambench-tree.json"])
    for path in FETCHED:
        assert (tmp_path / "data" / path).read_bytes() == FILES[path]


def test_complete_dataset_is_checked_and_kept_without_any_request(github, tmp_path):
    fetch(github, tmp_path)
    github.requests.clear()
    assert fetch(github, tmp_path) == 0
    assert github.requests == []  # the kept listing and the files on disk suffice


def test_interrupted_download_resumes_with_a_range_request(github, tmp_path):
    github.cut = {"dataset/cat/02.jpg"}
    with pytest.raises(DrpError, match="resume"):
        fetch(github, tmp_path)
    part = tmp_path / "dataset" / "cat" / "02.jpg.download.part"
    assert part.stat().st_size == CUT and not (tmp_path / "dataset" / "cat" / "02.jpg").exists()
    fetch(github, tmp_path)
    assert (tmp_path / "dataset" / "cat" / "02.jpg").read_bytes() == FILES["dataset/cat/02.jpg"]
    assert ("/raw/dataset/cat/02.jpg", f"bytes={CUT}-") in github.requests
    assert files_under(tmp_path) == sorted(FETCHED + [".dreambench-tree.json"])


def test_file_of_another_size_than_listed_is_refused_in_one_sentence_and_deleted(github, tmp_path):
    github.listed_size = {"dataset/cat/00.jpg": 4999}
    with pytest.raises(DrpError) as err:
        fetch(github, tmp_path)
    message = str(err.value)
    assert "has 5000 bytes where the dataset lists 4999" in message and message.count(". ") == 0
    assert not list((tmp_path / "dataset" / "cat").iterdir())  # neither the file nor its staging copy


def test_file_with_the_listed_size_but_other_bytes_is_refused(github, tmp_path):
    github.files["dataset/dog/01.jpg"] = bytes(3000)  # the listing keeps the blob id of the real bytes
    real = blob_id(FILES["dataset/dog/01.jpg"])
    listing = "dataset/prompts_and_classes.txt"
    entries = [dict(path=listing, type="blob", size=len(FILES[listing]), sha=blob_id(FILES[listing])),
               dict(path="dataset/dog/01.jpg", type="blob", size=3000, sha=real)]
    github.tree = lambda: json.dumps(dict(tree=entries)).encode()
    with pytest.raises(DrpError, match="other bytes"):
        fetch(github, tmp_path)
    assert not (tmp_path / "dataset" / "dog").exists() or not list((tmp_path / "dataset" / "dog").iterdir())


def test_a_file_already_there_with_the_wrong_size_is_not_overwritten(github, tmp_path):
    mine = tmp_path / "dataset" / "cat" / "00.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own photo")
    with pytest.raises(DrpError, match="delete it"):
        fetch(github, tmp_path)
    assert mine.read_bytes() == b"my own photo"


def test_addresses_come_from_the_environment_and_errors_are_one_line(github, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(TREE_ENV, github.url + "/tree")
    monkeypatch.setenv(RAW_ENV, github.url + "/raw")  # no trailing slash: one is put in between
    assert main(["download", "dreambench", "--out", str(tmp_path / "data"), "--no-progress"]) == 0
    assert files_under(tmp_path / "data") == sorted(FETCHED + [".dreambench-tree.json"])
    monkeypatch.setenv(TREE_ENV, github.url + "/missing")
    assert main(["download", "dreambench", "--out", str(tmp_path / "other"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the file list of DreamBench could not be read") and err.count("\n") == 1
    assert not (tmp_path / "other").exists()
    (tmp_path / "a_file").write_text("mine")
    monkeypatch.setenv(TREE_ENV, github.url + "/tree")
    assert main(["download", "dreambench", "--out", str(tmp_path / "a_file" / "data"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and err.count("\n") == 1, err


def test_a_listing_that_is_not_a_git_tree_or_names_a_path_outside_the_dataset_writes_nothing_there(github, tmp_path):
    github.tree = lambda: b"[]"  # JSON, but a list
    with pytest.raises(DrpError, match="did not list DreamBench's dataset/ folder"):
        fetch(github, tmp_path / "data")
    evil = "dataset/../../evil.txt"
    github.files[evil] = b"outside"
    del github.tree  # the real listing again, which now also names the file above
    fetch(github, tmp_path / "data")
    assert not (tmp_path / "evil.txt").exists() and not any("evil" in path for path, _ in github.requests)
    assert files_under(tmp_path / "data") == sorted(FETCHED + [".dreambench-tree.json"])
