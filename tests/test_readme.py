"""The README's tour of `drp/` names every file and folder of the package, and nothing that is gone."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tour():
    """The names in the first column of the README's "A tour of `drp/`" table: {"unet.py", "bench/", …}."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## A tour of `drp/`", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for cell in rows for name in re.findall(r"`([^`]+)`", cell)}


def test_the_tour_of_drp_names_every_file_and_sub_package_and_only_those():
    drp = ROOT / "drp"
    present = {p.name for p in drp.glob("*.py")} | {p.name + "/" for p in drp.iterdir() if (p / "__init__.py").is_file()}
    named = tour()
    assert len(named) > 30 and "unet.py" in named  # the table was found and read
    assert sorted(present - named) == [], "missing from the README's tour of drp/"
    assert sorted(named - present) == [], "named in the README's tour but not in drp/"
