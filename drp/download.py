"""Downloading the public weights with the standard library only: resumable, size- and hash-checked.

Where it sits: the first thing a user runs. `convert_weights.py --download`, and `sample.py` when `weights/`
holds no converted weights, download the SD 1.5 single-file checkpoint (`v1-5-pruned-emaonly.safetensors`,
4.3 GB) with `download`, then convert it into `weights/`; `sample.py`'s first run fetches IP-Adapter's
adapter and image encoder (2.6 GB) the same way.

Which URL: the CLI's `--url` wins over the environment variable `DRP_WEIGHTS_URL`, which wins over
`DEFAULT_URL` (see `weights_url`). IP-Adapter's files are fetched with the same `download`; their
addresses and pins are drp/convert_ip_adapter.py's (`planned_downloads`). A `Planned` download names a
file before any byte moves, so that a CLI can say what it fetches, how big, and where (`how_big`).

How the file is checked: the default file's published sha256 is pinned here (`DEFAULT_SHA256`), and its
download must hash to it whatever the server says; the size and the sha256 the server states are checked
too, and for another URL (`--url`, `$DRP_WEIGHTS_URL`) they are all there is. Hugging Face's `/resolve/`
endpoint answers with a redirect to a CDN, and that redirect states the file's sha256 in `X-Linked-ETag`
and its size in `X-Linked-Size`; the CDN's own `ETag` is something else. So the headers of every redirect
are kept, the sha256 is taken from `X-Linked-ETag` of any hop, else from an `ETag` of the host the URL
names, and only when it reads as 64 hex digits (`"…"` quotes and a weak `W/` prefix allowed). Without a
stated or pinned one, only the size is checked.

What stays on disk: bytes go to `<dest>.part`, which a rerun resumes with an HTTP `Range` request;
a complete and verified `.part` is renamed to `<dest>` with `os.replace`. A `.part` that is corrupted
(too long, or a wrong sha256) is deleted so that a rerun starts afresh; nothing else is ever deleted.
"""

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple, Optional
from urllib.parse import urlsplit

from tqdm import tqdm

from .errors import DrpError

DEFAULT_URL = (
    "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
    "v1-5-pruned-emaonly.safetensors"
)
# The file's published sha256 and size (Hugging Face's for the file; the AUTOMATIC1111 web UI and ComfyUI
# pin the same hash): a download of DEFAULT_URL must hash to it, whatever the server states.
DEFAULT_SHA256 = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
DEFAULT_SIZE = 4_265_146_304  # bytes (3.97 GiB)
URL_ENV = "DRP_WEIGHTS_URL"
CHUNK = 1 << 20  # bytes per read and per hash update
TIMEOUT_S = 60  # seconds of silence from the server before giving up (a rerun resumes)
# What a failed download suggests besides a rerun; IP-Adapter's files name their own variable.
ELSEWHERE = f"pass --url (or set {URL_ENV}) with another address of the checkpoint"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")  # "bytes 1000-1999/2000", total may be "*"


def weights_url(url=None):
    """The checkpoint's URL: `url` (the CLI's --url) if given, else $DRP_WEIGHTS_URL, else DEFAULT_URL."""
    return url or os.environ.get(URL_ENV) or DEFAULT_URL


def pinned(url):
    """(sha256, size) published for the file at `url`: DEFAULT_URL's, else (None, None); the sha256 is checked."""
    return (DEFAULT_SHA256, DEFAULT_SIZE) if url == DEFAULT_URL else (None, None)


def checkpoint_path(folder, url):
    """Where a download of `url` is kept: `folder`/<the file name in the URL>."""
    return Path(folder) / url.rsplit("/", 1)[-1].split("?")[0]


class Planned(NamedTuple):
    """One file to fetch, named before any byte moves: what it is (for the user), from where, to where."""

    what: str
    url: str
    dest: Path
    sha256: Optional[str]  # pinned: the bytes must hash to it, whatever the server states
    size: Optional[int]  # published: for saying how big; what the server states is what gets checked
    elsewhere: str = ELSEWHERE  # what a failed download suggests besides a rerun


def planned_checkpoint(folder, url=None):
    """The SD 1.5 checkpoint's download into `folder`, from `weights_url(url)`."""
    url = weights_url(url)
    return Planned("SD 1.5 checkpoint", url, checkpoint_path(folder, url), *pinned(url))


def how_big(size):
    """A size as Hugging Face's pages write it ("4.3 GB", "44.6 MB"), or what is known without one."""
    if size is None:
        return "size as the server states"
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def fetch(planned, progress=True, timeout=TIMEOUT_S):
    """`download` of a Planned file; returns its path."""
    return download(planned.url, planned.dest, progress=progress, timeout=timeout, sha256=planned.sha256,
                    elsewhere=planned.elsewhere)


