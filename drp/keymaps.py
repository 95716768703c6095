"""Declarative key maps from the checkpoint layouts of SD 1.x to our parameter names.

Our parameter names are those of the diffusers folder layout, so only the original single-file
layout (the `state_dict` of CompVis `LatentDiffusion`, e.g. `v1-5-pruned-emaonly.safetensors`)
needs a real map. Each map is a plain dict `{source prefix: (our prefix, transform)}`, generated
by loops where the original code numbers its blocks by index arithmetic, and applied by
`rename`: the longest prefix that ends at a `.` boundary wins, and everything after it is kept.
There is no substring replacement anywhere, so `out.0` can never match inside `to_out.0`.
The maps are generated from the model configs, which `infer_configs` reads off a file's shapes.

Where the single file's numbering comes from:
  UNet  ldm/modules/diffusionmodules/openaimodel.py (`UNetModel.input_blocks`, `output_blocks`)
  VAE   ldm/modules/diffusionmodules/model.py (`Encoder.down`, `Decoder.up`, `AttnBlock`)
  CLIP  ldm/modules/encoders/modules.py (`FrozenCLIPEmbedder.transformer`, a transformers model)
  https://github.com/CompVis/stable-diffusion/tree/main/ldm
"""

from .clip import CLIPConfig
from .errors import DrpError
from .unet import UNetConfig
from .vae import VAEConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."

# The noise schedule that LatentDiffusion registers as buffers; our sampler computes it itself.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
})


def is_ignored(key):
    """The declared ignore list: source tensors that no parameter of ours comes from."""
    return (
        key in SCHEDULE_BUFFERS
        or key.startswith("model_ema.")  # the training copy of the UNet (and its decay, num_updates)
        or key.endswith(".position_ids")  # arange(77), recomputed by the text encoder
    )


def conv1x1_to_linear(t):
    """(out, in, 1, 1) convolution weight -> (out, in) linear weight (the VAE mid-attention)."""
    return t.flatten(1)


