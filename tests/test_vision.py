"""The vision transformer equals transformers' CLIP and DINO image models on the same random weights, at
the real sizes, and loads their files by name (DINO's through its two key maps)."""

import gc
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drp.errors import DrpError
from drp.vision import (VisionConfig, VisionTransformer, clip_from_transformers, dino_from_original,
                        dino_from_transformers, load_state)
from manifests import MANIFESTS, read_manifest

TOL = 1e-4  # largest error relative to the reference's largest magnitude, fp32 on the CPU


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def h14_config():
    """h94/IP-Adapter's `models/image_encoder/config.json`, as published (it says float16; the file is
    float32, and so is the reference here)."""
    config = json.loads((MANIFESTS / "clip_vit_h14_vision_config.json").read_text())
    return {k: v for k, v in config.items() if k != "torch_dtype"}


def fill_random_(model, seed):
    """Seeded random weights in place, fast enough for 632M values: each tensor is a window of one pool of
    16M normal samples at its own seeded offset (so no two tensors hold the same values in the same places;
    fresh samples for larger tensors), scaled as checkpoints.random_like scales: N(0, 1/fan_in) matrices,
    LayerNorm scales near 1, small biases and embeddings."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 24, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() <= pool.numel():
                start = int(torch.randint(0, pool.numel() - p.numel() + 1, (1,), generator=g))
                window = pool[start:start + p.numel()].view_as(p)
            else:  # larger than the pool (a token table): fresh samples
                window = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                torch.mul(window, p[0].numel() ** -0.5, out=p)
            elif name.endswith("weight"):
                torch.add(window, 1 / 0.1, out=p).mul_(0.1)  # 1 + 0.1·N(0, 1)
            else:
                torch.mul(window, 0.1, out=p)
    return model


def random_reference(model_class, config, seed, **kwargs):
    """A transformers model with seeded random weights, built on the meta device (no slow default init)."""
    with torch.device("meta"):
        ref = model_class(config, **kwargs)
    ref.to_empty(device="cpu")
    with torch.no_grad():
        for name, buf in ref.named_buffers():  # to_empty leaves buffers unset; the only ones are positions
            assert name.endswith("position_ids"), name
            buf.copy_(torch.arange(buf.shape[-1])[None])
    return fill_random_(ref, seed).eval()


def ours_with(cfg, state):
    """Our model built on the meta device (no init) holding `state`'s tensors, in eval mode."""
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    return load_state(model, state).eval()


