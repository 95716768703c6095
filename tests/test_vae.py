"""The VAE equals diffusers' AutoencoderKL on the same weights, and has the SD 1.5 parameter names."""

import dataclasses
import json

import pytest
import torch

from drp import vae
from drp.errors import DrpError
from drp.vae import LATENT_SCALE, VAE, VAEConfig
from manifests import MANIFESTS, diffusers_manifest

TOL = 1e-4  # relative to the reference's largest magnitude, fp32
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def published_config():
    """The SD 1.5 `vae/config.json`."""
    return json.loads((MANIFESTS / "sd15_diffusers_configs" / "vae" / "config.json").read_text())


def reference_vae(cfg):
    """diffusers' AutoencoderKL built from the published config, resized to `cfg`."""
    from diffusers import AutoencoderKL

    config = {k: v for k, v in published_config().items() if not k.startswith("_")}
    config.update(block_out_channels=cfg.channels, layers_per_block=cfg.layers_per_block,
                  norm_num_groups=cfg.groups, latent_channels=cfg.latent_channels)
    return AutoencoderKL(**config).eval()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = VAEConfig.tiny()
    ref = reference_vae(cfg)
    with torch.no_grad():  # norms start at weight 1, bias 0: move them so a misplaced norm shows
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    ours = VAE(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # diffusers 0.42 already spells to_q/.../to_out.0
    return ours, ref


def max_rel_err(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_encode_returns_the_posterior_mean_of_diffusers_on_a_non_square_image(pair):
    ours, ref = pair
    torch.manual_seed(1)
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        got = ours.encode(x)
        want = ref.encode(x).latent_dist.mean
    assert got.shape == (1, 4, 8, 6)
    assert max_rel_err(got, want) < TOL


def test_decode_equals_diffusers_on_a_non_square_latent(pair):
    ours, ref = pair
    torch.manual_seed(2)
    z = torch.randn(2, 4, 8, 6)
    with torch.no_grad():
        got = ours.decode(z)
        want = ref.decode(z).sample
    assert got.shape == (2, 3, 64, 48)
    assert max_rel_err(got, want) < TOL


def tiled_reference(ref, tile):
    """A copy of diffusers' VAE `ref` with `enable_tiling()`, its tiles `tile` latents per side."""
    model = reference_vae(VAEConfig.tiny())
    model.load_state_dict(ref.state_dict())
    model.enable_tiling()
    model.tile_latent_min_size, model.tile_sample_min_size = tile, tile * 8
    return model


@pytest.mark.parametrize("tile, shape", [(vae.TILE, (1, 4, 72, 104)), (16, (2, 4, 40, 28))])
def test_tiled_decoding_is_diffusers_tiled_decoding(pair, monkeypatch, tile, shape):
    # SD's 64-latent tiles (2 rows of 3, the last column 8 latents wide), then small tiles in 4 rows of 3
    # with a batch of 2: edge tiles narrower than the blend, corners blended both ways
    ours, ref = pair
    monkeypatch.setattr(vae, "TILE", tile)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    reference = tiled_reference(ref, tile)
    with torch.no_grad():
        got = ours.decode(z, tiled=True)
        want = reference.decode(z).sample
        # diffusers' tiling and blending around our decoder: the same to the last digit
        reference.decoder, reference.post_quant_conv = ours.decoder, ours.post_quant_conv
        want_exactly = reference.decode(z).sample
    assert got.shape == want.shape == (shape[0], 3, 8 * shape[2], 8 * shape[3])
    assert max_rel_err(got, want) < TOL
    assert torch.equal(got, want_exactly)


def test_tiled_decoding_of_a_latent_no_larger_than_a_tile_is_the_whole_decode(pair):
    ours, _ = pair
    z = torch.randn(1, 4, vae.TILE, 24, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(ours.decode(z, tiled=True), ours.decode(z))


def test_encode_rejects_an_image_whose_size_is_not_a_multiple_of_eight(pair):
    ours, _ = pair
    with pytest.raises(DrpError, match="multiples of 8"):
        ours.encode(torch.zeros(1, 3, 64, 50))


def test_every_group_norm_has_the_epsilon_of_the_reference(pair):
    ours, ref = (
        {name: m.eps for name, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)}
        for model in pair
    )
    assert len(ours) == 52  # 2 per ResNet (10 in the encoder, 14 in the decoder), 2 attentions, 2 outputs
    assert ours == ref
    assert set(ours.values()) == {1e-6}


def test_latent_scale_is_the_sd_config_scaling_factor():
    assert LATENT_SCALE == published_config()["scaling_factor"] == 0.18215


def test_default_config_is_the_published_sd15_config():
    cfg, published = VAEConfig(), published_config()
    assert cfg.channels == tuple(published["block_out_channels"])
    assert (cfg.in_channels, cfg.latent_channels, cfg.layers_per_block, cfg.groups) == (
        published["in_channels"], published["latent_channels"], published["layers_per_block"],
        published["norm_num_groups"])


def test_config_survives_a_json_round_trip():
    cfg = VAEConfig.tiny()
    assert VAEConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_sd15_vae_has_every_key_and_shape_of_the_diffusers_file():
    with torch.device("meta"):  # shapes only, no memory
        ours = VAE(VAEConfig())
    want = {}
    for key, shape in diffusers_manifest("vae").items():
        *module, name, leaf = key.split(".")
        if ".mid_block.attentions.0." in key:
            name = LEGACY_ATTENTION.get(name, name)
        want[".".join([*module, name, leaf])] = shape
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(want) == 248
    assert sorted(got) == sorted(want)
    assert got == want