def longest_prefix(key, rules):
    """The longest prefix of `key` that ends at a `.` boundary and is a rule, or None."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in rules:
            return prefix
    return None


def rename(key, rules):
    """(our key, transform) for a source key by its longest rule prefix, or None if no rule matches."""
    prefix = longest_prefix(key, rules)
    if prefix is None:
        return None
    ours, transform = rules[prefix]
    return ours + key[len(prefix):], transform


# Inside one block the two layouts name the same layers differently.
UNET_RESNET = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def unet_rules(cfg):
    """Single-file UNet map for a `UNetConfig` (any number of levels and layers per level)."""
    rules = {}
    n, levels = cfg.layers_per_block, len(cfg.channels)

    def add(src, ours, transform=None):
        rules[UNET + src] = (ours, transform)

    def resnet(src, ours):
        for a, b in UNET_RESNET.items():
            add(f"{src}.{a}", f"{ours}.{b}")

    add("time_embed.0", "time_embedding.linear_1")  # time_embed.1 is the SiLU
    add("time_embed.2", "time_embedding.linear_2")
    add("input_blocks.0.0", "conv_in")
    # input_blocks: conv_in, then per level n × (resnet[, transformer]) and a downsampler (not the last)
    for i in range(levels):
        for j in range(n):
            block = i * (n + 1) + j + 1
            resnet(f"input_blocks.{block}.0", f"down_blocks.{i}.resnets.{j}")
            if cfg.attn_levels[i]:
                add(f"input_blocks.{block}.1", f"down_blocks.{i}.attentions.{j}")
        if i < levels - 1:
            add(f"input_blocks.{(i + 1) * (n + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
    resnet("middle_block.0", "mid_block.resnets.0")
    add("middle_block.1", "mid_block.attentions.0")
    resnet("middle_block.2", "mid_block.resnets.1")
    # output_blocks: per level (deepest first) n + 1 × (resnet[, transformer]); the upsampler sits
    # in the level's last block, after the transformer if there is one
    for i in range(levels):
        attention = cfg.attn_levels[levels - 1 - i]
        for j in range(n + 1):
            block = i * (n + 1) + j
            resnet(f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}")
            if attention:
                add(f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}")
        if i < levels - 1:
            last = i * (n + 1) + n
            add(f"output_blocks.{last}.{2 if attention else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv")
    add("out.0", "conv_norm_out")  # out.1 is the SiLU
    add("out.2", "conv_out")
    return rules


def vae_rules(cfg):
    """Single-file VAE map for a `VAEConfig`."""
    rules = {}
    n, levels = cfg.layers_per_block, len(cfg.channels)

    def add(src, ours, transform=None):
        rules[VAE + src] = (ours, transform)

    def resnet(src, ours):
        for a, b in VAE_RESNET.items():
            add(f"{src}.{a}", f"{ours}.{b}")

    for same in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                 "quant_conv", "post_quant_conv"):
        add(same, same)
    for part in ("encoder", "decoder"):
        add(f"{part}.norm_out", f"{part}.conv_norm_out")
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        for a, b in VAE_ATTENTION.items():
            add(f"{part}.mid.attn_1.{a}", f"{part}.mid_block.attentions.0.{b}")
            if a != "norm":  # the original stores these linears as 1×1 convolutions
                add(f"{part}.mid.attn_1.{a}.weight", f"{part}.mid_block.attentions.0.{b}.weight", conv1x1_to_linear)
    for i in range(levels):
        for j in range(n):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            add(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    # The original decoder numbers its levels by resolution (up.0 is the full-size one, built
    # last); diffusers numbers them in the order they run. Hence up.{levels-1-i} -> up_blocks.{i}.
    for i in range(levels):
        src = levels - 1 - i
        for j in range(n + 1):
            resnet(f"decoder.up.{src}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            add(f"decoder.up.{src}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    return rules


def clip_rules(cfg=None):
    """Single-file text-encoder map: the transformers model sits under `cond_stage_model.transformer.`."""
    return {CLIP + "text_model": ("text_model", None)}


def folder_rules(component, our_keys):
    """Diffusers-folder map: the identity on our top-level modules, plus the older spellings."""
    rules = {key.split(".")[0]: (key.split(".")[0], None) for key in our_keys}
    if component == "vae":  # diffusers <= 0.13 wrote the mid-attention as query/key/value/proj_attn
        for part in ("encoder", "decoder"):
            for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")):
                rules[f"{part}.mid_block.attentions.0.{old}"] = (f"{part}.mid_block.attentions.0.{new}", None)
    if component == "text_encoder":  # transformers >= 5 saves CLIPTextModel without `text_model.`
        for name in ("embeddings", "encoder", "final_layer_norm"):
            rules[name] = (f"text_model.{name}", None)
    return rules


def infer_configs(shapes, name):
    """UNet, VAE and CLIP configs of a single file from its tensor shapes, plus SD 1.x's rules."""
    u = {k[len(UNET):]: s for k, s in shapes.items() if k.startswith(UNET)}
    v = {k[len(VAE):]: s for k, s in shapes.items() if k.startswith(VAE)}
    text = CLIP + "text_model."
    c = {k[len(text):]: s for k, s in shapes.items() if k.startswith(text)}
    try:
        blocks = {int(k.split(".")[1]) for k in u if k.startswith("input_blocks.")}
        downs = sorted(b for b in blocks if f"input_blocks.{b}.0.op.weight" in u)
        n = downs[0] - 1 if downs else len(blocks) - 1  # a level is n resnets + 1 downsampler
        firsts = [i * (n + 1) + 1 for i in range(len(blocks) // (n + 1))]  # each level's first resnet
        unet = UNetConfig(
            in_channels=u["input_blocks.0.0.weight"][1],
            out_channels=u["out.2.weight"][0],
            channels=tuple(u[f"input_blocks.{b}.0.in_layers.2.weight"][0] for b in firsts),
            layers_per_block=n,
            heads=8,  # SD 1.x: 8 heads at every level; shapes cannot tell
            context_dim=u["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1],
            groups=32,  # GroupNorm groups cannot be read from shapes either; SD uses 32 everywhere
            attn_levels=tuple(f"input_blocks.{b}.1.proj_in.weight" in u for b in firsts),
        )
        levels = len({k.split(".")[2] for k in v if k.startswith("encoder.down.")})
        vae = VAEConfig(
            in_channels=v["encoder.conv_in.weight"][1],
            latent_channels=v["post_quant_conv.weight"][0],
            channels=tuple(v[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)),
            layers_per_block=len({k.split(".")[4] for k in v if k.startswith("encoder.down.0.block.")}),
            groups=32,
        )
        vocab, dim = c["embeddings.token_embedding.weight"]
        clip = CLIPConfig(
            vocab_size=vocab,
            max_len=c["embeddings.position_embedding.weight"][0],
            dim=dim,
            layers=len({k.split(".")[2] for k in c if k.startswith("encoder.layers.")}),
            heads=dim // 64,  # CLIP's heads are 64 wide (ViT-L/14: 768 / 64 = 12)
            mlp_dim=c["encoder.layers.0.mlp.fc1.weight"][0],
        )
    except (KeyError, ValueError, ZeroDivisionError) as e:
        raise DrpError(f"{name} is not a complete SD 1.x checkpoint (cannot read its structure: {e} is "
                       "missing); convert an SD 1.4/1.5 checkpoint.") from None
    return {"unet": unet, "vae": vae, "text_encoder": clip}
