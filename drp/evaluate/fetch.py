"""Downloading DreamBench from its public GitHub repository with the standard library: resumable, each file checked.

Where it sits: `python -m drp.evaluate download dreambench --out DATA`, once, before `run`. The dataset
is the `dataset/` folder of google/dreambooth at a pinned commit (so every user scores against the same
photos), written under DATA in the repository's own layout:

    DATA/LICENSE*                              the repository's licence files, where it has them (CC-BY-4.0)
    DATA/dataset/prompts_and_classes.txt       subjects, class nouns, prompt templates
    DATA/dataset/references_and_licenses.txt   where each photo comes from, and its licence
    DATA/dataset/<subject>/NN.jpg              158 photos, 111.7 MB

Which files and how big: GitHub's git-trees API lists every file of a commit with its size and its git
blob id (the sha1 of `b"blob <size>\\0" + content`), so each file is checked against both. The listing is
kept in DATA/.dreambench-tree.json, so a rerun needs the API no more. Each file comes from
raw.githubusercontent.com through drp/download.py's resumable `download` (a `.part` file and HTTP Range),
into `<file>.download`, which is renamed to its name once checked. A file already in place with the
wrong size is never overwritten: the user is asked to delete it.

Both addresses can be changed (tests, mirrors): `--tree-url` / $DRP_DREAMBENCH_TREE_URL for the listing,
`--raw-url` / $DRP_DREAMBENCH_RAW_URL for the files (the file's path in the repository is appended).
"""

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from tqdm import tqdm

from ..download import download
from ..errors import DrpError

REPOSITORY = "google/dreambooth"
COMMIT = "4f887af7970a06fc0cd3adaa1d0b368547d6a1d0"  # the commit the project's lists were taken from
TREE_URL = f"https://api.github.com/repos/{REPOSITORY}/git/trees/{COMMIT}?recursive=1"
RAW_URL = f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}/"
TREE_ENV, RAW_ENV = "DRP_DREAMBENCH_TREE_URL", "DRP_DREAMBENCH_RAW_URL"
LISTING = ".dreambench-tree.json"
TIMEOUT_S = 60


def git_blob_id(path):
    """The id git gives a file's content: sha1 of b'blob <size>\\0' followed by the bytes."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def wanted(entry):
    """The dataset's files: everything under dataset/, and the licence files at the top (never a path
    with `..`, which a listing from --tree-url could hold, so nothing is written outside DATA)."""
    path = entry["path"]
    return entry.get("type") == "blob" and ".." not in path.split("/") and (
        path.startswith("dataset/") or ("/" not in path and path.upper().startswith("LICENSE")))


def read_listing(out, tree_url, timeout):
    """[{path, size, sha}] of the dataset's files, from DATA/.dreambench-tree.json or the API (then kept)."""
    kept = out / LISTING
    if kept.is_file():
        return json.loads(kept.read_text())
    request = urllib.request.Request(tree_url, headers={"Accept": "application/vnd.github+json",
                                                        "User-Agent": "drp-evaluate"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            tree = json.loads(response.read())
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise DrpError(f"the file list of DreamBench could not be read from {tree_url} "
                       f"({getattr(e, 'reason', e)}); run the command again later or pass --tree-url.") from None
    if not isinstance(tree, dict):
        tree = {}  # JSON, but not a git-trees listing: refused just below
    files = [dict(path=e["path"], size=int(e["size"]), sha=e["sha"]) for e in tree.get("tree", []) if wanted(e)]
    if tree.get("truncated") or not any(f["path"].endswith("prompts_and_classes.txt") for f in files):
        raise DrpError(f"{tree_url} did not list DreamBench's dataset/ folder; pass --tree-url with the "
                       f"git-trees listing of {REPOSITORY} at commit {COMMIT}.")
    tmp = kept.with_name(kept.name + ".tmp")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(files, indent=1))
        os.replace(tmp, kept)
    except OSError as e:
        raise DrpError(f"cannot write {kept} ({e.strerror or e}); choose a writable --out.") from None
    return files


def check(path, entry, what):
    """A file on disk against its listing entry: None when it matches, else what differs."""
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{what} has {size} bytes where the dataset lists {entry['size']}"
    if git_blob_id(path) != entry["sha"]:
        return f"{what} has the right size but other bytes than the dataset's (git blob {entry['sha'][:12]})"
    return None


def fetch_file(url, dest, entry, timeout):
    """One file into `dest`, through `<dest>.download` (resumable), checked before it takes its name."""
    staging = dest.with_name(dest.name + ".download")
    try:
        download(url, staging, progress=False, timeout=timeout)
    except DrpError as e:
        cause = e.__cause__
        if isinstance(cause, (urllib.error.URLError, http.client.HTTPException, OSError)):
            reason = f"HTTP {cause.code} {cause.reason}" if isinstance(cause, urllib.error.HTTPError) \
                else getattr(cause, "reason", cause)
            raise DrpError(f"downloading {url} failed ({reason}); run the same command again to resume, "
                           "or pass --raw-url with another address of the files.") from None
        raise  # a short or corrupted transfer: download's own sentence says to rerun
    problem = check(staging, entry, f"the file {url} sent")
    if problem:
        staging.unlink()
        raise DrpError(f"{problem}, so it was deleted; run the command again, or pass --raw-url with "
                       f"the files of commit {COMMIT}.")
    os.replace(staging, dest)


def download_dreambench(out, tree_url=None, raw_url=None, progress=True, timeout=TIMEOUT_S):
    """Downloads (or completes) DreamBench into `out`; returns the number of files fetched this time."""
    out = Path(out)
    tree_url = tree_url or os.environ.get(TREE_ENV) or TREE_URL
    raw_url = raw_url or os.environ.get(RAW_ENV) or RAW_URL
    files = read_listing(out, tree_url, timeout)
    todo, done_bytes = [], 0
    for entry in files:
        dest = out / entry["path"]
        if not dest.exists():
            todo.append(entry)
            continue
        problem = check(dest, entry, str(dest))
        if problem:  # the user's own file, or one changed since: never overwritten
            raise DrpError(f"{problem}; delete it and run the command again.")
        done_bytes += entry["size"]
    bar = tqdm(total=sum(f["size"] for f in files), initial=done_bytes, unit="B", unit_scale=True,
               unit_divisor=1024, desc="DreamBench", disable=not progress)
    with bar:
        for entry in todo:
            dest = out / entry["path"]  # download() makes its folder
            fetch_file(raw_url.rstrip("/") + "/" + quote(entry["path"]), dest, entry, timeout)
            bar.update(entry["size"])
    return len(todo)
