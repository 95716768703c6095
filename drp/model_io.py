"""Loading the converted weights folder into the three SD models: `drp.load()`.

Where it sits: the first step of every run. `convert_weights.py` (drp/convert.py) writes a folder
with our parameter names,

    weights/unet.safetensors  vae.safetensors  text_encoder.safetensors  model.json

where `model.json` = {"format": 1, "unet": UNetConfig fields, "vae": ..., "text_encoder": ...,
"source": {"file", "layout", "sha256", "dtype"}}. Loading builds each model on PyTorch's "meta"
device (shapes only, no memory and no random initialisation), reads the file tensor by tensor,
converts each tensor to the compute dtype on the target device, and hands the tensors to the model
with `load_state_dict(strict=True, assign=True)`. So the weights exist once in memory, and a
missing or extra tensor is an error rather than a silently random layer.

Plays the part of ml-explore/mlx-examples stable_diffusion/model_io.py
(https://github.com/ml-explore/mlx-examples/blob/main/stable_diffusion/stable_diffusion/model_io.py),
without its key map: our names are those of the files.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .clip import CLIPConfig, CLIPTextModel
from .devices import resolve_device, resolve_dtype
from .errors import DrpError
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

FORMAT = 1  # version of the folder layout; bump when model.json or the file names change
# component name (a key of model.json) -> (model class, config class, file name)
MODELS = {
    "unet": (UNet, UNetConfig, "unet.safetensors"),
    "vae": (VAE, VAEConfig, "vae.safetensors"),
    "text_encoder": (CLIPTextModel, CLIPConfig, "text_encoder.safetensors"),
}
VOCAB = "bpe_simple_vocab_16e6.txt.gz"
HOW_TO_GET = ("get them with `python convert_weights.py --download` or "
              "`python convert_weights.py PATH/TO/v1-5-pruned-emaonly.safetensors`")


@dataclass
class StableDiffusion:
    """The loaded models of SD 1.x, with where they run and where their weights came from."""

    tokenizer: Tokenizer
    text_encoder: CLIPTextModel
    unet: UNet
    vae: VAE
    device: torch.device
    dtype: torch.dtype
    source: dict  # model.json's "source": file, layout, sha256, dtype of the files


def build_on_meta(component, cfg):
    """The model of `component` with the shapes of `cfg` and no storage (nothing initialised)."""
    cls = MODELS[component][0]
    with torch.device("meta"):
        return cls(cfg)


def read_model_json(folder):
    """model.json of a converted folder, with its configs turned back into config objects."""
    folder = Path(folder)
    path = folder / "model.json"
    missing = [p.name for p in [path] + [folder / f for _, _, f in MODELS.values()] if not p.is_file()]
    if missing:
        raise DrpError(f"{folder} holds no complete set of converted weights ({', '.join(missing)} missing); "
                       f"{HOW_TO_GET}.")
    try:
        info = json.loads(path.read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"format {info.get('format')!r}")
        configs = {name: cfg_cls(**info[name]) for name, (_, cfg_cls, _) in MODELS.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DrpError(f"{path} is not a model.json written by this version of drp ({e}); "
                       f"convert the weights again: {HOW_TO_GET}.") from None
    return info, configs


def load_model(component, cfg, path, device, dtype):
    """One model from its file: built on meta, each tensor read, cast and moved once, then assigned."""
    model = build_on_meta(component, cfg)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            # copy=True: one fresh, aligned tensor each, never a view of the file's memory map
            state = {key: f.get_tensor(key).to(device=device, dtype=dtype, copy=True) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise DrpError(f"{path} cannot be read ({e}); convert the weights again: {HOW_TO_GET}.") from None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise DrpError(f"{path} does not fit the {component} described in model.json ({first}); "
                       f"convert the weights again: {HOW_TO_GET}.") from None
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a tensor the file cannot hold (e.g. a non-persistent buffer): a bug in the model
        raise RuntimeError(f"{component} was loaded without a value for {leftover[0]}")
    return model.eval().requires_grad_(False)


def load(path="weights", device=None, dtype=None):
    """The converted SD 1.x models in `path`, on `device` (default CPU) in `dtype` (default fp32).

    `device` and `dtype` take what `--device`/`--dtype` take (e.g. "cuda", "fp16") or torch objects;
    the files may be fp16 or fp32 whatever the compute dtype is.
    """
    folder = Path(path)
    info, configs = read_model_json(folder)
    device = resolve_device("cpu" if device is None else device)
    dtype = resolve_dtype("fp32" if dtype is None else dtype, device)
    models = {name: load_model(name, configs[name], folder / MODELS[name][2], device, dtype) for name in MODELS}
    vocab = folder / VOCAB
    return StableDiffusion(
        tokenizer=Tokenizer(vocab if vocab.is_file() else None),
        text_encoder=models["text_encoder"],
        unet=models["unet"],
        vae=models["vae"],
        device=device,
        dtype=dtype,
        source=info["source"],
    )