def load_encoder_folder(folder):
    """An image-encoder folder in the published layout (config.json + model.safetensors) -> our model, the
    way a user gets it: through drp's converter (convert_weights.py) into a weights folder, then read back
    as drp.load does (`sd.image_encoder`). The source file is deleted once converted: one 2.5 GB file at a
    time in the scratch folder."""
    from drp.convert import convert
    from drp.model_io import load_ip_component

    out = folder / "converted"
    convert(folder, out, dtype="fp32", progress=False)
    (folder / "model.safetensors").unlink()
    try:
        return load_ip_component("image_encoder", out, None, torch.device("cpu"), torch.float32)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def pixels(batch, seed, size=224):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def scratch(tmp_path):
    """A folder for a 2.5 GB file: in memory (/dev/shm) where there is room, where writing is 2x faster
    than to disk; removed afterwards either way."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 6e9:
        folder = Path(tempfile.mkdtemp(dir=shm, prefix="drp-test-"))
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path


def test_ip_adapter_image_encoder_equals_transformers_at_full_vit_h14_size_through_a_published_folder(scratch):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    x = pixels(1, seed=1)
    ref = random_reference(CLIPVisionModelWithProjection, CLIPVisionConfig(**h14_config()), seed=0)
    ref.save_pretrained(scratch)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
    want_embeds, want_penultimate, n_states = out.image_embeds, out.hidden_states[-2], len(out.hidden_states)
    del ref, out  # one full-size model in memory at a time
    gc.collect()

    ours = load_encoder_folder(scratch)
    assert ours.cfg == VisionConfig.vit_h14()
    with torch.no_grad():
        got = ours(x)
    assert n_states == 33  # the embeddings, then each of the 32 layers: [-2] is layer 31's output
    assert got.image_embeds.shape == (1, 1024) and got.penultimate.shape == (1, 257, 1280)
    assert relative_error(got.image_embeds, want_embeds) < TOL
    assert relative_error(got.penultimate, want_penultimate) < TOL


def test_clip_b32_image_features_equal_transformers_clip_model_at_full_size():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig()  # transformers' defaults are openai/clip-vit-base-patch32's
    ref = random_reference(CLIPModel, config, seed=2)
    cfg = VisionConfig.from_transformers(config.to_dict())
    assert cfg == VisionConfig.vit_b32()
    whole = ref.state_dict()  # the names of a CLIPModel file: both towers, text_projection, logit_scale
    ours = ours_with(cfg, clip_from_transformers({**whole, "vision_model.embeddings.position_ids": torch.arange(50)}))
    x = pixels(2, seed=3)
    with torch.no_grad():
        got = ours(x)
        want = ref.get_image_features(pixel_values=x, output_hidden_states=True)
    assert got.image_embeds.shape == (2, 512)
    assert relative_error(got.image_embeds, want.pooler_output) < TOL
    assert relative_error(got.last_hidden_state, want.last_hidden_state) < TOL
    assert relative_error(got.penultimate, want.hidden_states[-2]) < TOL


def test_clip_l14_image_tower_equals_transformers_at_real_widths_and_reduced_depth():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    l14 = VisionConfig.vit_l14()
    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, patch_size=14,
                              projection_dim=768, hidden_act="quick_gelu", num_hidden_layers=4)
    ref = random_reference(CLIPVisionModelWithProjection, config, seed=4)
    cfg = VisionConfig.from_transformers(config.to_dict())
    assert cfg == VisionConfig(**{**l14.__dict__, "layers": 4})
    ours = ours_with(cfg, ref.state_dict())
    x = pixels(1, seed=5)
    with torch.no_grad():
        got = ours(x)
        want = ref(pixel_values=x, output_hidden_states=True)
    assert relative_error(got.image_embeds, want.image_embeds) < TOL
    assert relative_error(got.penultimate, want.hidden_states[-2]) < TOL


DINO_VIT_CONFIG = dict(model_type="vit", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                       intermediate_size=1536, patch_size=16, image_size=224, layer_norm_eps=1e-6,
                       hidden_act="gelu", qkv_bias=True)


def dino_original_layout(vit_file):
    """A transformers ViTModel file -> the names of facebookresearch/dino's `VisionTransformer`, with
    query/key/value fused into one `qkv` tensor (rows q, k, v), as `dino_deitsmall16_pretrain.pth` has."""
    f = vit_file
    sd = {"cls_token": f["embeddings.cls_token"], "pos_embed": f["embeddings.position_embeddings"],
          "norm.weight": f["layernorm.weight"], "norm.bias": f["layernorm.bias"]}
    n = 1 + max(int(k.split(".")[2]) for k in f if k.startswith("encoder.layer."))
    for p in ("weight", "bias"):
        sd[f"patch_embed.proj.{p}"] = f[f"embeddings.patch_embeddings.projection.{p}"]
        for i in range(n):
            src = f"encoder.layer.{i}."
            sd[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([f[f"{src}attention.attention.{x}.{p}"]
                                                        for x in ("query", "key", "value")])
            for ours, theirs in {"norm1": "layernorm_before", "attn.proj": "attention.output.dense",
                                 "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense",
                                 "mlp.fc2": "output.dense"}.items():
                sd[f"blocks.{i}.{ours}.{p}"] = f[f"{src}{theirs}.{p}"]
    return sd


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    """transformers' ViTModel with DINO ViT-S/16's config and random weights, its file, and its output."""
    from transformers import ViTConfig, ViTModel

    ref = random_reference(ViTModel, ViTConfig(**DINO_VIT_CONFIG), seed=6, add_pooling_layer=False)
    folder = tmp_path_factory.mktemp("dino-vits16")
    ref.save_pretrained(folder)
    x = pixels(2, seed=7)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
    return load_file(str(folder / "model.safetensors")), x, want


@pytest.mark.parametrize("layout", ["transformers", "original"])
def test_dino_vit_s16_final_norm_cls_equals_transformers_vit_model_through_either_file_layout(dino, layout):
    vit_file, x, want = dino
    state = dino_from_transformers(vit_file) if layout == "transformers" else \
        dino_from_original(dino_original_layout(vit_file))
    assert VisionConfig.from_transformers(DINO_VIT_CONFIG) == VisionConfig.dino_s16()
    ours = ours_with(VisionConfig.dino_s16(), state)
    with torch.no_grad():
        got = ours(x)
    assert got.image_embeds is None and got.pooled.shape == (2, 384)
    assert relative_error(got.pooled, want[:, 0]) < TOL
    assert relative_error(got.last_hidden_state, want) < TOL


def test_vit_h14_has_every_key_and_shape_of_the_published_image_encoder_file():
    with torch.device("meta"):
        ours = VisionTransformer(VisionConfig.from_transformers(h14_config()))
    published = {k: s for (_, k), s in read_manifest("clip_vit_h14_vision_manifest.tsv").items()}
    assert len(published) == 521
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == {k: s for k, s in published.items() if k != "vision_model.embeddings.position_ids"}
    assert sum(v.numel() for v in ours.parameters()) == 632_076_800  # OpenCLIP ViT-H-14's visual tower


def test_presets_have_the_published_numbers():
    h, l, b, d = VisionConfig.vit_h14(), VisionConfig.vit_l14(), VisionConfig.vit_b32(), VisionConfig.dino_s16()
    assert (h.dim, h.layers, h.heads, h.mlp_dim, h.patch_size, h.act, h.projection_dim, h.tokens) == \
        (1280, 32, 16, 5120, 14, "gelu", 1024, 257)
    assert (l.dim, l.layers, l.heads, l.mlp_dim, l.patch_size, l.act, l.projection_dim) == \
        (1024, 24, 16, 4096, 14, "quick_gelu", 768)
    assert (b.dim, b.layers, b.patch_size, b.act, b.projection_dim, b.tokens) == (768, 12, 32, "quick_gelu", 512, 50)
    assert (d.dim, d.layers, d.heads, d.mlp_dim, d.eps, d.patch_bias, d.pre_norm, d.norm_all_tokens,
            d.projection_dim, d.tokens) == (384, 12, 6, 1536, 1e-6, True, False, True, 0, 197)


@pytest.mark.parametrize("changes", [{}, {"hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": 64}])
def test_tiny_clip_encoder_equals_transformers_for_either_gelu(changes):
    """The tiny config against the reference, also with exact GELU and another eps and image size."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                              patch_size=32, projection_dim=32, **changes)
    ref = random_reference(CLIPVisionModelWithProjection, config, seed=8)
    cfg = VisionConfig.from_transformers(config.to_dict())
    ours = ours_with(cfg, ref.state_dict())
    x = pixels(3, seed=9, size=cfg.image_size)
    with torch.no_grad():
        got, want = ours(x), ref(pixel_values=x, output_hidden_states=True)
    for a, b in [(got.image_embeds, want.image_embeds), (got.last_hidden_state, want.last_hidden_state),
                 (got.penultimate, want.hidden_states[-2])]:
        assert relative_error(a, b) < TOL


