"""Read the key/shape manifests of the public SD checkpoints shipped in tests/data/manifests."""

from functools import lru_cache
from pathlib import Path

MANIFESTS = Path(__file__).parent / "data" / "manifests"


@lru_cache(maxsize=None)
def read_manifest(name):
    """{key: shape} of every row of a manifest TSV; the first column (file) is kept aside."""
    rows = {}
    for line in (MANIFESTS / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        cols = line.split("\t")
        if cols[0] in ("file", "key"):  # header row
            continue
        *file, key, shape = cols
        rows[(file[0] if file else "", key)] = tuple(int(d) for d in shape.split(",") if d)
    return rows


def diffusers_manifest(component):
    """{key: shape} of one component (unet, vae, text_encoder) of the SD 1.5 diffusers folder."""
    return {k: s for (f, k), s in read_manifest("sd15_diffusers_manifest.tsv").items() if f.startswith(component + "/")}


def ldm_manifest(name="sd15_ldm_manifest.tsv"):
    """{key: shape} of a single-file (original LDM layout) checkpoint."""
    return {k: s for (_, k), s in read_manifest(name).items()}
