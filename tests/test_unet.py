"""The UNet equals diffusers' UNet2DConditionModel on the same weights, and the hook sees every attention."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drp import attention
from drp.attention import attend
from drp.unet import UNet, UNetConfig
from manifests import diffusers_manifest

TOL = 1e-4  # relative to the reference's largest magnitude, fp32
COMPILE_TOL = 1e-5  # relative: the compiled graph against eager, the same float32 kernels regrouped


def reference_unet(cfg):
    from diffusers import UNet2DConditionModel

    levels = len(cfg.channels)
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attn_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attn_levels)]
    return UNet2DConditionModel(
        sample_size=8, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.channels, layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.heads, cross_attention_dim=cfg.context_dim,
        norm_num_groups=cfg.groups, down_block_types=down[:levels], up_block_types=up[:levels],
    ).eval()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = UNetConfig.tiny()
    ref = reference_unet(cfg)
    with torch.no_grad():  # the reference initialises some layers to zero; make every weight count
        for p in ref.parameters():
            p.normal_(0, 0.05)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return cfg, ours, ref


@pytest.mark.parametrize("t", [1, 421, 999])
@pytest.mark.parametrize("size", [(8, 8), (16, 24), (13, 9)])
def test_unet_matches_diffusers(pair, t, size):
    cfg, ours, ref = pair
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, 4, *size, generator=g)
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    with torch.no_grad():
        expected = ref(x, t, context).sample
        got = ours(x, t, context)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= TOL * expected.abs().max()


def test_unet_takes_one_timestep_per_batch_row(pair):
    cfg, ours, ref = pair
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 77, cfg.context_dim, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        expected = ref(x, t, context).sample
        got = ours(x, t, context)
    assert (got - expected).abs().max() <= TOL * expected.abs().max()


def test_identity_hook_is_bit_exact(pair):
    cfg, ours, _ = pair
    x = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(3))
    context = torch.randn(1, 77, cfg.context_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = ours(x, 500, context)
        hooked = ours(x, 500, context, hook=lambda attn, q, k, v, call: attend(q, k, v))
    assert torch.equal(plain, hooked)


def test_hook_output_changes_the_prediction(pair):
    cfg, ours, _ = pair
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    context = torch.randn(1, 77, cfg.context_dim, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        plain = ours(x, 500, context)
        zeroed = ours(x, 500, context, hook=lambda attn, q, k, v, call: torch.zeros_like(q))
    assert not torch.allclose(plain, zeroed)


def test_counting_hook_sees_the_32_attention_calls_with_their_names_and_grids():
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    seen = []

    def hook(attn, q, k, v, call):
        seen.append((call.name, call.is_cross, call.hw, k.shape[2]))
        return attend(q, k, v)

    x = torch.empty(1, 4, 64, 48, device="meta")
    unet(x, 1, torch.empty(1, 77, 768, device="meta"), hook=hook)
    assert len(seen) == 32
    names = {name for name, *_ in seen}
    expected_names = {k[: -len(".to_q.weight")] for k in diffusers_manifest("unet") if k.endswith(".to_q.weight")}
    assert names == expected_names
    grids = {name.rsplit(".", 3)[0]: hw for name, _, hw, _ in seen}
    assert grids["down_blocks.0.attentions.0"] == (64, 48)
    assert grids["down_blocks.2.attentions.1"] == (16, 12)
    assert grids["mid_block.attentions.0"] == (8, 6)
    assert grids["up_blocks.2.attentions.2"] == (32, 24)
    assert grids["up_blocks.3.attentions.0"] == (64, 48)
    for name, is_cross, hw, keys in seen:
        assert is_cross == name.endswith("attn2")
        assert keys == (77 if is_cross else hw[0] * hw[1])


def test_full_size_unet_has_exactly_the_sd15_keys_and_shapes():
    with torch.device("meta"):
        unet = UNet(UNetConfig())
    ours = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert ours == diffusers_manifest("unet")
    assert len(ours) == 686


class Scale:
    """A hook with state, as a sampling loop makes a new one each step: every attention output × factor."""

    def __init__(self, factor):
        self.factor, self.calls = factor, 0

    def __call__(self, attn, q, k, v, call):
        self.calls += 1
        return attend(q, k, v) * self.factor


def test_under_torch_compile_hooks_run_as_written_and_new_hooks_compile_nothing_new(pair, monkeypatch):
    cfg, ours, _ = pair
    plain = getattr(attention.run_hook, "__wrapped__", attention.run_hook)
    monkeypatch.setattr(attention, "run_hook", plain)  # as after import, whatever ran before in this process
    graphs = []

    def count_graphs(graph, example_inputs):  # a torch.compile backend: counts the graphs, runs them as they are
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = copy.deepcopy(ours)
    compiled.compile(backend=count_graphs)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    context = torch.randn(2, 77, cfg.context_dim, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        for step, factor in enumerate([1.0, 0.9, 0.8]):
            hook = Scale(factor)
            got = compiled(x, 500, context, hook=hook)
            assert hook.calls == 32  # the hook ran, every attention, in Python: its counter moved
            assert (got - ours(x, 500, context, hook=Scale(factor))).abs().max() <= COMPILE_TOL * got.abs().max()
            if step == 0:
                after_first = len(graphs)
    assert after_first > 0 and len(graphs) == after_first  # the new hooks' factors were not compiled in
    torch._dynamo.reset()


def test_importing_drp_does_not_import_the_compiler():
    # torch._dynamo costs 2.5 s and 70 MB on import; only `UNet.compile` needs it
    code = "import sys, drp, drp.pipeline, drp.unet; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
