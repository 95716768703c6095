"""The metrics' backbones, loaded from files the way users have them, equal transformers on random weights.

CLIP ViT-B/32 whole (text and image towers) and L/14's text tower at full size; DINO ViT-S/16 through
both of its file layouts. Everything goes through drp.evaluate.metrics' loaders, so what is proven is
what `score` computes: unit embeddings whose dot products are the metrics.
"""

import gc
import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from drp.clip import CLIPConfig, CLIPTextModelWithProjection
from drp.errors import DrpError
from drp.evaluate.metrics import load_clip, load_dino
from drp.tokenizer import Tokenizer
from drp.vision import clip_pixels, dino_pixels

TOL = 1e-4  # largest error relative to the reference's largest magnitude, fp32 on the CPU
PROMPTS = ["a cat in the jungle", "a stuffed animal " + "with a tree " * 30]  # the second fills all 77 tokens
SHORT = 16  # token positions kept where the prompts are short: the pooling reads the first end-of-text only
# openai/clip-vit-base-patch32 and clip-vit-large-patch14 (their config.json; eos_token_id 2 is what the
# published files say, which makes transformers pool at the largest id: the first end-of-text here too)
B32 = dict(text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
                            eos_token_id=2),
           vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                              patch_size=32, image_size=224),
           projection_dim=512)
L14_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                projection_dim=768)
# DINO ViT-S/16 at its real width, patch and image size, 2 of its 12 layers (tests/test_vision.py runs all 12;
# what is tested here is reading the files: the shapes from the tensors, the eps from the config)
DINO_S16 = dict(hidden_size=384, num_hidden_layers=2, num_attention_heads=6, intermediate_size=1536, patch_size=16,
                image_size=224, hidden_act="gelu", qkv_bias=True)


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def random_reference(model_class, config, seed, **kwargs):
    """A transformers model with seeded random weights, built on the meta device (no slow default init):
    N(0, 1/fan_in) matrices, norms near 1, small biases and embeddings."""
    with torch.device("meta"):
        model = model_class(config, **kwargs)
    model.to_empty(device="cpu")
    for name, buf in model.named_buffers():  # to_empty leaves buffers unset; the only ones are positions
        assert name.endswith("position_ids"), name
        buf.copy_(torch.arange(buf.shape[-1])[None])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            else:
                p.normal_(1 if name.endswith("weight") else 0, 0.1, generator=g)
    return model.eval()


def pictures(n=2):
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (300 + 37 * i, 260, 3), dtype=np.uint8)) for i in range(n)]


def features(out):
    """transformers 5 returns model outputs from get_*_features; 4.x returned the tensor."""
    return getattr(out, "pooler_output", out)


def test_clip_b32_folder_gives_the_text_and_image_embeddings_of_transformers(tmp_path):
    from transformers import CLIPConfig as ReferenceConfig, CLIPModel

    ref = random_reference(CLIPModel, ReferenceConfig(**B32), seed=0)
    ref.save_pretrained(tmp_path)  # config.json + model.safetensors, as published
    ours = load_clip(tmp_path)
    tokens = Tokenizer()(["a cat in the jungle", "a red backpack"])[:, :SHORT]
    pixels = clip_pixels(pictures())
    with torch.no_grad():
        want_text = F.normalize(features(ref.get_text_features(input_ids=tokens)), dim=-1)
        want_image = F.normalize(features(ref.get_image_features(pixel_values=pixels)), dim=-1)
        del ref
        gc.collect()
        got_text = F.normalize(ours.text_model.embed(tokens), dim=-1)
    got_image = ours.images(pictures())
    assert got_text.shape == (2, 512) and got_image.shape == (2, 512)
    assert relative_error(got_text, want_text) < TOL
    assert relative_error(got_image, want_image) < TOL
    weights = ours.weights  # what score records: the kind from the shapes, the file, its sha256
    assert (weights["model"], weights["kind"]) == ("CLIP", "ViT-B/32")
    assert weights["file"] == f"{tmp_path.name}/model.safetensors"
    assert weights["sha256"] == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()


def test_clip_l14_text_tower_pools_at_the_first_end_of_text_and_projects_like_transformers():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection as Reference

    config = CLIPTextConfig(**L14_TEXT)
    ref = random_reference(Reference, config, seed=1)
    state = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
             for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    with torch.device("meta"):  # no initialisation: every tensor comes from the reference
        ours = CLIPTextModelWithProjection(CLIPConfig.from_transformers(config.to_dict()), 768)
    ours.load_state_dict(state, strict=True, assign=True)
    assert ours.cfg == CLIPConfig()  # L/14's text tower is SD 1.x's text encoder
    short, long = Tokenizer()(PROMPTS[0])[:, :SHORT], Tokenizer()(PROMPTS[1])  # the long one: EOS at 76
    assert long[0, -1] == 49407 and (long[0] == 49407).sum() == 1
    with torch.no_grad():
        for tokens in (short, long):
            assert relative_error(ours.embed(tokens), ref(input_ids=tokens).text_embeds) < TOL


