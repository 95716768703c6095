"""Attention maps (drp/attention_maps.py): each map against the test's own computation, in every mode.

`Spy` is the test's own recorder. It is slipped between the pipeline and the UNet (a forward pre-hook that
wraps the hook of every UNet call), so it sees the very q and k of the run whose maps it checks, and it
computes what the definition says from them in float64, with its own code: the word's token positions
written out by hand, IP-Adapter's image keys from the parts' tokens and key matrices, the self-attention
mode's keys from ALGORITHM.md §3 (its own AdaIN, bias and foreground split).
"""

import math

import pytest
import torch

import drp
from drp.attention import attend
from drp.attention_maps import save_npz
from drp.errors import DrpError
from ip_checkpoints import tiny_ip_sd
from references import drp_sd, picture
from tiny import tiny_sd

TOL = 1e-4  # float32 maps against the float64 computation, relative to the largest value
SIZE = 64  # 8×8 latents: the map's grid (level 2: down_blocks.2, up_blocks.1) is 2×2
PROMPTS = ["a rowboat and a cat, a cat on the beach", "a cat on a rowboat"]
MAP_BLOCKS = ("down_blocks.2.", "up_blocks.1.")  # the tiny UNet's level 2, as in SD 1.5
# Token positions (BOS at 0), per row, counted by hand: "a row boat and a cat , a cat on the beach",
# "a cat on a row boat"; "rowboat" is two BPE tokens, "cat" is repeated, "beach" is not in row 2.
POSITIONS = {"rowboat": [[2, 3], [5, 6]], "cat": [[6, 9], [2]], "beach": [[12], []]}
# The IP-Adapter mode's early text C_bg: "a row boat and a , a on the beach", "a on a row boat".
BG_POSITIONS = {"rowboat": [[2, 3], [4, 5]], "cat": [[], []], "beach": [[10], []]}
WORDS = list(POSITIONS)


def probs64(q, k, bias=None):
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (scores if bias is None else scores + bias.double()).softmax(dim=-1)


class Spy:
    """Per step: the conditional rows' text attention (B, N, 77) and each reference's share (B, N), summed
    over the layers the definition names, with their numbers."""

    def __init__(self, batch, reference_share=None):
        self.batch, self.reference_share, self.steps = batch, reference_share, []

    def watch(self, unet):
        def wrap(module, args):
            self.steps.append({"text": 0, "text_n": 0, "refs": {}, "refs_n": 0})
            return (*args[:3], lambda attn, q, k, v, call: self.look(args[3], attn, q, k, v, call))

        self.handle = unet.register_forward_pre_hook(wrap)
        return self

    def look(self, hook, attn, q, k, v, call):
        out = attend(q, k, v) if hook is None else hook(attn, q, k, v, call)
        step, b = self.steps[-1], self.batch
        if call.is_cross and call.name.startswith(MAP_BLOCKS):
            step["text"] = step["text"] + probs64(q[b : 2 * b], k[b : 2 * b]).mean(dim=1)  # (B, N, 77)
            step["text_n"] += 1
        shares = self.reference_share(hook.hook, attn, q, k, call) if self.reference_share else None
        if shares is not None:
            for kind, share in shares.items():
                step["refs"][kind] = step["refs"].get(kind, 0) + share
            step["refs_n"] += 1
        return out

    def word_map(self, i, word, positions):
        step = self.steps[i]
        text = step["text"] / step["text_n"]
        return torch.stack([text[r][:, p].sum(dim=-1) for r, p in enumerate(positions)]).reshape(-1, 2, 2)

    def reference_map(self, i, kind):
        step = self.steps[i]
        return step["refs"][kind] / step["refs_n"]


def expected(spy, step_map, steps):
    return torch.stack([step_map(i) for i in steps]).mean(dim=0) if steps else torch.zeros(2, 2, 2)


def assert_close(got, want, what):
    assert got.dtype == torch.float32 and got.shape == want.shape, what
    assert (got.double() - want).abs().max() <= TOL * want.abs().max().clamp_min(1e-12), what


