"""A threaded HTTP server on 127.0.0.1 for the download tests: the handler class is the test's own."""

import threading
from contextlib import contextmanager
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
