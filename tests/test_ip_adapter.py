"""IP-Adapter: drp.generate(..., ip_image=...) equals diffusers' StableDiffusionPipeline + load_ip_adapter.

Both read the same random files: a tiny SD 1.x folder (written by diffusers' save_pretrained, converted
by us), and a folder in the h94/IP-Adapter layout (`models/ip-adapter_sd15.safetensors|.bin`,
`models/ip-adapter-plus_sd15.*`, `models/image_encoder/`) that this file writes and that our converter
and diffusers' `load_ip_adapter` each read their own way. The reference preprocesses with transformers'
PIL `CLIPImageProcessor` (the one the weights were trained with), we with drp.vision.clip_pixels.
"""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import drp
from checkpoints import reference_models, write_diffusers_folder
from drp.attention import Attention, AttnCall, attend
from drp.convert import convert
from drp.errors import DrpError
from drp.ip_adapter import DecoupledCrossAttention, ImageGroup, attn2_layers, file_index, resolve_scale
from drp.png_info import parameters_text
from drp.sampling import decode
from drp.unet import UNet, UNetConfig
from ip_checkpoints import FILES, reference_encoder, reference_pipeline, write_h94_folder
from scripts import load_script

PIXEL_TOL = 2.5 / 255  # the bound for whole-pipeline parity, in [0, 1] pixels
# relative to the largest magnitude of the expected output: the hook's keys through F.linear against the
# test's `tokens @ W.T`, another kernel that may sum the 128 products in another order
HOOK_TOL = 1e-5
PROMPT = "a red fox sitting in the snow, oil painting"
SIZE, STEPS = 64, 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(the random diffusers models, the h94 `models/` folder, our converted SD folder, two pictures)."""
    root = tmp_path_factory.mktemp("ip")
    models = reference_models(seed=0)
    write_diffusers_folder(root / "sd", models)
    convert(root / "sd", root / "weights", dtype="fp32", progress=False)
    h94 = write_h94_folder(root / "h94", reference_encoder(seed=5))
    rng = np.random.default_rng(0)  # awkward sizes: a landscape and a portrait picture, centre-cropped
    pictures = [Image.fromarray((rng.random(shape) * 255).astype(np.uint8)) for shape in [(230, 301, 3), (300, 199, 3)]]
    return models, h94, root / "weights", pictures


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    return reference_pipeline(world[0], tmp_path_factory.mktemp("tok"))  # each test loads the adapter it needs


def with_adapter(world, tmp_path, kind, form):
    """Our weights folder with the h94 adapter file `kind`/`form` and the image encoder added, loaded."""
    _, h94, weights, _ = world
    folder = shutil.copytree(weights, tmp_path / "weights")
    convert(h94 / f"{FILES[kind]}{form}", folder, dtype="fp32", progress=False)
    convert(h94 / "image_encoder", folder, dtype="fp32", progress=False)
    return drp.load(folder)


def noise():
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))


def ours(sd, **kwargs):
    result = drp.generate(sd, PROMPT, steps=STEPS, height=SIZE, width=SIZE, latents=noise(), progress=False, **kwargs)
    return result, decode(sd, result.latents).permute(0, 2, 3, 1).numpy()


CASES = [  # kind, file form, pictures, our scale, diffusers' set_ip_adapter_scale
    ("base", ".safetensors", 1, 0.6, 0.6),
    ("base", ".bin", 2, 0.6, 0.6),
    ("plus", ".safetensors", 2, 0.6, 0.6),
    ("plus", ".bin", 1, 0.6, 0.6),
    ("base", ".safetensors", 1, {"up_blocks.1": 1.0, "down_blocks.2": 0.5},
     {"up": {"block_1": 1.0}, "down": {"block_2": 0.5}}),
]


@pytest.mark.parametrize("kind, form, count, scale, reference_scale", CASES)
def test_image_prompt_equals_diffusers_load_ip_adapter(world, reference, tmp_path, kind, form, count, scale,
                                                       reference_scale):
    sd = with_adapter(world, tmp_path, kind, form)
    pictures = world[3][:count]
    result, image = ours(sd, ip_image=pictures if count > 1 else pictures[0], ip_scale=scale)
    reference.load_ip_adapter(str(world[1]), subfolder="", weight_name=f"{FILES[kind]}{form}",
                              image_encoder_folder="image_encoder")
    try:
        reference.set_ip_adapter_scale(reference_scale)
        expected = reference(PROMPT, latents=noise(), num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE,
                             width=SIZE, ip_adapter_image=[pictures], output_type="np").images
    finally:
        reference.unload_ip_adapter()
    inside = ((expected > 0.02) & (expected < 0.98)).mean()
    assert inside > 0.5, "the test image is saturated, so the comparison would prove little"
    assert abs(image - expected).max() <= PIXEL_TOL
    assert result.info["ip_adapter"] == dict(file=f"{FILES[kind]}{form}", kind=kind, scale=scale,
                                             images=["picture"] * count)


def test_the_image_prompt_moves_the_pixels_far_beyond_the_tolerance(world, tmp_path):
    """The parity above is meaningful: without the picture the image is another one."""
    sd = with_adapter(world, tmp_path, "base", ".safetensors")
    _, with_picture = ours(sd, ip_image=world[3][0], ip_scale=0.6)
    _, without = ours(sd)
    assert abs(with_picture - without).max() > 50 * PIXEL_TOL


def test_scale_zero_is_plain_text_to_image_to_the_bit_and_plain_runs_read_no_adapter_file(world, tmp_path):
    sd = with_adapter(world, tmp_path, "plus", ".safetensors")
    plain, _ = ours(sd)
    assert sd.components == {}, "text-to-image loaded an IP-Adapter component"
    zero, _ = ours(sd, ip_image=world[3][0], ip_scale=0)
    assert torch.equal(plain.latents, zero.latents)
    per_block_zero, _ = ours(sd, ip_image=world[3][0], ip_scale={"up_blocks.1": 0.0})
    assert torch.equal(plain.latents, per_block_zero.latents)


def test_png_parameters_record_the_adapter_and_scale(world, tmp_path):
    sd = with_adapter(world, tmp_path, "base", ".bin")
    result, _ = ours(sd, ip_image=world[3][0], ip_scale={"up_blocks.1": 1.0})
    text = parameters_text(result.info)
    assert ('IP-Adapter: ip-adapter_sd15.bin, IP-Adapter scale: up_blocks.1=1, '
            'IP-Adapter images: picture') in text


def test_an_image_prompt_without_converted_files_names_the_download_command(world):
    sd = drp.load(world[2])
    assert sd.ip_adapter is None and sd.image_encoder is None
    with pytest.raises(DrpError, match=r"python convert_weights.py --download ip-adapter") as e:
        ours(sd, ip_image=world[3][0])
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


def test_an_image_prompt_names_the_missing_component_before_reading_the_other(world, tmp_path):
    folder = shutil.copytree(world[2], tmp_path / "weights")
    convert(world[1] / f"{FILES['base']}.safetensors", folder, dtype="fp32", progress=False)  # no encoder
    sd = drp.load(folder)
    with pytest.raises(DrpError, match=r"the image encoder is not converted in .*--download ip-adapter"):
        ours(sd, ip_image=world[3][0])
    assert "ip_adapter" not in sd.components  # the adapter was not read just to say the encoder is missing
    assert sd.has("ip_adapter") and not sd.has("image_encoder")

def test_an_image_prompt_with_content_or_style_references_is_refused_in_one_sentence(world):
    sd = drp.load(world[2])
    with pytest.raises(DrpError, match="cannot be combined with DRP-Diff's content/style references"):
        ours(sd, ip_image=world[3][0], style=world[3][1])


def test_per_block_scales_name_blocks_and_unknown_blocks_are_errors():
    names = list(attn2_layers())
    scales = resolve_scale({"up_blocks.1": 1.0, "up_blocks.1.attentions.2": 0.3, "mid_block": 0.5}, names)
    assert [n for n, s in scales.items() if s == 1.0] == [f"up_blocks.1.attentions.{j}.transformer_blocks.0.attn2"
                                                           for j in range(2)]
    assert scales["up_blocks.1.attentions.2.transformer_blocks.0.attn2"] == 0.3  # the longer key wins
    assert scales["mid_block.attentions.0.transformer_blocks.0.attn2"] == 0.5
    assert sum(s == 0 for s in scales.values()) == 12  # the rest: 0, as diffusers' set_ip_adapter_scale
    assert set(resolve_scale(0.6, names).values()) == {0.6}
    for bad in ({"up_blocks.0": 1.0}, {"up_blocks.1.attentions.3": 1.0}, {"up_block.1": 1.0}, {"mid": 1.0}):
        with pytest.raises(DrpError, match="is no block with cross-attention; use down_blocks.0, down_blocks.1"):
            resolve_scale(bad, names)
    with pytest.raises(DrpError, match="must be a number or a dict"):
        resolve_scale("strong", names)


def test_the_file_numbering_is_diffusers_attn_processors_order_with_the_mid_block_last():
    """Derived from our UNet's attn2 names, checked against diffusers' own walk of its UNet."""
    from diffusers import UNet2DConditionModel

    from checkpoints import diffusers_unet_config, TINY

    for cfg, dcfg in [(TINY["unet"], diffusers_unet_config(TINY["unet"])), (UNetConfig(), {})]:
        with torch.device("meta"):
            reference = UNet2DConditionModel(**dcfg)
            unet = UNet(cfg)
        processors = list(reference.attn_processors)
        expected = {i: name.removesuffix(".processor") for i, name in enumerate(processors)
                    if name.endswith("attn2.processor")}
        assert file_index(list(attn2_layers(cfg))) == expected
        ours = [n for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross]
        assert list(attn2_layers(cfg)) == ours
    assert file_index(list(attn2_layers()))[31] == "mid_block.attentions.0.transformer_blocks.0.attn2"


def test_several_pictures_share_one_softmax_and_separate_groups_do_not(world, tmp_path):
    """The hook's term for two groups of tokens is the attention over them; one group of both = one softmax."""
    sd = with_adapter(world, tmp_path, "base", ".safetensors")
    adapter, name = sd.ip_adapter, sd.ip_adapter.layer_names[-1]
    attn = sd.unet.get_submodule(name)
    g = torch.Generator().manual_seed(3)
    d = attn.to_q.out_features // attn.heads
    q, k, v = (torch.randn(2, attn.heads, n, d, generator=g) for n in (16, 77, 77))  # (B, h, N, d)
    a, b = torch.randn(2, 4, 128, generator=g), torch.randn(2, 4, 128, generator=g)
    call = AttnCall(name, True, (4, 4))

    def term(tokens):
        heads = attn.split_heads
        return attend(q, heads(tokens @ adapter.key_weight(name).T), heads(tokens @ adapter.value_weight(name).T))

    joint = DecoupledCrossAttention(adapter, [ImageGroup(torch.cat([a, b], 1), 0.5)])(attn, q, k, v, call)
    expected = attend(q, k, v) + 0.5 * term(torch.cat([a, b], 1))
    assert (joint - expected).abs().max() <= HOOK_TOL * expected.abs().max()
    separate = DecoupledCrossAttention(adapter, [ImageGroup(a, 0.5), ImageGroup(b, 0.5)])(attn, q, k, v, call)
    expected = attend(q, k, v) + 0.5 * term(a) + 0.5 * term(b)
    assert (separate - expected).abs().max() <= HOOK_TOL * expected.abs().max()
    assert (separate - joint).abs().max() > 1e-3  # two softmaxes are not one