def original_dino_keys(state):
    """A transformers ViTModel state dict -> the names of facebookresearch/dino's checkpoint (fused qkv)."""
    out = {"cls_token": state["embeddings.cls_token"], "pos_embed": state["embeddings.position_embeddings"],
           "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
    for p in ("weight", "bias"):
        out[f"patch_embed.proj.{p}"] = state[f"embeddings.patch_embeddings.projection.{p}"]
    for i in range(DINO_S16["num_hidden_layers"]):
        src = f"encoder.layer.{i}."
        pairs = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
                 "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
        for p in ("weight", "bias"):
            for dst, s in pairs.items():
                out[f"blocks.{i}.{dst}.{p}"] = state[f"{src}{s}.{p}"]
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([state[f"{src}attention.attention.{x}.{p}"]
                                                        for x in ("query", "key", "value")])
    return out


@pytest.mark.parametrize("layout", ["original .pth", "transformers folder"])
def test_dino_s16_from_either_file_gives_the_cls_token_of_transformers_vit(tmp_path, layout):
    from transformers import ViTConfig, ViTModel

    eps = 1e-6 if layout == "original .pth" else 1e-12  # DINO's code; facebook/dino-vits16's config.json
    ref = random_reference(ViTModel, ViTConfig(**DINO_S16, layer_norm_eps=eps), seed=2, add_pooling_layer=False)
    ref.save_pretrained(tmp_path)  # the published layout: encoder.layer.N.attention.attention.query, ...
    path = tmp_path
    if layout == "original .pth":
        path = tmp_path / "dino_deitsmall16_pretrain.pth"
        torch.save(original_dino_keys(load_file(str(tmp_path / "model.safetensors"))), path)
    ours = load_dino(path)
    assert (ours.model.cfg.eps, ours.model.cfg.heads, ours.model.cfg.layers) == (eps, 6, 2)
    assert (ours.weights["kind"], ours.weights["eps"]) == ("ViT-S/16", eps)
    assert ours.weights["sha256"] == hashlib.sha256((path if path.is_file() else path / "model.safetensors")
                                                    .read_bytes()).hexdigest()
    with torch.no_grad():
        want = F.normalize(ref(pixel_values=dino_pixels(pictures())).last_hidden_state[:, 0], dim=-1)
    assert relative_error(ours.images(pictures()), want) < TOL


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    """A tiny CLIPModel folder, a tiny ViT (DINO) folder and a DINO-layout .pth."""
    from transformers import CLIPConfig as ReferenceConfig, CLIPModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("weights")
    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=1)
    CLIPModel(ReferenceConfig(text_config=small, vision_config=dict(small, patch_size=32), projection_dim=32)
              ).save_pretrained(root / "clip")
    vit = ViTModel(ViTConfig(**dict(small, patch_size=32)), add_pooling_layer=False)
    vit.save_pretrained(root / "vit")
    torch.save({"cls_token": torch.zeros(1, 1, 64)}, root / "dino.pth")
    return root


def test_weights_of_the_wrong_kind_are_refused_in_one_sentence(small_files, tmp_path):
    with pytest.raises(DrpError, match=r"no config.json\); --clip takes a transformers CLIPModel folder"):
        load_clip(small_files / "dino.pth")
    with pytest.raises(DrpError, match=r"of type 'vit', not 'clip'; --clip takes"):
        load_clip(small_files / "vit")
    with pytest.raises(DrpError, match=r"of type 'clip', not 'vit'; --dino takes"):
        load_dino(small_files / "clip")
    with pytest.raises(DrpError, match=r"lack DINO's pos_embed"):
        load_dino(small_files / "dino.pth")
    save_file({"vision_model.embeddings.class_embedding": torch.zeros(64)}, tmp_path / "clip.safetensors")
    with pytest.raises(DrpError, match=r"\(it holds CLIP's names\); --dino takes"):
        load_dino(tmp_path / "clip.safetensors")
    torch.save({"weights": torch.zeros(1), "code": Image.new("RGB", (1, 1))}, tmp_path / "pickle.pth")
    with pytest.raises(DrpError, match=r"cannot be read as weights \(UnpicklingError\)"):
        load_dino(tmp_path / "pickle.pth")  # weights_only=True refuses to run the pickle's code
