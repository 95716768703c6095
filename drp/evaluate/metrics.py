"""The metrics' backbones, read straight from the user's files: CLIP (text and image towers) and DINO.

Where it sits: `python -m drp.evaluate score`. Each metric is a cosine between two embeddings
(docs/EVALUATION.md): CLIP-T between an image and its prompt, CLIP-I and DINO between an image and real
photos, the style score between an image and its style picture. The networks are drp's own:

- CLIP: a transformers `CLIPModel` folder of any size (`openai/clip-vit-large-patch14` for the paper's
  table, `openai/clip-vit-base-patch32` as well): `config.json` gives the shapes, `model.safetensors` (or
  `pytorch_model.bin`, unpickled only with `weights_only=True`) the weights. The text tower is drp/clip.py
  (SD's own text encoder, pooled at the first end-of-text token and projected), the image tower
  drp/vision.py; both read the file's names with no map. `logit_scale` is not needed for cosines.
- DINO ViT-S/16: the original `dino_deitsmall16_pretrain.pth` (its shapes read from the tensors; 64
  channels per head, LayerNorm eps 1e-6 as DINO's code sets it) or the `facebook/dino-vits16` folder
  (eps from its config.json: 1e-12 there), mapped onto drp/vision.py's names.

Which weights scored a run is part of its numbers (an L/14 score is not a B/32 one): each scorer
carries `weights`, a description of its file: the model, its kind ("ViT-L/14", from the shapes), the
file's name and sha256, DINO's LayerNorm ε, and where it was read (`path`); the name and place are not
part of its identity (`identity`).

Preprocessing is each model's own, pixel for pixel (drp/image_processing.py): CLIP's resize-and-crop to
224 with CLIP's mean/std; DINO's resize to 256, crop 224, ImageNet mean/std.
"""

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..clip import CLIPConfig, CLIPTextModelWithProjection
from ..errors import DrpError
from ..tokenizer import Tokenizer
from ..vision import (VisionConfig, VisionTransformer, clip_from_transformers, clip_pixels, dino_from_original,
                      dino_from_transformers, dino_pixels, load_state)
