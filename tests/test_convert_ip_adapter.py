"""Converting IP-Adapter files and the image encoder: the layer numbering, both file forms, every refusal,
interruption, and adding components to a folder that already holds converted weights."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import drp
from drp import convert_ip_adapter as cia
from drp.convert import convert
from drp.errors import DrpError
from drp.ip_adapter import attn2_layers, file_index
from drp.unet import UNetConfig
from drp.weight_files import Source
from ip_checkpoints import FILES, adapter_file, reference_encoder, write_h94_folder
from local_server import FileHost, serving_files
from manifests import MANIFESTS, read_manifest
from tiny import tiny_weights_dir
from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
MID = "mid_block.attentions.0.transformer_blocks.0.attn2"


def manifest(name):
    return {k: s for (_, k), s in read_manifest(name).items()}


def header_map(name):
    """{i: attn2 name} from the manifest's `# map: ip_adapter.<i>. -> <name> (...)` lines."""
    lines = (MANIFESTS / name).read_text().splitlines()
    return {int(m[1]): m[2] for m in (re.match(r"# map: ip_adapter\.(\d+)\. -> (\S+) ", l) for l in lines) if m}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(a tiny converted SD folder, the h94 `models/` folder with tiny adapters and encoder)."""
    root = tmp_path_factory.mktemp("conv")
    return tiny_weights_dir(root / "sd"), write_h94_folder(root / "h94", reference_encoder(seed=5))


def folder(files, tmp_path):
    return shutil.copytree(files[0], tmp_path / "weights")


@pytest.mark.parametrize("name, count, kind", [("ip_adapter_sd15_manifest.tsv", 36, "base"),
                                               ("ip_adapter_plus_sd15_manifest.tsv", 83, "plus")])
def test_the_public_files_tables_map_every_tensor_and_number_i_to_its_layer_by_name(name, count, kind):
    shapes = manifest(name)
    cfg, moves = cia.plan_adapter(shapes, UNetConfig(), name)
    assert (cfg.kind, cfg.num_tokens, len(moves), len(shapes)) == (kind, 4 if kind == "base" else 16, count, count)
    assert sorted(m.source for m in moves.values()) == sorted(shapes)  # every tensor used, once
    assert header_map(name) == file_index(list(attn2_layers())) and len(header_map(name)) == 16
    assert moves[f"ip_adapter.{MID}.to_k_ip.weight"].source == "ip_adapter.31.to_k_ip.weight"  # mid block last
    assert moves["ip_adapter.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v_ip.weight"].source == \
        "ip_adapter.13.to_v_ip.weight"


@pytest.mark.parametrize("form", [".safetensors", ".bin"])
def test_each_file_form_converts_every_tensor_to_its_layer_by_name(files, tmp_path, form):
    out = folder(files, tmp_path)
    written = convert(files[1] / f"{FILES['plus']}{form}", out, dtype="fp32", progress=False)
    assert [p.name for p in written] == ["ip_adapter.safetensors", "ip_adapter.json"]
    source, ours = adapter_file("plus", seed=1), load_file(str(out / "ip_adapter.safetensors"))
    assert len(ours) == len(source)
    for i, name in file_index(list(attn2_layers(drp.load(out).unet.cfg))).items():
        for which in ("to_k_ip", "to_v_ip"):
            assert torch.equal(ours[f"ip_adapter.{name}.{which}.weight"], source[f"ip_adapter.{i}.{which}.weight"])
    assert all(torch.equal(ours[k], t) for k, t in source.items() if k.startswith("image_proj."))
    info = json.loads((out / "ip_adapter.json").read_text())
    assert info["source"]["file"] == f"{FILES['plus']}{form}" and info["config"]["kind"] == "plus"


def test_components_are_added_next_to_converted_weights_and_only_replaced_with_force(files, tmp_path):
    out = folder(files, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    convert(files[1] / f"{FILES['base']}.safetensors", out, progress=False)  # no --force needed
    convert(files[1] / "image_encoder", out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before  # SD files untouched
    sd = drp.load(out)
    assert sd.components == {}  # nothing read yet
    assert sd.ip_adapter.kind == "base" and sd.image_encoder.cfg.dim == 64
    with pytest.raises(DrpError, match=r"already holds a converted IP-Adapter \(ip_adapter.safetensors, "
                                       r"ip_adapter.json\); pass --force"):
        convert(files[1] / f"{FILES['plus']}.safetensors", out, progress=False)
    with pytest.raises(DrpError, match=r"already holds a converted image encoder"):
        convert(files[1] / "image_encoder", out, progress=False)
    convert(files[1] / f"{FILES['plus']}.safetensors", out, force=True, progress=False)
    assert drp.load(out).ip_adapter.kind == "plus"


def adapter_shapes(**changes):
    shapes = manifest("ip_adapter_sd15_manifest.tsv")
    return {**shapes, **changes}


FACEID = {"image_proj.proj.0.weight": (2048, 512), "image_proj.proj.2.weight": (3072, 2048),
          "image_proj.norm.weight": (768,), "ip_adapter.1.to_q_lora.down.weight": (128, 320)}
REFUSED = [  # (key/shape table, the sentence's telling part)
    ({k: (s[0], 2048) if k.endswith("_ip.weight") else s for k, s in adapter_shapes().items()},
     r"is an IP-Adapter for SDXL \(image keys 2048 wide\); drp implements SD 1.x only"),
    ({k: (s[0], 1024) if k.endswith("_ip.weight") else s for k, s in adapter_shapes().items()},
     r"is an IP-Adapter for Stable Diffusion 2.x \(image keys 1024 wide\)"),
    ({k: s for k, s in adapter_shapes().items() if k.startswith("ip_adapter.")} | FACEID,
     r"is an IP-Adapter FaceID file, which needs a face-recognition model"),
    (adapter_shapes(**{"image_proj.perceiver_resampler.proj_in.weight": (768, 512)}), r"FaceID file"),
    ({k: s for k, s in adapter_shapes().items() if k.startswith("ip_adapter.")} |
     {"image_proj.proj.0.weight": (1280, 1280), "image_proj.proj.2.weight": (768, 1280),
      "image_proj.proj.3.weight": (768,)}, r"is the full-face IP-Adapter \(257 image tokens\)"),
    (adapter_shapes(**{"image_proj.norm.weight": ()}), r"holds an image projection tensor of an unexpected shape"),
    ({k: s for k, s in adapter_shapes().items() if not k.startswith("ip_adapter.31.")},
     r"does not fit the expected model \(missing: ip_adapter.mid_block.attentions.0.transformer_blocks.0.attn2"),
]


@pytest.mark.parametrize("shapes, sentence", REFUSED)
def test_other_adapters_are_refused_with_one_sentence(shapes, sentence):
    with pytest.raises(DrpError, match=sentence) as e:
        cia.plan_adapter(shapes, UNetConfig(), "x.safetensors")
    assert str(e.value).startswith("x.safetensors ") and str(e.value).count("; ") <= 1


BIG_G = {"model_type": "clip_vision_model", "hidden_size": 1664, "projection_dim": 1280, "num_hidden_layers": 48,
         "patch_size": 14, "num_attention_heads": 16, "intermediate_size": 8192, "hidden_act": "gelu"}


@pytest.mark.parametrize("config, sentence", [
    (BIG_G, r"is not the ViT-H/14 image encoder SD 1.5's IP-Adapters use \(hidden_size 1664, projection_dim 1280"),
    ({**BIG_G, "hidden_act": "quick_gelu"}, r"is an image encoder with quick_gelu \(an OpenAI CLIP\)"),
])
def test_an_encoder_other_than_vit_h14_is_refused_and_nothing_is_written(files, tmp_path, config, sentence):
    src = shutil.copytree(files[1] / "image_encoder", tmp_path / "image_encoder")
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(DrpError, match=sentence):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert cia.encoder_config(json.loads((ROOT / "tests/data/manifests/clip_vit_h14_vision_config.json").read_text()),
                              "h94").dim == 1280  # the published config passes


def test_an_encoder_that_cannot_feed_the_folders_adapter_is_refused(files, tmp_path):
    out = folder(files, tmp_path)
    convert(files[1] / f"{FILES['base']}.safetensors", out, progress=False)
    src = shutil.copytree(files[1] / "image_encoder", tmp_path / "image_encoder")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "projection_dim": 48}))
    with pytest.raises(DrpError, match=r"gives 48-wide features but the base IP-Adapter in the folder reads 32-wide"):
        convert(src, out, progress=False)


@pytest.mark.parametrize("form, sentence", [(".safetensors", "truncated or damaged safetensors file"),
                                            (".bin", "truncated or damaged PyTorch file")])
def test_a_truncated_file_is_refused_and_nothing_is_written(files, tmp_path, form, sentence):
    out = folder(files, tmp_path)
    data = (files[1] / f"{FILES['base']}{form}").read_bytes()
    src = tmp_path / f"cut{form}"
    src.write_bytes(data[: len(data) - 1000])
    with pytest.raises(DrpError, match=sentence):
        convert(src, out, progress=False)
    assert not any(p.name.startswith(("ip_adapter", "image_encoder")) for p in out.iterdir())


def test_an_interrupted_conversion_leaves_the_old_component_and_no_partial_file(files, tmp_path, monkeypatch):
    out = folder(files, tmp_path)
    convert(files[1] / f"{FILES['base']}.safetensors", out, progress=False)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    real_open = cia.open_tensors

    def dies_after_three_tensors(path):
        source, reads = real_open(path), []

        def read(key):
            reads.append(key)
            if len(reads) > 3:
                raise KeyboardInterrupt
            return source.read(key)

        return Source(source.shapes, read)

    monkeypatch.setattr(cia, "open_tensors", dies_after_three_tensors)
    with pytest.raises(KeyboardInterrupt):
        convert(files[1] / f"{FILES['plus']}.safetensors", out, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # no .tmp, the old adapter intact


def test_cli_download_fetches_the_adapter_and_encoder_from_h94_then_converts(files, tmp_path, monkeypatch, capsys):
    import drp.download

    out, fetched = folder(files, tmp_path), []
    monkeypatch.delenv("DRP_IP_ADAPTER_URL", raising=False)

    def fake_download(url, dest, progress=True, sha256=None, **kwargs):
        fetched.append(url)
        assert (sha256 is not None) == url.endswith("image_encoder/model.safetensors")  # the one pinned hash
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(files[1] / url.removeprefix(cia.REPO + "models/"), dest)
        return Path(dest)

    monkeypatch.setattr(drp.download, "download", fake_download)
    cli = load_script("convert_weights")
    assert cli.main(["--download", "ip-adapter", "--out", str(out), "--dtype", "fp32"]) == 0
    assert fetched == [cia.REPO + f for f in ["models/ip-adapter_sd15.safetensors", "models/image_encoder/config.json",
                                              "models/image_encoder/model.safetensors"]]
    sd = drp.load(out)
    assert sd.ip_adapter.kind == "base" and sd.image_encoder is not None
    assert cli.main(["--download", "ip-adapter-plus", "--out", str(out)]) == 1
    assert "already holds a converted IP-Adapter" in capsys.readouterr().err and len(fetched) == 3  # refused first
    assert cli.main(["--download", "ip-adapter-plus", "--out", str(out), "--force"]) == 0
    assert fetched[3:] == [cia.REPO + "models/ip-adapter-plus_sd15.safetensors"]  # the encoder is not fetched again
    assert drp.load(out).ip_adapter.kind == "plus"


@pytest.fixture
def mirror(files):
    """A local host with h94's files (tiny) under /mirror/, each with its sha256 in its ETag."""
    served = {f"/mirror/models/{p.relative_to(files[1]).as_posix()}": p.read_bytes()
              for p in sorted(files[1].rglob("*")) if p.is_file()}
    with serving_files(FileHost(served)) as host:
        yield host