def sha256_from_etag(value):
    """The sha256 an ETag header states (`"<64 hex>"`, maybe weak `W/"…"`), or None for any other ETag."""
    if value is None:
        return None
    value = value.strip()
    if value[:2].upper() == "W/":
        value = value[2:]
    value = value.strip('"').lower()
    return value if _HEX64.fullmatch(value) else None


class _KeepRedirectHeaders(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, keeping the host and headers of each redirect response."""

    def __init__(self):
        self.hops = []  # [(host, headers)] in the order the redirects came

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.hops.append((urlsplit(req.full_url).hostname, headers))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _stated_sha256(url, hops):
    """The sha256 the server states for the file, or None (see the file header for the rules)."""
    for _, headers in hops:
        if sha := sha256_from_etag(headers.get("X-Linked-ETag")):
            return sha
    for host, headers in hops:
        if host == urlsplit(url).hostname and (sha := sha256_from_etag(headers.get("ETag"))):
            return sha
    return None


def _linked_size(hops):
    sizes = [h.get("X-Linked-Size") for _, h in hops if (h.get("X-Linked-Size") or "").isdigit()]
    return int(sizes[0]) if sizes else None


def _hash_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest


def _fetch(url, part, progress, timeout):
    """Fills `part` with the file at `url`, resuming what it holds.

    Returns the size and sha256 the server states (None when it does not) and the hashlib object of
    the bytes now in `part`. Two tries at most: the second only after a resume the server could not
    serve (a 416 that does not say the .part is complete, or bytes from another offset), which drops
    our .part and starts from zero.
    """
    for _ in range(2):
        offset = part.stat().st_size if part.exists() else 0
        redirects = _KeepRedirectHeaders()
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            response = urllib.request.build_opener(redirects).open(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code != 416 or not offset:
                raise
            # 416 Range Not Satisfiable: nothing lies at or after `offset`; complete if it is the size.
            hops = redirects.hops + [(urlsplit(e.url).hostname, e.headers)]
            match = re.fullmatch(r"bytes \*/(\d+)", e.headers.get("Content-Range") or "")
            size = int(match[1]) if match else _linked_size(hops)
            e.close()
            if size == offset:
                return size, _stated_sha256(url, hops), _hash_file(part)
            part.unlink()  # our own .part, longer than the file or of unknown length: restart
            continue
        with response:
            hops = redirects.hops + [(urlsplit(response.url).hostname, response.headers)]
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range") or "")
            if response.status == 206 and match and int(match[1]) == offset:
                size = int(match[2]) if match[2] != "*" else None
                mode, digest = "ab", _hash_file(part)
            elif response.status == 200:  # a server that ignores Range sends the whole file
                length = response.headers.get("Content-Length")
                size = int(length) if length and length.isdigit() else None
                offset, mode, digest = 0, "wb", hashlib.sha256()
            else:  # a partial answer from another offset: start again from zero
                part.unlink()
                continue
            size = size if size is not None else _linked_size(hops)
            bar = tqdm(total=size, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=part.stem, disable=not progress)
            with bar, open(part, mode) as f:
                while block := response.read(CHUNK):
                    f.write(block)
                    digest.update(block)
                    bar.update(len(block))
            return size, _stated_sha256(url, hops), digest
    raise DrpError(f"{url} sent bytes from the wrong offset twice; run the command again or pass --url.")


def download(url, dest_path, progress=True, timeout=TIMEOUT_S, sha256=None, elsewhere=ELSEWHERE):
    """Downloads `url` to `dest_path` (resuming `<dest_path>.part`) and returns the path; an existing
    `dest_path` is returned as is, without any network access. `sha256`, if given (`pinned(url)`), is
    what the bytes must hash to, whatever the server states; `elsewhere` ends the sentence of a failure."""
    dest = Path(dest_path)
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DrpError(f"cannot create the folder {dest.parent} for the download ({e.strerror or e}); "
                       "choose another folder.") from None
    try:
        size, stated, digest = _fetch(url, part, progress, timeout)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # OSError covers timeouts
        reason = getattr(e, "reason", e)
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        raise DrpError(
            f"downloading {url} failed ({reason}); run the same command again to resume, or {elsewhere}."
        ) from e
    got = part.stat().st_size
    if size is not None and got < size:  # the connection closed early: keep the bytes for a resume
        raise DrpError(
            f"the download of {url} stopped after {got} of {size} bytes; rerun the same command to resume."
        )
    if size is not None and got > size:
        found = f"{got} bytes instead of {size}"
    elif sha256 is not None and digest.hexdigest() != sha256:
        found = f"sha256 {digest.hexdigest()} instead of the published {sha256}"
    elif stated is not None and digest.hexdigest() != stated:
        found = f"sha256 {digest.hexdigest()} instead of {stated}"
    else:
        os.replace(part, dest)
        return dest
    part.unlink()
    raise DrpError(
        f"the file downloaded from {url} is corrupted ({found}), so {part} was deleted; "
        "run the command again to download it afresh."
    )