from ..weight_files import sha256_of

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CLIP_HINT = "--clip takes a transformers CLIPModel folder such as openai/clip-vit-large-patch14"
DINO_HINT = "--dino takes dino_deitsmall16_pretrain.pth or a facebook/dino-vits16 folder"
IGNORED = ("logit_scale", "text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def read_state(path, hint):
    """{name: tensor} of a .safetensors file, or of a pickle read with weights_only=True."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a broken file, or a pickle that needs code to load: not weights we read
        raise DrpError(f"{path} cannot be read as weights ({type(e).__name__}); {hint}.") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DrpError(f"{path} holds no plain state dict of tensors; {hint}.")
    return state


SIZES = {384: "S", 768: "B", 1024: "L", 1280: "H"}  # ViT widths by their usual letters


def vit_kind(cfg):
    """'ViT-L/14' for a vision config of a usual size, else its width, depth and patch."""
    if cfg.dim in SIZES:
        return f"ViT-{SIZES[cfg.dim]}/{cfg.patch_size}"
    return f"ViT ({cfg.dim} wide, {cfg.layers} layers, patch {cfg.patch_size})"


def describe(model, cfg, file, name, given, **extra):
    """A scorer's `weights`: what scored, by content (the sha256 of `file`) and by name; `given`: what
    --clip/--dino named (a folder or a file), to read the same weights again."""
    return dict(model=model, kind=vit_kind(cfg), file=name, sha256=sha256_of([Path(file)], progress=False), **extra,
                path=str(Path(given).resolve()))


def identity(weights):
    """What makes two scorings comparable: the weights' description without the file's name and place (the
    same file copied or renamed scores the same)."""
    return None if weights is None else {k: v for k, v in weights.items() if k not in ("file", "path")}


def read_folder(folder, kind, hint):
    """(config.json dict, state dict, weights file) of a transformers folder whose model_type must be `kind`."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not folder.is_dir() or not config_path.is_file():
        raise DrpError(f"{folder} is not a transformers model folder (no config.json); {hint}.")
    try:
        config = json.loads(config_path.read_text())
    except ValueError:
        raise DrpError(f"{config_path} is not JSON; {hint}.") from None
    if config.get("model_type") != kind:
        raise DrpError(f"{folder} holds a model of type {config.get('model_type')!r}, not {kind!r}; {hint}.")
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise DrpError(f"{folder} has no {' or '.join(WEIGHT_FILES)}; {hint}.")
    return config, read_state(weights, hint), weights


class CLIPScorer:
    """CLIP's two towers and its tokenizer: normalised text and image embeddings."""

    def __init__(self, text_model, image_model, device, weights=None):
        self.text_model, self.image_model, self.device = text_model, image_model, device
        self.weights = weights  # `describe`
        self.tokenizer = Tokenizer()  # OpenAI's CLIPs share SD's vocabulary

    @torch.no_grad()
    def texts(self, prompts):
        """Prompts -> (B, P) unit vectors."""
        return F.normalize(self.text_model.embed(self.tokenizer(prompts).to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def images(self, pictures):
        """PIL images or paths -> (B, P) unit vectors."""
        pixels = clip_pixels(pictures, size=self.image_model.cfg.image_size).to(self.device)
        return F.normalize(self.image_model(pixels).image_embeds.float(), dim=-1)


def load_clip(folder, device="cpu"):
    """A `CLIPScorer` from a transformers CLIPModel folder, in fp32 on `device`."""
    config, state, path = read_folder(folder, "clip", CLIP_HINT)
    state = {k: v for k, v in state.items() if k not in IGNORED}
    with torch.device("meta"):  # shapes only: the file's tensors are assigned, nothing is initialised
        text = CLIPTextModelWithProjection(CLIPConfig.from_transformers(config), config.get("projection_dim", 512))
        image = VisionTransformer(VisionConfig.from_transformers(config))
    text_state = {k: v for k, v in state.items() if k.startswith(("text_model.", "text_projection."))}
    try:
        text.load_state_dict(text_state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise DrpError(f"the text half of {folder} does not fit its config.json ({first}); {CLIP_HINT}.") from None
    load_state(image, clip_from_transformers(state), what="CLIP image")  # any stray tensor is named
    weights = describe("CLIP", image.cfg, path, f"{Path(folder).resolve().name}/{path.name}", folder)
    return CLIPScorer(text.to(device).eval().float(), image.to(device).eval().float(), device, weights)


class DINOScorer:
    """DINO's backbone: normalised final-norm CLS tokens."""

    def __init__(self, model, device, weights=None):
        self.model, self.device = model, device
        self.weights = weights  # `describe`

    @torch.no_grad()
    def images(self, pictures):
        """PIL images or paths -> (B, 384) unit vectors."""
        return F.normalize(self.model(dino_pixels(pictures).to(self.device)).pooled.float(), dim=-1)


def dino_config_of(state):
    """DINO ViT-S/16's config with the shapes the original file's tensors have (64 channels per head)."""
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in state]
    if missing:
        what = " (it holds CLIP's names)" if any(k.startswith("vision_model.") for k in state) else ""
        raise DrpError(f"the weights lack DINO's {missing[0]}{what}; {DINO_HINT}.")
    dim, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    return replace(VisionConfig.dino_s16(), dim=dim, layers=layers, heads=max(1, dim // 64),
                   mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0], patch_size=patch, image_size=grid * patch)


def load_dino(path, device="cpu"):
    """A `DINOScorer` from dino_deitsmall16_pretrain.pth or a facebook/dino-vits16 folder, fp32 on `device`."""
    path = Path(path)
    if path.is_dir():
        config, state, file = read_folder(path, "vit", DINO_HINT)
        cfg, ours = VisionConfig.from_transformers(config), dino_from_transformers(state)
        name = f"{path.resolve().name}/{file.name}"
    elif path.is_file():
        state = read_state(path, DINO_HINT)
        cfg = dino_config_of(state)
        ours = dino_from_original(state)
        file, name = path, path.name
    else:
        raise DrpError(f"{path} does not exist; {DINO_HINT}.")
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    model = load_state(model, ours, what="DINO")
    weights = describe("DINO", cfg, file, name, path, eps=cfg.eps)
    return DINOScorer(model.to(device).eval().float(), device, weights)


def cosine(a, b):
    """Row-wise cosine of unit vectors (N, P) and (N, P) -> (N,)."""
    return (a * b).sum(dim=-1)