def test_cli_download_from_ip_adapter_url_or_the_environment_checks_the_hash_its_server_states(
        files, tmp_path, mirror, monkeypatch, capsys):
    out = folder(files, tmp_path)
    monkeypatch.delenv("DRP_IP_ADAPTER_URL", raising=False)
    cli = load_script("convert_weights")
    assert cli.main(["--download", "ip-adapter", "--ip-adapter-url", mirror.url + "/mirror/", "--out", str(out),
                     "--dtype", "fp32"]) == 0
    assert mirror.paths() == ["/mirror/models/ip-adapter_sd15.safetensors", "/mirror/models/image_encoder/config.json",
                              "/mirror/models/image_encoder/model.safetensors"]
    sd = drp.load(out)
    assert sd.ip_adapter.kind == "base" and sd.image_encoder.cfg.dim == 64
    assert (out / "h94-IP-Adapter/models/ip-adapter_sd15.safetensors").read_bytes() == \
        (files[1] / f"{FILES['base']}.safetensors").read_bytes()

    plus = "/mirror/models/ip-adapter-plus_sd15.safetensors"
    mirror.stated[plus] = "0" * 64  # the environment's host states another file's hash
    monkeypatch.setenv("DRP_IP_ADAPTER_URL", mirror.url + "/mirror")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert cli.main(["--download", "ip-adapter-plus", "--out", str(out), "--force"]) == 1
    err = capsys.readouterr().err
    err = err[err.index("error: "):]  # after the progress bars
    assert err.startswith(f"error: the file downloaded from {mirror.url}{plus} is corrupted (sha256 ")
    assert err.endswith(f" instead of {'0' * 64}), so {out / 'h94-IP-Adapter'}/models/ip-adapter-plus_sd15"
                        ".safetensors.part was deleted; run the command again to download it afresh.\n")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the base adapter stays
    assert mirror.paths()[-1] == plus  # the encoder, converted already, was not fetched again


