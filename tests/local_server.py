"""A threaded HTTP server on 127.0.0.1 for the download tests: the handler class is the test's own, or
`FileHost`'s, which serves files as Hugging Face does (Range requests, each file's sha256 in its ETag)."""

import hashlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TIMEOUT_S = 5  # every socket in the download tests gives up after this long


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler whose sockets give up after TIMEOUT_S and that logs nothing to the test output."""

    timeout = TIMEOUT_S

    def log_message(self, *args):
        pass


@contextmanager
def serving(handler_class):
    """Serves `handler_class` on a free port of 127.0.0.1; yields the base URL, shuts the server down after."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT_S)


@dataclass
class FileHost:
    """`files` {path: bytes} served with Range support and each file's sha256 in its ETag; `requests` holds
    the (path, Range header) of every request. To misbehave once or always: `cut` {path: bytes sent before
    the first response closes}, `damaged` {path: bytes sent instead, under the true file's ETag},
    `stated` {path: sha256 stated instead of the true one}."""

    files: dict
    cut: dict = field(default_factory=dict)
    damaged: dict = field(default_factory=dict)
    stated: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)
    url: str = ""

    def sha256(self, path):
        return self.stated.get(path) or hashlib.sha256(self.files[path]).hexdigest()

    def paths(self):
        """The paths requested, in order."""
        return [path for path, _ in self.requests]


@contextmanager
def serving_files(host):
    """Serves the FileHost `host` on 127.0.0.1, with `host.url` its base URL while serving; yields `host`."""

    class Handler(QuietHandler):
        def do_GET(self):
            host.requests.append((self.path, self.headers.get("Range")))
            if self.path not in host.files:
                self.send_error(404)
                return
            body = host.damaged.get(self.path, host.files[self.path])
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if self.headers["Range"] else 0
            if start >= len(body) > 0:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.send_header("ETag", f'"{host.sha256(self.path)}"')
            self.end_headers()
            end = start + host.cut.pop(self.path) if self.path in host.cut else len(body)
            self.wfile.write(body[start:end])  # a cut response then closes the connection early

    with serving(Handler) as host.url:
        yield host