def test_config_reading_follows_transformers_defaults_and_the_file_kind():
    from transformers import CLIPConfig, CLIPVisionConfig

    sparse = {"model_type": "clip_vision_model"}  # older files leave out what equals the defaults
    assert VisionConfig.from_transformers(sparse) == VisionConfig.from_transformers(CLIPVisionConfig().to_dict())
    assert VisionConfig.from_transformers({**sparse, "architectures": ["CLIPVisionModel"]}).projection_dim == 0
    whole = CLIPConfig(projection_dim=256, vision_config=dict(hidden_size=64, intermediate_size=128,
                                                              num_attention_heads=4, num_hidden_layers=2))
    assert VisionConfig.from_transformers(whole.to_dict()) == VisionConfig.tiny(projection_dim=256, act="quick_gelu")
    assert VisionConfig.from_transformers({"model_type": "vit", "layer_norm_eps": 1e-12}).eps == 1e-12


@pytest.mark.parametrize("config, words", [
    ({"model_type": "siglip_vision_model"}, "not a vision transformer"),
    ({"model_type": "clip_text_model"}, "not a vision transformer"),
    ({"model_type": "clip_vision_model", "hidden_act": "gelu_new"}, "activation 'gelu_new'"),
    ({"model_type": "clip_vision_model", "num_channels": 1}, "1 input channels"),
    ({"model_type": "clip_vision_model", "image_size": 225, "patch_size": 14}, "not a multiple"),
    ({"model_type": "clip_vision_model", "hidden_size": 100, "num_attention_heads": 3}, "not divisible"),
    ({"model_type": "clip_vision_model", "image_size": [224, 448]}, "square"),
    ({"model_type": "vit", "qkv_bias": False}, "qkv_bias"),
])
def test_configs_it_cannot_build_are_refused_with_one_sentence(config, words):
    with pytest.raises(DrpError, match=words) as e:
        VisionConfig.from_transformers(config)
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def tiny_state(cfg=VisionConfig.tiny(), seed=10):
    return {k: v.clone() for k, v in fill_random_(VisionTransformer(cfg), seed).state_dict().items()}


