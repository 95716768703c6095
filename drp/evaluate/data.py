"""What the benchmarks are made of: DreamBench's subjects, photos and prompts, style pictures, content prompts.

Where it sits: the first step of `python -m drp.evaluate run` (the items are built from these lists)
and of `score` (the real photos of each subject). The protocol is docs/EVALUATION.md's:

- **DreamBench** (google/dreambooth, `dataset/`): `prompts_and_classes.txt` names 30 subjects and their
  class nouns, and two lists of 25 prompt templates, one for objects and one for live subjects (cats and
  dogs), written `'a {0} {1} in the jungle'.format(unique_token, class_token)`. Zero-shot methods use the
  prompt with the class only: `a cat in the jungle`. A subject's photos are `dataset/<subject>/NN.jpg`,
  numbered with gaps, so the listing is sorted; the first photo is the conditioning image.
- **Style pictures**: any folder of pictures (StyleBench's layout `<style>/<image>` or flat), sorted by
  their path; without a folder, the project's own public-domain paintings in `assets/`.
  A picture may carry a caption, `<picture>.txt` beside it: one line naming what it shows ("a screaming
  figure on a bridge"), for the content-leak score.
- **Content prompts** for the style benchmark: 20 short subjects. The list is the project's own, written in
  the manner of StyleBench's text-driven protocol; StyleBench's published list is not stored here, so
  numbers on this list are not StyleBench's.
- **Prompt kinds** (breakdowns), by a prompt's position in its DreamBench list (docs/EVALUATION.md):
  objects 1–20 recontextualisation, 21–25 property; live subjects 1–10 recontextualisation, 11–20
  accessory, 21–25 property.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DrpError

ASSETS = Path(__file__).resolve().parents[2] / "assets"
PAINTINGS = ("shipwreck.jpg", "starry_night.jpg", "the_scream.jpg")  # in ASSETS; licences in assets/README.md
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
LIVE_CLASSES = ("cat", "dog")  # DreamBench's live subjects get the "Live Subject Prompts"
DOWNLOAD_HINT = "download it with `python -m drp.evaluate download dreambench --out DATA`"

# the project's own list (see the header): not StyleBench's published one
CONTENT_PROMPTS = (
    "A bench", "A bird", "A butterfly", "A car", "A cat", "A dog", "An elephant", "A guitar", "A horse",
    "A house with a tree beside", "A laptop", "A lighthouse", "A motorcycle", "A mountain", "A penguin",
    "A robot", "A rocket", "A teapot", "A tree", "A violin",
)


@dataclass(frozen=True)
class Subject:
    """One DreamBench subject: its folder name, class noun, photos (sorted) and prompts (class only)."""

    name: str  # "cat2"
    noun: str  # "cat": the class token, and the word of the prompt that names the subject
    photos: tuple  # paths relative to DATA: ("dataset/cat2/00.jpg", ...)
    prompts: tuple  # ("a cat in the jungle", ...)


def class_only(template, noun):
    """'a {0} {1} in the jungle' -> 'a cat in the jungle': no unique token, one space between words."""
    return " ".join(template.format("", noun).split())


def without_words(prompt, words):
    """The prompt with the subject's words taken out (C_bg): 'a cat in the jungle' -> 'a in the jungle'."""
    cut = re.sub(rf"\b{re.escape(words)}\b", " ", prompt, count=1)
    return " ".join(cut.split())


def read_prompts_and_classes(path):
    """prompts_and_classes.txt -> ({subject: class noun}, object templates, live-subject templates)."""
    classes, lists, current = {}, {"object": [], "live": []}, None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("Object Prompts"):
            current = "object"
        elif line.startswith("Live Subject Prompts"):
            current = "live"
        elif current and (m := re.match(r"'(.*)'\.format\(", line)):
            lists[current].append(m[1])
        elif current is None and line.count(",") == 1 and line != "subject_name,class":
            name, noun = line.split(",")
            classes[name.strip()] = noun.strip()
    if not classes or not lists["object"] or not lists["live"]:
        raise DrpError(f"{path} is not DreamBench's prompts_and_classes.txt (no subjects or prompt lists); "
                       f"{DOWNLOAD_HINT}.")
    return classes, lists["object"], lists["live"]


def prompt_kind(index, live):
    """The kind of DreamBench prompt number `index` (0-based) of the object list, or of the live list."""
    if index >= 20:
        return "property"  # "a red …", "a purple …", "a shiny …", "a wet …", "a cube shaped …"
    if live and index >= 10:
        return "accessory"  # hats, outfits, glasses, a scarf, a shirt
    return "recontextualisation"  # backgrounds: "in the jungle", "with a city in the background", …


def caption(style_dir, style):
    """The caption of a style picture (`<picture>.txt` beside it, its first line), or None."""
    path = (Path(style_dir) / style).with_suffix(".txt")
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return lines[0].strip() or None if lines else None


def photos_in(folder):
    """A subject's photos: the pictures in its folder, sorted (DreamBench numbers them with gaps)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def dreambench(data, names=None):
    """The DreamBench subjects under DATA (all, or those named, in the order given), as `Subject`s."""
    data = Path(data)
    listing = data / "dataset" / "prompts_and_classes.txt"
    if not listing.is_file():
        raise DrpError(f"there is no DreamBench dataset in {data} ({listing} is missing); {DOWNLOAD_HINT}.")
    classes, objects, live = read_prompts_and_classes(listing)
    names = list(classes) if names is None else names
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise DrpError(f"unknown DreamBench subject {unknown[0]!r}; choose from {', '.join(classes)}.")
    subjects = []
    for name in names:
        folder = data / "dataset" / name
        photos = photos_in(folder)
        if not photos:
            raise DrpError(f"the DreamBench subject {name!r} has no photos in {folder}; {DOWNLOAD_HINT}.")
        templates = live if classes[name] in LIVE_CLASSES else objects
        subjects.append(Subject(name, classes[name], tuple(p.relative_to(data).as_posix() for p in photos),
                                tuple(class_only(t, classes[name]) for t in templates)))
    return subjects


def style_images(style_dir=None):
    """(folder, [paths relative to it]) of the style pictures: every picture under `style_dir`, sorted,
    or the project's paintings when `style_dir` is None."""
    if style_dir is None:
        return ASSETS, list(PAINTINGS)
    folder = Path(style_dir)
    if not folder.is_dir():
        raise DrpError(f"the style folder {folder} does not exist; give --style-dir a folder of pictures.")
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise DrpError(f"the style folder {folder} holds no pictures ({', '.join(IMAGE_SUFFIXES)}); give another.")
    return folder, found


def slug(text):
    """A name usable in a file name: 'Impressionism/01 sunrise.jpg' -> 'Impressionism-01-sunrise'."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", str(Path(text).with_suffix(""))).strip("-.")