def check_words(result, spy, switch=None, early_positions=POSITIONS):
    n = len(spy.steps)
    stages = {"all": range(n)}
    if switch is not None:
        stages |= {"early": range(switch), "late": range(switch, n)}
    assert set(result.attention_maps) >= set(WORDS)
    for word in WORDS:
        assert set(result.attention_maps[word]) == set(stages)
        for stage, steps in stages.items():
            want = expected(spy, lambda i: spy.word_map(i, word, (early_positions if switch is not None and i < switch
                                                                  else POSITIONS)[word]), list(steps))
            assert_close(result.attention_maps[word][stage], want, f"{word} {stage}")
    assert (result.attention_maps["beach"]["all"][1] == 0).all()  # not in the second prompt
    assert result.attention_maps["rowboat"]["all"].min() > 0


def snapshot(*models):
    """Every tensor and every module's attributes (hooks included), to prove that a run leaves nothing behind."""
    tensors = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    attrs = [{name: sorted((k, len(v) if isinstance(v, dict) else None) for k, v in vars(mod).items())
              for name, mod in m.named_modules()} for m in models]
    return tensors, attrs


def assert_same_state(before, after):
    assert before[1] == after[1]
    for a, b in zip(before[0], after[0]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(sd, spy=None, **kw):
    kw = dict(steps=4, height=SIZE, width=SIZE, seed=3, progress=False) | kw
    if spy is None:
        return drp.generate(sd, PROMPTS, **kw)
    spy.watch(sd.unet)
    try:
        return drp.generate(sd, PROMPTS, **kw)
    finally:
        spy.handle.remove()


@pytest.fixture(scope="module")
def ip_sd():
    return tiny_ip_sd()


def test_word_maps_equal_the_independent_computation_and_recording_changes_no_pixel_in_text_to_image():
    sd = tiny_sd()
    assert len(sd.tokenizer.encode("rowboat")) == 2
    plain = run(sd)
    before = snapshot(sd.unet)
    spy = Spy(batch=2)
    recorded = run(sd, spy, attention_maps=WORDS)
    assert_same_state(before, snapshot(sd.unet))
    assert torch.equal(recorded.latents, plain.latents) and plain.attention_maps == {}
    check_words(recorded, spy)


def test_word_maps_with_an_image_prompt_and_the_image_is_unchanged(ip_sd):
    plain = run(ip_sd, ip_image=picture(3))
    spy = Spy(batch=2)
    recorded = run(ip_sd, spy, ip_image=picture(3), attention_maps=",".join(WORDS))
    assert torch.equal(recorded.latents, plain.latents)
    check_words(recorded, spy)
    with pytest.raises(DrpError, match="names the content reference, which this run does not have"):
        run(ip_sd, ip_image=picture(3), attention_maps=["content"])


def image_softmax_share(kinds_by_stage, switch, spy, layers):
    """The IP-Adapter mode's reference shares: the image softmax over the group's parts, keys made here."""
    def share(hook, attn, q, k, call):
        if not (call.is_cross and call.name.startswith(MAP_BLOCKS) and call.name.startswith(layers)):
            return None
        b, h = spy.batch, attn.heads
        parts = hook.groups[0].parts
        kinds = kinds_by_stage[len(spy.steps) - 1 >= switch]
        assert len(parts) == len(kinds)
        keys = torch.cat([p.tokens.double() @ p.key_weights[call.name].double().T for p in parts], dim=1)
        keys = keys.reshape(keys.shape[0], keys.shape[1], h, -1).transpose(1, 2)  # (rows, heads, T, d)
        p = probs64(q[b : 2 * b], keys[b : 2 * b]).mean(dim=1)  # (B, N, T)
        t = parts[0].tokens.shape[1]
        found = {kind: p[..., j * t : (j + 1) * t].sum(dim=-1) for j, kind in enumerate(kinds)}
        return {kind: found.get(kind, torch.zeros(b, q.shape[2], dtype=torch.float64)) for kind in ("content", "style")}
    return share


@pytest.mark.parametrize("late", ["both", "style-only"])
def test_ip_adapter_mode_maps_equal_the_independent_computation_and_the_image_is_unchanged(ip_sd, late):
    refs = dict(content=picture(1), style=picture(2), subject="cat", mode="ip-adapter", late=late,
                ip_layers=["up_blocks.1", "up_blocks.2"])  # image attention in 3 of the 5 layers at the grid
    plain = run(ip_sd, **refs)
    switch = plain.info["drp"]["switch_step"]
    assert 0 < switch < 4 and plain.info["drp"]["C_bg"] == "a rowboat and a , a on the beach"
    before = snapshot(ip_sd.unet, ip_sd.ip_adapter)
    spy = Spy(batch=2)
    kinds = {False: ["content", "style"], True: ["content", "style"] if late == "both" else ["style"]}
    spy.reference_share = image_softmax_share(kinds, switch, spy, ("up_blocks.1.",))
    recorded = run(ip_sd, spy, attention_maps=WORDS + ["content", "style"], **refs)
    assert_same_state(before, snapshot(ip_sd.unet, ip_sd.ip_adapter))
    assert torch.equal(recorded.latents, plain.latents)
    check_words(recorded, spy, switch, early_positions=BG_POSITIONS)
    maps = recorded.attention_maps
    assert (maps["cat"]["early"] == 0).all() and maps["cat"]["late"].min() > 0  # C_bg has no cat
    for kind in ("content", "style"):
        for stage, steps in {"all": range(4), "early": range(switch), "late": range(switch, 4)}.items():
            assert_close(maps[kind][stage], expected(spy, lambda i: spy.reference_map(i, kind).reshape(2, 2, 2),
                                                     list(steps)), f"{kind} {stage}")
    assert maps["style"]["late"].min() > 0 and maps["content"]["early"].min() > 0
    assert (maps["content"]["late"] == 0).all() == (late == "style-only")  # not in the late group: zeros


def adain64(x, ref):
    mean = lambda t: t.mean(dim=-2, keepdim=True)  # noqa: E731 (over tokens, per head and channel)
    std = lambda t: (t.var(dim=-2, unbiased=False, keepdim=True) + 1e-5).sqrt()  # noqa: E731
    return (x - mean(x)) / std(x) * std(ref) + mean(ref)


def injected_share(spy):
    """The self-attention mode's shares at up_blocks.2 (the injected level nearest the grid), from ALGORITHM.md §3."""
    def share(hook, attn, q, k, call):
        if call.is_cross or not call.name.startswith("up_blocks.2."):
            return None
        m, b, hw = hook.m, spy.batch, call.hw
        q, k = q.double(), k.double()
        row = {kind: 2 * b + j for j, kind in enumerate(m.refs)}  # replayed rows after the 2B generated ones

        def ref(t, kind, part):  # (1, heads, n, d): a reference's foreground/background/all tokens
            return t[row[kind] : row[kind] + 1][:, :, m.tokens(kind, part, hw)]

        qg, kg, n = q[b : 2 * b], k[b : 2 * b], q.shape[2]
        if not hook.late:  # [K_g ; K_cu[fg] ; K_st[fg]], +log 2 on the customized tokens
            cu, st = ref(k, "content", "fg"), ref(k, "style", "fg")
            keys = torch.cat([kg, cu.expand(b, -1, -1, -1), st.expand(b, -1, -1, -1)], dim=2)
            bias = torch.zeros(keys.shape[2], dtype=torch.float64)
            bias[n : n + cu.shape[2]] = math.log(2)
            p = probs64(qg, keys, bias).mean(dim=1)
            return {"content": p[..., n : n + cu.shape[2]].sum(-1), "style": p[..., n + cu.shape[2] :].sum(-1)}
        stats = "bg" if len(m.tokens("style", "bg", hw)) >= 16 else "all"
        qa, ka = adain64(qg, ref(q, "style", stats)), adain64(kg, ref(k, "style", stats))
        cu, st = ref(k, "content", "fg").expand(b, -1, -1, -1), ref(k, "style", "bg").expand(b, -1, -1, -1)
        fore = probs64(qa, torch.cat([ka, cu, st], dim=2)).mean(dim=1)  # [K_g ; K_cu[fg] ; K_st[bg]]
        back = probs64(qa, torch.cat([ka, st], dim=2)).mean(dim=1)  # [K_g ; K_st[bg]]
        fg = hook.generated_foreground(hw, 2 * b)
        fg = torch.ones(b, n, dtype=torch.bool) if fg is None else fg[b:]
        spy.split_seen |= bool(fg.any() and (~fg).any())
        c = cu.shape[2]
        return {"content": torch.where(fg, fore[..., n : n + c].sum(-1), 0.0),
                "style": torch.where(fg, fore[..., n + c :].sum(-1), back[..., n:].sum(-1))}
    return share


def area_to_grid(m):
    return m.reshape(2, 2, 2, 2, 2).mean(dim=(2, 4))  # (B, 4×4) → (B, 2, 2): the means of 2×2 squares


def test_self_attention_mode_maps_equal_the_independent_computation_and_the_image_is_unchanged(tmp_path):
    sd = drp_sd()
    refs = dict(content=picture(1), style=picture(2), subject="cat", mode="self-attention", switch_step=3,
                gen_mask_warmup=4, cache_dir=tmp_path, steps=6)
    plain = run(sd, **refs)  # also inverts the references into the cache: the runs below make no inversion
    before = snapshot(sd.unet)
    spy = Spy(batch=2)
    spy.split_seen = False
    spy.reference_share = injected_share(spy)
    recorded = run(sd, spy, attention_maps=WORDS + ["content", "style"], **refs)
    assert_same_state(before, snapshot(sd.unet))
    assert torch.equal(recorded.latents, plain.latents) and len(spy.steps) == 6
    assert spy.split_seen  # some late steps sent subject and background queries to different keys
    check_words(recorded, spy, 3)
    maps = recorded.attention_maps
    for kind in ("content", "style"):
        for stage, steps in {"all": range(6), "early": range(3), "late": range(3, 6)}.items():
            want = expected(spy, lambda i: area_to_grid(spy.reference_map(i, kind)), list(steps))
            assert_close(maps[kind][stage], want, f"{kind} {stage}")
        assert maps[kind]["early"].min() > 0
    only_words = run(sd, attention_maps=["cat"], **refs)  # the recorder changes nothing whatever it records
    assert torch.equal(only_words.latents, plain.latents)


def test_unknown_names_are_one_sentence_and_capitals_ask_for_the_word():
    sd = tiny_sd()
    with pytest.raises(DrpError, match=r"'dog' is not a word of the prompt \('a' 'rowboat' 'and' 'cat,'"):
        run(sd, attention_maps=["cat", "dog"])
    with pytest.raises(DrpError, match="names the style reference, which this run does not have; give style="):
        run(sd, attention_maps="style")
    with pytest.raises(DrpError, match="attention_maps must be a list"):
        run(sd, attention_maps=[3])
    maps = drp.generate(sd, "a painting in the style of a rowboat", steps=1, height=SIZE, width=SIZE,
                        progress=False, attention_maps=["Style", "of a"]).attention_maps
    assert list(maps) == ["Style", "of a"] and maps["Style"]["all"].shape == (1, 2, 2)


def test_the_maps_of_one_image_are_saved_as_npz(tmp_path):
    import numpy as np

    maps = {"cat": {"all": torch.rand(2, 2, 3), "late": torch.rand(2, 2, 3)}, "content": {"all": torch.rand(2, 2, 3)}}
    path = save_npz(tmp_path / "7.npz", maps, 1)
    with np.load(path) as saved:
        assert sorted(saved.files) == ["cat/all", "cat/late", "content/all"]
        assert np.array_equal(saved["cat/late"], maps["cat"]["late"][1].numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["7.npz"]