def test_loading_skips_position_ids_and_names_the_first_missing_unexpected_or_misshapen_tensor():
    cfg = VisionConfig.tiny()
    state = tiny_state(cfg)
    load_state(VisionTransformer(cfg), {**state, "vision_model.embeddings.position_ids": torch.arange(50)[None]})
    missing = {k: v for k, v in state.items() if k != "visual_projection.weight"}
    with pytest.raises(DrpError, match="lack visual_projection.weight"):
        load_state(VisionTransformer(cfg), missing)
    with pytest.raises(DrpError, match="hold vision_model.encoder.layers.2.mlp.fc1.bias"):
        load_state(VisionTransformer(cfg), {**state, "vision_model.encoder.layers.2.mlp.fc1.bias": torch.zeros(1)})
    with pytest.raises(DrpError, match=r"patch_embedding.weight has shape \(64, 3, 14, 14\)"):
        load_state(VisionTransformer(cfg), {**state, "vision_model.embeddings.patch_embedding.weight":
                                            torch.zeros(64, 3, 14, 14)})


def test_a_clip_file_with_a_tensor_of_neither_tower_is_refused_by_name():
    state = {"vision_model.post_layernorm.weight": torch.ones(4), "text_model.final_layer_norm.weight": torch.ones(4)}
    assert clip_from_transformers(state).keys() == {"vision_model.post_layernorm.weight"}
    with pytest.raises(DrpError, match="hold classifier.weight"):
        clip_from_transformers({**state, "classifier.weight": torch.zeros(2, 4)})


def test_pixels_of_the_wrong_shape_are_refused():
    model = VisionTransformer(VisionConfig.tiny())
    with pytest.raises(DrpError, match=r"\(batch, 3, 224, 224\), got \(1, 3, 256, 256\)"):
        model(torch.zeros(1, 3, 256, 256))


def test_dino_key_maps_ignore_the_pooler_accept_a_vit_prefix_and_name_the_first_bad_key(dino):
    vit_file, _, _ = dino
    mapped = dino_from_transformers(vit_file)
    pooled = {**vit_file, "pooler.dense.weight": torch.zeros(384, 384), "pooler.dense.bias": torch.zeros(384)}
    prefixed = {"vit." + k: v for k, v in pooled.items()}
    for variant in (pooled, prefixed):
        got = dino_from_transformers(variant)
        assert got.keys() == mapped.keys() and all(torch.equal(got[k], mapped[k]) for k in got)
    with pytest.raises(DrpError, match="lack encoder.layer.3.output.dense.bias"):
        dino_from_transformers({k: v for k, v in vit_file.items() if k != "encoder.layer.3.output.dense.bias"})
    with pytest.raises(DrpError, match="hold classifier.weight"):
        dino_from_transformers({**vit_file, "classifier.weight": torch.zeros(1000, 384)})
    original = dino_original_layout(vit_file)
    with pytest.raises(DrpError, match="lack blocks.11.attn.qkv.weight"):
        dino_from_original({k: v for k, v in original.items() if k != "blocks.11.attn.qkv.weight"})
    with pytest.raises(DrpError, match="hold head.weight"):
        dino_from_original({**original, "head.weight": torch.zeros(10, 384)})
    with pytest.raises(DrpError, match="no blocks.N"):
        dino_from_original(vit_file)  # the other layout
    for i, x in enumerate("qkv"):  # the fused rows are cut in the order q, k, v
        fused = original["blocks.5.attn.qkv.weight"]
        assert torch.equal(dino_from_original(original)[f"vision_model.encoder.layers.5.self_attn.{x}_proj.weight"],
                           fused[384 * i:384 * (i + 1)])
