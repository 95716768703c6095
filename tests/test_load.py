"""drp.load: a converted folder gives back exactly the models that were converted, built on the meta
device (never randomly initialised), in the asked dtype whatever the files' dtype, and an absent or
incomplete folder says in one sentence how to get weights."""

import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoints as ck
from drp.convert import convert
from drp.errors import DrpError
from drp.model_io import build_on_meta, load, read_tensors
from drp.unet import UNetConfig

COMPONENTS = ("unet", "vae", "text_encoder")
# relative to the largest output, as the parity tests' bound: the other memory layout runs other convolution
# kernels, which sum in another order (3.2e-6 measured on an AMD EPYC with AVX-512, 1 and 2 threads)
LAYOUT_TOL = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(folder with fp32/ and fp16/ conversions of one tiny checkpoint, the models it came from)."""
    tmp = tmp_path_factory.mktemp("load")
    models = ck.tiny_models(seed=0)
    src = ck.save_checkpoint(tmp / "tiny.safetensors",
                             ck.to_single_file({c: ck.file_state_dict(c, m) for c, m in models.items()}))
    for dtype in ("fp32", "fp16"):
        convert(src, tmp / dtype, dtype=dtype, progress=False)
    return tmp, models


def outputs(text_encoder, unet, vae):
    """Each model's output on fixed inputs."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 49408, (1, 77), generator=g)
    x, ctx = torch.randn(1, 4, 8, 16, generator=g), torch.randn(1, 77, 128, generator=g)
    image = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        return [text_encoder(tokens), unet(x, 421, ctx), vae.encode(image), vae.decode(x)]


def test_round_trip_gives_models_with_outputs_equal_to_the_converted_ones(converted):
    tmp, models = converted
    sd = load(tmp / "fp32")
    for name in COMPONENTS:
        ours = dict(getattr(sd, name).named_parameters())
        assert all(torch.equal(ours[k], p) for k, p in models[name].named_parameters())
    # drp.load stores convolution weights channels_last; the converted models in that layout compute
    # the same numbers in the same order
    laid_out = {c: copy.deepcopy(m).to(memory_format=torch.channels_last) for c, m in models.items()}
    got = outputs(sd.text_encoder, sd.unet, sd.vae)
    assert all(torch.equal(a, b) for a, b in zip(got, outputs(**laid_out)))
    # and in the usual layout to float precision
    for a, b in zip(got, outputs(**models)):
        assert (a - b).abs().max() <= LAYOUT_TOL * b.abs().max()


def test_convolution_weights_are_channels_last_and_outputs_come_back_contiguous(converted):
    tmp, _ = converted
    sd = load(tmp / "fp32")
    for model in (sd.unet, sd.vae):
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        assert not any(w.is_contiguous() for w in convs if w.shape[2:] == (3, 3))
    assert all(out.is_contiguous() for out in outputs(sd.text_encoder, sd.unet, sd.vae))


def test_off_the_cpu_convolution_weights_keep_the_usual_layout(converted):
    tmp, _ = converted  # the meta device stands in for a GPU: only the layout rule is read here
    tensors = read_tensors(tmp / "fp32" / "unet.safetensors", torch.device("meta"), torch.float16)
    convs = [t for t in tensors.values() if t.dim() == 4 and t.shape[2:] == (3, 3)]
    assert convs and all(t.is_contiguous() and t.dtype == torch.float16 for t in convs)


TOKEN_TABLE = "text_model.embeddings.token_embedding.weight"


def test_fp16_files_are_computed_in_fp32_by_default(converted):
    tmp, models = converted
    sd = load(tmp / "fp16")
    assert sd.dtype == torch.float32
    for name in COMPONENTS:
        ours = dict(getattr(sd, name).named_parameters())
        for key, p in models[name].named_parameters():
            # the token table stays as stored: the text encoder casts the 77 rows it looks up
            assert ours[key].dtype == (torch.float16 if key == TOKEN_TABLE else torch.float32), key
            assert torch.equal(ours[key].float(), p.detach().half().float()), key


def test_the_token_table_kept_in_fp16_gives_the_numbers_of_an_fp32_table(converted):
    tmp, _ = converted
    sd = load(tmp / "fp16")
    upcast = copy.deepcopy(sd.text_encoder).float()
    assert upcast.get_parameter(TOKEN_TABLE).dtype == torch.float32
    tokens = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = sd.text_encoder(tokens), upcast(tokens)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # half compute, and fp32 files, cast it like every other tensor
    assert load(tmp / "fp16", dtype="bf16").text_encoder.get_parameter(TOKEN_TABLE).dtype == torch.bfloat16
    assert load(tmp / "fp32").text_encoder.get_parameter(TOKEN_TABLE).dtype == torch.float32


