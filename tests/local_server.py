"""A threaded HTTP server on 127.0.0.1 for the download tests: the handler class is the test's own."""

import threading
from contextlib import contextmanager
from http.server import ThreadingHTTPServer

TIMEOUT_S = 5  # every socket in the download tests gives up after this long


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
