"""Writing a file so that nobody ever finds it half-written: into a temporary file beside it, then renamed.

`os.replace` within one folder is atomic, so a reader (or a rerun after Ctrl-C or a crash) sees either
the old file or the whole new one. Used by every writer of user-visible results: PNGs, the report
picture, the evaluation's JSON and contact sheets.
"""

import os
from pathlib import Path

from .errors import DrpError


def write_atomically(path, write, advice):
    """Calls `write(tmp)` for a temporary path in `path`'s folder, then renames it to `path`; returns `path`.

    An OSError becomes one sentence, "cannot write PATH (why); ADVICE"; on any failure, Ctrl-C included,
    the temporary file is removed and nothing is left behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder, so the rename is atomic
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DrpError(f"cannot write {path} ({e.strerror or e}); {advice}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
