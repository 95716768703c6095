"""The CLIP text encoder equals transformers' CLIPTextModel on the same weights, with the SD 1.5 key names."""

import json

import pytest
import torch

from drp.clip import CLIPConfig, CLIPTextModel, CLIPTextModelWithProjection
from drp.errors import DrpError
from manifests import MANIFESTS, diffusers_manifest

TOL = 1e-4  # relative to the reference's largest magnitude, fp32
BOS, EOS = 49406, 49407  # SD 1.x pads with EOS


def published_config():
    """The SD 1.5 `text_encoder/config.json` (openai/clip-vit-large-patch14's text config)."""
    return json.loads((MANIFESTS / "sd15_diffusers_configs" / "text_encoder" / "config.json").read_text())


def reference_clip(cfg):
    """transformers' CLIPTextModel built from the published config, resized to `cfg`."""
    from transformers import CLIPTextConfig, CLIPTextModel as Reference

    config = published_config()
    config.update(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_len, hidden_size=cfg.dim,
                  num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_dim)
    return Reference(CLIPTextConfig(**config)).eval()


def file_keys(state_dict):
    """The reference's tensors under the file's names: transformers >= 5.6 drops the `text_model.` level."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = CLIPConfig.tiny()
    ref = reference_clip(cfg)
    with torch.no_grad():  # LayerNorms start at weight 1, bias 0 and linear biases at 0: move them
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(file_keys(ref.state_dict()), strict=True)
    return ours, ref


def prompt_tokens(batch, length, seed):
    """Random ids shaped like the tokenizer's output: BOS, `length` words, EOS, EOS padding to 77."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((batch, 77), EOS)
    tokens[:, 0] = BOS
    tokens[:, 1:1 + length] = torch.randint(0, BOS, (batch, length), generator=g)
    return tokens


def test_last_hidden_state_equals_transformers_including_padding_positions(pair):
    ours, ref = pair
    tokens = prompt_tokens(batch=2, length=11, seed=1)
    with torch.no_grad():
        got = ours(tokens)
        want = ref(input_ids=tokens).last_hidden_state
    assert got.shape == (2, 77, 128)
    assert ((got - want).abs().max() / want.abs().max()).item() < TOL


def test_each_position_sees_only_the_tokens_before_it(pair):
    ours, _ = pair
    tokens = prompt_tokens(batch=1, length=20, seed=2)
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % BOS
    with torch.no_grad():
        a, b = ours(tokens), ours(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_every_layer_norm_has_the_epsilon_of_the_reference(pair):
    ours, ref = (
        {name.removeprefix("text_model."): m.eps for name, m in model.named_modules()
         if isinstance(m, torch.nn.LayerNorm)}
        for model in pair
    )
    assert len(ours) == 2 * 2 + 1  # two per layer, and the final one
    assert ours == ref
    assert set(ours.values()) == {1e-5}


def test_default_config_is_the_published_sd15_config():
    cfg, published = CLIPConfig(), published_config()
    assert (cfg.vocab_size, cfg.max_len, cfg.dim, cfg.layers, cfg.heads, cfg.mlp_dim) == (
        published["vocab_size"], published["max_position_embeddings"], published["hidden_size"],
        published["num_hidden_layers"], published["num_attention_heads"], published["intermediate_size"])


def test_more_than_77_tokens_is_refused(pair):
    ours, _ = pair
    with pytest.raises(DrpError, match="77"):
        ours(torch.full((1, 78), EOS))


def test_sd15_text_encoder_has_every_key_and_shape_of_the_transformers_file():
    with torch.device("meta"):  # shapes only, no memory
        ours = CLIPTextModel(CLIPConfig())
    want = {k: s for k, s in diffusers_manifest("text_encoder").items() if not k.endswith("position_ids")}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(want) == 196
    assert sorted(got) == sorted(want)
    assert got == want


def test_config_from_transformers_reads_a_clipmodel_text_half_and_refuses_another_activation():
    b32 = CLIPConfig.from_transformers(dict(model_type="clip", text_config=dict(hidden_size=512)))
    assert (b32.dim, b32.heads, b32.layers, b32.mlp_dim) == (512, 8, 12, 2048)  # transformers' defaults fill in
    assert CLIPConfig.from_transformers(published_config()) == CLIPConfig()
    with pytest.raises(DrpError, match="uses gelu"):
        CLIPConfig.from_transformers(dict(published_config(), hidden_act="gelu"))


def test_text_embedding_of_tokens_without_an_end_of_text_token_is_refused():
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(CLIPConfig.tiny(), projection_dim=16).eval()
    tokens = prompt_tokens(batch=2, length=11, seed=3)
    with torch.no_grad():
        assert model.embed(tokens).shape == (2, 16)
        tokens[1, 12:] = 0  # the second row loses its end-of-text and padding
        with pytest.raises(DrpError, match="end-of-text token"):
            model.embed(tokens)
