"""The first run of `python sample.py`: what it downloads into a weights folder, and downloading and converting it.

Where it sits: before `drp.load`, on a fresh machine. The demo is the paper's method, DRP-Diff on IP-Adapter,
so a folder without converted weights gets all it needs:

    SD 1.5           v1-5-pruned-emaonly.safetensors           4.3 GB   drp/download.py
    IP-Adapter       models/ip-adapter_sd15.safetensors       44.6 MB   drp/convert_ip_adapter.py
    image encoder    models/image_encoder/ (CLIP ViT-H/14)     2.5 GB   (the same)

6.8 GB in all; with `--mode self-attention` SD 1.5 alone. Other addresses: $DRP_WEIGHTS_URL for SD,
$DRP_IP_ADAPTER_URL for a base address with h94/IP-Adapter's layout.

Which folders are downloaded into (`downloads`): only a first run's. A folder that holds converted SD
weights is left as it is, even without IP-Adapter: whoever converted SD there adds IP-Adapter with
`python convert_weights.py --download ip-adapter` when they want it, rather than 2.6 GB arriving on some
later run (sample.py's `--mode auto` then runs the self-attention mode and says so). The one exception
is a first run that stopped after converting SD: IP-Adapter's download is there, not converted, and is
finished.

Nothing half-done is left (`fetch_and_convert`): every file is fetched before any is converted, so an
interrupted or refused download leaves no converted weights and the next run resumes it (drp/download.py
keeps `.part` files); a conversion that fails after SD's leaves SD usable (each component appears whole,
its JSON last) and the downloads there for the next run to finish. Nothing here prints: `announcement`
gives the lines the CLI says before it starts.
"""

from pathlib import Path

from .convert import convert, output_paths
from .convert_ip_adapter import KEEP, components_due, convert_downloads, planned_downloads, unfinished
from .download import fetch, how_big, planned_checkpoint

NAMES = {"sd15": "SD 1.5", "ip-adapter": "IP-Adapter with its image encoder"}


def downloads(folder, mode="auto"):
    """What a run of `mode` downloads into `folder` before loading: some of "sd15" and "ip-adapter", in that order."""
    folder = Path(folder)
    first = not any(p.exists() for p in output_paths(folder))
    wanted = ["sd15"] if first else []
    if mode != "self-attention" and (first or unfinished(folder)) and any(components_due(folder).values()):
        wanted.append("ip-adapter")  # (a component converted already is not fetched again)
    return wanted


def planned_files(folder, what):
    """The drp.download.Planned files of `what` (from `downloads`), SD's first."""
    folder = Path(folder)
    files = [planned_checkpoint(folder)] if "sd15" in what else []
    return files + (planned_downloads("ip-adapter", folder) if "ip-adapter" in what else [])


def announcement(folder, what):
    """The lines that say, before any byte moves, what is downloaded, how big, from where and into where."""
    files = planned_files(folder, what)
    sizes = [p.size for p in files]
    if len(files) == 1:
        total, them = how_big(sizes[0]), "it"
    else:
        total, them = "sizes as the server states" if None in sizes else f"{how_big(sum(sizes))} in all", "them"
    why, instead = f"{folder} holds no converted weights", "--no-download stops instead"
    if "sd15" not in what:
        why = f"{folder} holds IP-Adapter's download, not yet converted"
    elif "ip-adapter" in what:
        instead += "; --mode self-attention fetches SD 1.5 alone"
    names = " and ".join(NAMES[w] for w in what)
    lines = [f"{why}: downloading {names} ({total}) into {folder}, then converting {them} there ({instead}):"]
    for p in files:
        kept = " (already downloaded)" if p.dest.exists() else ""
        lines.append(f"  {p.what}: {how_big(p.size)} from {p.url} into {p.dest}{kept}")
    return lines


def fetch_and_convert(folder, what, progress=True):
    """Downloads `what` into `folder` (resuming), then converts it there in fp16; returns what can be deleted."""
    folder = Path(folder)
    files = planned_files(folder, what)
    for planned in files:  # all before any conversion (see the file's header)
        fetch(planned, progress=progress)
    kept = []
    if "sd15" in what:
        convert(files[0].dest, folder, dtype="fp16", progress=progress)
        kept.append(files[0].dest)
    if "ip-adapter" in what:
        convert_downloads("ip-adapter", folder, dtype="fp16", progress=progress)
        kept.append(folder / KEEP)
    return kept
