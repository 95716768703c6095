"""Loading the converted weights folder into the three SD models: `drp.load()`.

Where it sits: the first step of every run. `convert_weights.py` (drp/convert.py) writes a folder
with our parameter names,

    weights/unet.safetensors  vae.safetensors  text_encoder.safetensors  model.json

where `model.json` = {"format": 1, "unet": UNetConfig fields, "vae": ..., "text_encoder": ...,
"source": {"file", "layout", "sha256", "dtype"}}. Loading builds each model on PyTorch's "meta"
device (shapes only, no memory and no random initialisation), reads the file tensor by tensor,
converts each tensor to the compute dtype on the target device, and hands the tensors to the model
with `load_state_dict(strict=True, assign=True)`. So the weights exist once in memory, and a
missing or extra tensor is an error rather than a silently random layer. One tensor may stay as
stored: the text encoder's token table, read only 77 rows at a time, keeps an fp16 file's dtype
under fp32 compute (the rows are cast after the lookup, the same numbers; 72 MiB less).

IP-Adapter's two components, when drp/convert_ip_adapter.py has added them to the folder
(`ip_adapter.safetensors` and `image_encoder.safetensors`, each with its own JSON), are loaded the same
way by `load_ip_component`, but only when `sd.ip_adapter` or `sd.image_encoder` is first asked for:
text-to-image never reads them.

The files are read with plain reads, not through a memory map: a mapped file's pages stay resident
until it is closed, so fp16 files loaded for fp32 compute would cost 1.5 copies of the weights at the
peak (5.0 GB for SD 1.5 instead of 4.3). On the CPU, convolution weights are stored channels_last,
which makes PyTorch's convolutions, and every activation after them, use that layout: 6–10 % faster
(UNet, measured against the same model without); the models give their outputs back in the usual layout.
On a GPU they keep the usual layout: there the fp16 VAE took 1.22× diffusers' time with channels_last
(an H100) and 0.98× without (an H200; each ratio within one benchmark run), its GroupNorms otherwise
converting layouts each time.

Plays the part of ml-explore/mlx-examples stable_diffusion/model_io.py
(https://github.com/ml-explore/mlx-examples/blob/main/stable_diffusion/stable_diffusion/model_io.py),
without its key map: our names are those of the files.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

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
    folder: Optional[Path] = None  # the converted folder; IP-Adapter's components are read from it on first use
    components: dict = field(default_factory=dict, repr=False)  # the optional components loaded (or set) so far

    # IP-Adapter's two components (drp/convert_ip_adapter.py adds them to the folder): None when not
    # converted, read only when first asked for, so that plain text-to-image never reads them.
    @property
    def image_encoder(self):
        return self.component("image_encoder")

    @image_encoder.setter
    def image_encoder(self, model):
        self.components["image_encoder"] = model

    @property
    def ip_adapter(self):
        return self.component("ip_adapter")

    @ip_adapter.setter
    def ip_adapter(self, model):
        self.components["ip_adapter"] = model

    def has(self, name):
        """Whether the optional component `name` is set or converted into the folder, without reading it."""
        if name in self.components:
            return self.components[name] is not None
        return ip_component_converted(self.folder, name)

    def component(self, name):
        if name not in self.components:
            self.components[name] = load_ip_component(name, self.folder, self.unet, self.device, self.dtype)
        return self.components[name]


def build_on_meta(component, cfg):
    """The model of `component` with the shapes of `cfg`, no storage, and nothing initialised."""
    return build_module_on_meta(MODELS[component][0], cfg)


def build_module_on_meta(cls, cfg):
    """`cls(cfg)` with no storage and nothing initialised.

    On the meta device an initialiser has nothing to fill, but it still runs, and the first `normal_`
    there (nn.Embedding's) takes 2.5 s: it imports torch._dynamo. So torch.nn.init's functions do
    nothing while the model is built; every value comes from the file.
    """
    initialisers = {name: f for name, f in vars(nn.init).items() if name.endswith("_") and not name.startswith("_")}
    try:
        for name in initialisers:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return cls(cfg)
    finally:
        for name, f in initialisers.items():
            setattr(nn.init, name, f)


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


# dtype names of the safetensors format -> torch dtypes (the ones our converter writes, and integers)
FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
               "I32": torch.int32}


def read_tensors(path, device, dtype, lookup_tables=()):
    """{name: tensor} of a .safetensors file, each read into one scratch buffer, then cast and moved once.

    The format: 8 bytes (little-endian length n), n bytes of JSON {name: {"dtype", "shape",
    "data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw data, offsets counted from its start.
    Floating-point tensors become `dtype`, except the tables named in `lookup_tables` (the model casts
    the rows it reads) when the file's dtype is narrower than fp32 compute and so loses nothing there.
    On the CPU, 4-D tensors (convolution weights) become channels_last.
    """
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= os.fstat(f.fileno()).st_size - 8:
            raise ValueError("no safetensors header")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"])  # in file order
        scratch = torch.empty(max((e["data_offsets"][1] - e["data_offsets"][0] for _, e in entries), default=0),
                              dtype=torch.uint8)  # reused: only the final tensors take fresh memory
        tensors = {}
        for name, entry in entries:
            (begin, end), stored_dtype = entry["data_offsets"], FILE_DTYPES[entry["dtype"]]
            if torch.Size(entry["shape"]).numel() * stored_dtype.itemsize != end - begin:
                raise ValueError(f"{name} has {end - begin} bytes for shape {entry['shape']}")
            raw = scratch[: end - begin]
            f.seek(8 + n + begin)
            if f.readinto(raw.numpy()) != end - begin:
                raise ValueError(f"the file ends inside {name}")
            stored = raw.view(stored_dtype).view(entry["shape"])
            layout = torch.channels_last if stored.dim() == 4 and device.type == "cpu" else torch.contiguous_format
            cast = stored.is_floating_point() and not (name in lookup_tables and dtype == torch.float32)
            tensors[name] = stored.to(device=device, dtype=dtype if cast else None, memory_format=layout, copy=True)
    return tensors


def load_model(component, cfg, path, device, dtype, cls=None, how_to_get=HOW_TO_GET):
    """One model from its file: built on meta, each tensor read, cast and moved once, then assigned."""
    model = build_module_on_meta(cls or MODELS[component][0], cfg)
    try:
        state = read_tensors(path, device, dtype, getattr(model, "lookup_tables", ()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise DrpError(f"{path} cannot be read ({e}); convert the weights again: {how_to_get}.") from None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        described = "model.json" if cls is None else Path(path).with_suffix(".json").name
        raise DrpError(f"{path} does not fit the {component} described in {described} ({first}); "
                       f"convert the weights again: {how_to_get}.") from None
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
    # The VAE last: the scratch buffer of the file read last is held at the peak with all the weights, and
    # the VAE's (its largest tensor, 4.5 MB) is the smallest; the text encoder's is 72 MB.
    models = {name: load_model(name, configs[name], folder / MODELS[name][2], device, dtype)
              for name in ("unet", "text_encoder", "vae")}
    vocab = folder / VOCAB
    return StableDiffusion(
        tokenizer=Tokenizer(vocab if vocab.is_file() else None),
        text_encoder=models["text_encoder"],
        unet=models["unet"],
        vae=models["vae"],
        device=device,
        dtype=dtype,
        source=info["source"],
        folder=folder,
    )


GET_IP_ADAPTER = "get them with `python convert_weights.py --download ip-adapter` (or ip-adapter-plus)"


def ip_component_converted(folder, name):
    """Whether IP-Adapter's `name` ("ip_adapter" or "image_encoder") was converted into `folder`: its `<name>.json`."""
    return folder is not None and (Path(folder) / f"{name}.json").is_file()


def load_ip_component(name, folder, unet, device, dtype):
    """IP-Adapter's `ip_adapter` or `image_encoder` from `folder`, or None when it was not converted there."""
    from .ip_adapter import IPAdapter, IPAdapterConfig, attn2_layers
    from .vision import VisionConfig, VisionTransformer

    if not ip_component_converted(folder, name):
        return None
    meta = Path(folder) / f"{name}.json"
    classes = {"ip_adapter": (IPAdapter, IPAdapterConfig), "image_encoder": (VisionTransformer, VisionConfig)}
    cls, cfg_cls = classes[name]
    try:
        info = json.loads(meta.read_text())
        cfg = cfg_cls(**info["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise DrpError(f"{meta} was not written by this version of drp ({e}); convert it again: "
                       f"{GET_IP_ADAPTER}.") from None
    if name == "ip_adapter" and dict(cfg.layers) != attn2_layers(unet.cfg):
        raise DrpError(f"the IP-Adapter in {folder} was made for another UNet than the one there; "
                       f"convert it again next to these weights: {GET_IP_ADAPTER}.")
    model = load_model(name, cfg, meta.with_suffix(".safetensors"), device, dtype, cls, GET_IP_ADAPTER)
    model.source = info.get("source", {})  # which file it came from, for the report
    return model
