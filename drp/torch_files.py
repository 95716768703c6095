"""Reading a PyTorch checkpoint file (`.ckpt`, `.bin`, `.pt`) without running any code stored in it.

Where it sits: drp/weight_files.py, which opens the checkpoints drp/convert.py and
drp/convert_ip_adapter.py convert, reads the tensors of one that is not safetensors through
`read_state_dict`. Such a file is a pickle, and unpickling can call any function the pickle names
(a `__reduce__` that returns `(os.system, ("…",))` runs a shell command). Three kinds are told apart
by their first bytes:

  * torch.save's zip format (PyTorch ≥ 1.6): a zip whose `<name>/data.pkl` holds the pickle;
  * torch.save's legacy format (older PyTorch, or `_use_new_zipfile_serialization=False`): pickles one
    after another, the first being torch's magic number, then the tensors' raw bytes;
  * a plain pickle (`pickle.dump`), which PyTorch itself does not read.

The first two go through `torch.load(weights_only=True)`, whose unpickler rebuilds only tensors and
plain containers and refuses every other function. A plain pickle is refused before anything is
unpickled. A refusal names the functions the file would call, found by `pickletools.genops`, which
only decodes the opcodes: it never imports or calls what they name.
"""

import _compat_pickle  # the standard library's table of Python 2 names in pickles
import pickletools
import re
import warnings
import zipfile
from collections import deque

import torch

from .errors import DrpError

# torch/serialization.py's MAGIC_NUMBER, the first pickle of a legacy torch.save file
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PICKLES = 5  # magic number, protocol version, system info, the object, the storage keys
PICKLE_STARTS = b"\x80(c}])"  # PROTO (protocol 2+), or what a protocol 0/1 pickle starts with
SAFE_GLOBALS = {"collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.bytearray",
                "builtins.slice", "builtins.complex", "_codecs.encode"}  # allowed by weights_only, as torch.*
NAMED = 3  # functions named in a refusal, then "and N more"
ANSWER = "convert the .safetensors release of the checkpoint instead"


def pickle_globals(f):
    """The `module.name` of every function or class one pickle in the file `f` names, in order.

    Follows the opcodes only: GLOBAL/INST carry the name, STACK_GLOBAL takes the two strings pushed
    before it (maybe fetched from the memo). Stops after the pickle's STOP; raises ValueError if the
    bytes are not a pickle."""
    found, memo, pushed = [], {}, []
    for op, arg, _ in pickletools.genops(f):
        if op.name in ("GLOBAL", "INST"):  # protocols 0-2 write Python 2's names, which unpickling maps
            module, name = arg.split(" ", 1)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            found.append(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")
        elif op.name == "STACK_GLOBAL" and len(pushed) >= 2:
            found.append(f"{pushed[-2]}.{pushed[-1]}")
        if op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        else:
            pushed.append(arg if isinstance(arg, str) and op.name.endswith(("UNICODE", "UNICODE8", "STRING")) else None)
    return found


def kind_of(path):
    """"zip", "legacy" or "pickle" for the three kinds of the file header, None for anything else."""
    with open(path, "rb") as f:
        head = f.read(4)
        if head == b"PK\x03\x04":
            return "zip"
        if not head or head[0] not in PICKLE_STARTS:
            return None
        f.seek(0)
        try:  # decode the first pickle to its STOP, keeping only its last two opcodes (not every argument)
            last = deque(pickletools.genops(f), maxlen=2)
        except Exception:  # not a pickle: an unknown opcode, or bytes missing
            return None
    if len(last) == 2 and last[0][0].name.startswith("LONG") and last[0][1] == LEGACY_MAGIC:
        return "legacy"
    return "pickle"


def unsafe_globals(path, kind):
    """The functions the file names that torch's weights-only unpickler would refuse (by their names),
    or None if its pickles cannot be decoded to their end: a truncated or damaged file."""
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                with z.open(name) as f:
                    found = pickle_globals(f)
        else:
            found = []
            with open(path, "rb") as f:
                for _ in range(LEGACY_PICKLES if kind == "legacy" else 1):
                    found += pickle_globals(f)
    except Exception:  # StopIteration (no data.pkl), ValueError (not a pickle), zipfile's errors, …
        return None
    names = [n for n in dict.fromkeys(found) if not n.startswith("torch.") and n not in SAFE_GLOBALS]
    return names


def named(names):
    if not names:
        return ""
    shown = ", ".join(names[:NAMED]) + (f" and {len(names) - NAMED} more" if len(names) > NAMED else "")
    return f" ({shown})"


def refusal(text):
    """Why torch's weights-only loader refused a file that names no unsafe function, in a few words."""
    if match := re.search(r"Unsupported operand (\d+)", text):  # e.g. 149, FRAME: pickle protocol 4 and up
        name = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}.get(int(match[1]), match[1])
        return f"PyTorch's weights-only loader does not support its pickle opcode {name}"
    return "PyTorch's weights-only loader refuses what it holds"


def read_state_dict(path):
    """The object in the PyTorch file `path`, unpickled with weights only; DrpError with one sentence
    if it is no such file, is damaged, or would need to run code to be read."""
    try:
        kind = kind_of(path)
    except OSError as e:
        raise DrpError(f"{path} cannot be read ({e.strerror or e}); check the path and its permissions.") from None
    if kind is None:
        raise DrpError(f"{path} is not a checkpoint (neither safetensors nor a PyTorch file); "
                       "give the path of an SD 1.x .safetensors or .ckpt file.")
    if kind == "pickle":
        raise DrpError(f"{path} is a plain Python pickle, not a file written by torch.save, and unpickling it "
                       f"could run code stored in it{named(unsafe_globals(path, kind) or [])}, which drp refuses to do; "
                       f"{ANSWER}.")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the outcome is all that matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, … here
        names = unsafe_globals(path, kind) if "Weights only load failed" in str(e) else None
        if names:
            raise DrpError(f"{path} can only be read by running code stored in it{named(names)}, which drp "
                           f"refuses to do; {ANSWER}.") from None
        if names is not None:  # decodes to its end, names nothing unsafe, and torch still refuses it
            raise DrpError(f"{path} cannot be read safely ({refusal(str(e))}), and drp unpickles files no other "
                           f"way; {ANSWER}.") from None
        raise DrpError(f"{path} is a truncated or damaged PyTorch file ({type(e).__name__}); download it again.") from None