def test_sample_cli_prompts_with_images_and_a_per_block_scale_and_records_them(world, tmp_path, capsys):
    sample = load_script("sample")
    sd = with_adapter(world, tmp_path, "plus", ".safetensors")
    for k, picture in enumerate(world[3]):
        picture.save(tmp_path / f"ref{k}.png")
    quick = ["--steps", "2", "--height", "64", "--width", "64", "--no-progress", "--prompt", "a fox"]
    args = ["--weights", str(sd.folder), *quick, "--ip-image", str(tmp_path / "ref0.png"), "--ip-image",
            str(tmp_path / "ref1.png"), "--ip-scale", "up_blocks.1=1,mid_block=0.5", "--out", str(tmp_path / "x.png")]
    assert sample.main(args) == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "x.png").text["parameters"].endswith(
        'IP-Adapter: ip-adapter-plus_sd15, IP-Adapter scale: "up_blocks.1=1,mid_block=0.5", '
        "IP-Adapter images: ref0.png | ref1.png")
    missing = ["--weights", str(world[2]), *quick, "--ip-image", str(tmp_path / "ref0.png"),
               "--out", str(tmp_path / "y.png")]
    assert sample.main(missing) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --ip-image needs IP-Adapter's files") and \
        "`python convert_weights.py --download ip-adapter`" in err[0]
    assert not (tmp_path / "y.png").exists()