def test_ip_adapter_url_option_else_environment_else_h94_and_only_h94_files_carry_pins(tmp_path, monkeypatch):
    monkeypatch.delenv("DRP_IP_ADAPTER_URL", raising=False)
    assert cia.ip_adapter_url() == cia.REPO
    monkeypatch.setenv("DRP_IP_ADAPTER_URL", "http://mirror/env")
    assert cia.ip_adapter_url() == "http://mirror/env/"  # the slash of a base address added
    assert cia.ip_adapter_url("http://mirror/flag/") == "http://mirror/flag/"
    from_mirror = cia.planned_downloads("ip-adapter", tmp_path)
    assert [p.url for p in from_mirror] == ["http://mirror/env/models/ip-adapter_sd15.safetensors",
                                            "http://mirror/env/models/image_encoder/config.json",
                                            "http://mirror/env/models/image_encoder/model.safetensors"]
    assert {(p.sha256, p.size) for p in from_mirror} == {(None, None)}  # checked against what the server states
    monkeypatch.delenv("DRP_IP_ADAPTER_URL")
    from_h94 = cia.planned_downloads("ip-adapter", tmp_path)
    assert [p.dest for p in from_h94] == [tmp_path / "h94-IP-Adapter" / f for f in (
        "models/ip-adapter_sd15.safetensors", "models/image_encoder/config.json",
        "models/image_encoder/model.safetensors")]
    assert [p.sha256 for p in from_h94] == [None, None,
                                            "6ca9667da1ca9e0b0f75e46bb030f7e011f44f86cbfb8d5a36590fcd7507b030"]
    assert sum(p.size for p in from_h94) == 2_573_016_776  # 2.6 GB: the README's figure


@pytest.mark.parametrize("name, path", [
    ("ip_adapter_sd15_manifest.tsv", "models/ip-adapter_sd15.safetensors"),
    ("ip_adapter_plus_sd15_manifest.tsv", "models/ip-adapter-plus_sd15.safetensors")])
def test_the_pinned_adapter_sizes_are_those_of_their_manifests_tensors_in_fp16_safetensors(tmp_path, name, path):
    tensors = {k: torch.zeros(s, dtype=torch.float16) for k, s in manifest(name).items()}
    save_file(tensors, str(tmp_path / "a.safetensors"))  # as published: no metadata
    assert (tmp_path / "a.safetensors").stat().st_size == cia.PINNED[path][1]


@pytest.mark.parametrize("argv, message", [
    (["--download", "--ip-adapter-url", "http://mirror/h94/"], "--ip-adapter-url only makes sense with --download ip"),
    (["x.safetensors", "--ip-adapter-url", "http://mirror/h94/"], "--ip-adapter-url only makes sense with --download"),
    (["--download", "ip-adapter", "--url", "http://mirror/sd.safetensors"], "give IP-Adapter's address with --ip"),
])
def test_cli_addresses_for_the_other_download_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        load_script("convert_weights").main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