def test_fp32_files_are_computed_in_bf16_when_asked(converted):
    tmp, models = converted
    sd = load(tmp / "fp32", dtype="bf16")
    assert sd.dtype == torch.bfloat16
    got = dict(sd.unet.named_parameters())
    assert all(torch.equal(got[k], p.detach().bfloat16()) for k, p in models["unet"].named_parameters())
    x, ctx = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.randn(1, 77, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert sd.unet(x, 421, ctx).dtype == torch.bfloat16


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), None])
def test_loaded_models_are_frozen_in_eval_mode_on_the_asked_device(converted, device):
    tmp, _ = converted
    sd = load(tmp / "fp32", device=device)
    assert sd.device == torch.device("cpu")
    assert sd.source == json.loads((tmp / "fp32" / "model.json").read_text())["source"]
    for model in (sd.text_encoder, sd.unet, sd.vae):
        assert not model.training
        assert all(not p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    assert sd.tokenizer(["a cat"]).shape == (1, 77)


def test_models_are_built_on_meta_and_never_randomly_initialised(converted, monkeypatch):
    tmp, _ = converted
    assert all(t.is_meta for t in build_on_meta("unet", UNetConfig.tiny()).state_dict().values())
    devices = []
    for name in ("kaiming_uniform_", "uniform_", "normal_", "ones_", "zeros_", "trunc_normal_", "xavier_uniform_"):
        real = getattr(torch.nn.init, name)

        def record(tensor, *args, _real=real, **kwargs):
            devices.append(tensor.device.type)
            return _real(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, record)
    load(tmp / "fp32")
    assert devices == []  # not even on meta, where nn.Embedding's normal_ costs 2.5 s the first time


def test_each_file_is_read_once_and_held_once(converted, monkeypatch):
    tmp, _ = converted
    sd = load(tmp / "fp32")
    for name, file in (("unet", "unet.safetensors"), ("vae", "vae.safetensors")):
        with safe_open(str(tmp / "fp32" / file), "pt") as f:
            keys = set(f.keys())
        params = dict(getattr(sd, name).named_parameters())
        assert set(params) == keys
        assert len({p.data_ptr() for p in params.values()}) == len(keys)  # no shared or duplicated storage


@pytest.mark.parametrize("damage", ["no folder", "empty folder", "no model.json", "no vae file"])
def test_missing_or_incomplete_weights_say_how_to_get_them(converted, tmp_path, damage):
    tmp, _ = converted
    folder = tmp_path / "weights"
    if damage != "no folder":
        folder.mkdir()
    if damage in ("no model.json", "no vae file"):
        for p in (tmp / "fp32").iterdir():
            shutil.copy(p, folder)
        (folder / ("model.json" if damage == "no model.json" else "vae.safetensors")).unlink()
    with pytest.raises(DrpError) as error:
        load(folder)
    message = str(error.value)
    assert "python convert_weights.py --download" in message and "python convert_weights.py PATH/TO/" in message
    assert "\n" not in message


def test_a_file_that_does_not_fit_model_json_is_refused(converted, tmp_path):
    tmp, _ = converted
    shutil.copytree(tmp / "fp32", tmp_path / "w")
    with safe_open(str(tmp_path / "w" / "vae.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "decoder.conv_out.bias"}
    save_file(tensors, str(tmp_path / "w" / "vae.safetensors"))
    with pytest.raises(DrpError, match="does not fit the vae described in model.json"):
        load(tmp_path / "w")


@pytest.mark.parametrize("damage", ["cut short", "not safetensors", "sizes that disagree"])
def test_a_damaged_weights_file_is_refused_in_one_sentence(converted, tmp_path, damage):
    tmp, _ = converted
    shutil.copytree(tmp / "fp32", tmp_path / "w")
    path = tmp_path / "w" / "unet.safetensors"
    data = path.read_bytes()
    if damage == "cut short":
        data = data[: len(data) - 100]
    elif damage == "not safetensors":
        data = b"PK\x03\x04" + data[4:]  # e.g. a zip (.ckpt) renamed
    else:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        key = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 4)
        header[key]["shape"][0] += 1
        text = json.dumps(header).encode().ljust(n)
        data = len(text).to_bytes(8, "little") + text + data[8 + n :]
    path.write_bytes(data)
    with pytest.raises(DrpError, match=r"unet.safetensors cannot be read \(.*\); convert the weights again") as e:
        load(tmp_path / "w")
    assert "\n" not in str(e.value)


def test_a_model_json_of_another_format_is_refused(converted, tmp_path):
    tmp, _ = converted
    shutil.copytree(tmp / "fp32", tmp_path / "w")
    info = json.loads((tmp_path / "w" / "model.json").read_text())
    info["format"] = 2
    (tmp_path / "w" / "model.json").write_text(json.dumps(info))
    with pytest.raises(DrpError, match="convert the weights again"):
        load(tmp_path / "w")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_weights_load_onto_the_gpu_in_fp16_and_agree_with_the_cpu(converted):
    tmp, models = converted
    sd = load(tmp / "fp32", device="cuda", dtype="fp16")
    assert all(p.device.type == "cuda" and p.dtype == torch.float16 for p in sd.unet.parameters())
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 128)
    with torch.no_grad():
        got = sd.unet(x.cuda().half(), 421, ctx.cuda().half()).float().cpu()
        want = models["unet"](x, 421, ctx)
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()  # fp16 rounding of weights and activations
