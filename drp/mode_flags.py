"""Which DRP-Diff mode a command line runs, and which of its flags belong to which mode (sample.py).

DRP-Diff has two modes (drp/method_common.py), each with knobs of its own. sample.py decides the mode
before any weights are read, as `drp.generate` will (`planned_mode`: `--mode auto` is the IP-Adapter
mode when its files are converted into the weights folder), and then refuses a flag of the mode that
does not run with a sentence naming the flag and its mode, never ignoring it: `--rank-energy` where
`auto` chose self-attention because IP-Adapter's files are missing (the sentence says how to get them),
`--layers` in the IP-Adapter mode, any DRP-Diff flag without a reference. `--switch-step`,
`--fixed-switch` and `--subject` belong to both modes. The IP-Adapter mode's knobs are then checked by
`dual_reference_ip.check_options`, against the layer names of the UNet in the folder.

`args` is sample.py's argparse namespace; a flag not given is None there.
"""

from .dual_reference_ip import Options as IPOptions
from .dual_reference_ip import check_options
from .errors import DrpError
from .ip_adapter import attn2_layers
from .method_common import check_switch_step
from .model_io import ip_component_converted, read_model_json

# Each DRP-Diff mode's own flags, by their argparse names.
IP_FLAGS = ("rank_energy", "rank_rule", "floor", "power", "scale_early", "scale_late", "late", "no_bg_prompt",
            "bg_placeholder", "ip_layers", "filter_values")
SELF_ATTENTION_FLAGS = ("layers", "no_masks", "style_caption", "content_mask", "style_mask", "cache_dir", "no_cache")
BOTH_MODES_FLAGS = ("switch_step", "fixed_switch")  # --subject too, which warns where nothing uses it


def ip_files_missing(weights, fetching=()):
    """The IP-Adapter files that `convert_weights.py --download ip-adapter` would add to `weights`; none when
    this run's first-run download (`fetching`, drp/first_run.py) brings them."""
    if "ip-adapter" in fetching:
        return []
    return [f"{name}.json" for name in ("ip_adapter", "image_encoder") if not ip_component_converted(weights, name)]


def planned_mode(args, fetching=()):
    """The DRP-Diff mode the command will run, as drp.generate will choose it, before any weights are read or
    downloaded: (None without references, or the mode; and for --mode auto, why it chose that one)."""
    if not (args.content or args.style):
        return None, ""
    if args.mode != "auto":
        return args.mode, ""
    missing = ip_files_missing(args.weights, fetching)
    if missing:
        return "self-attention", f"--mode auto chose self-attention because {args.weights} lacks {', '.join(missing)}"
    if "ip-adapter" in fetching:
        return "ip-adapter", "--mode auto chose ip-adapter, whose files this first run downloads"
    return "ip-adapter", f"--mode auto chose ip-adapter because IP-Adapter's files are in {args.weights}"


def unet_layer_names(weights):
    """The attn2 layer names of the UNet converted in `weights` (SD 1.5's when there is none yet), from model.json."""
    try:
        return list(attn2_layers(read_model_json(weights)[1]["unet"]))
    except DrpError:  # not converted yet (the first run downloads SD 1.5), or broken: drp.load will say so
        return list(attn2_layers())


def check_mode_settings(args, mode, why=""):
    """A flag of the DRP-Diff mode that does not run is an error naming the flag and its mode, never ignored;
    the ip-adapter mode's knobs are checked as drp.generate will check them."""
    def given(names):  # --cache-dir names the folder --clear-cache empties, in any mode
        return ["--" + n.replace("_", "-") for n in names
                if getattr(args, n) is not None and not (n == "cache_dir" and args.clear_cache)]

    if mode is None:
        for flag in given(IP_FLAGS + SELF_ATTENTION_FLAGS + BOTH_MODES_FLAGS):
            raise DrpError(f"{flag} is a setting of DRP-Diff, which runs only with references; add --content or "
                           f"--style, or drop {flag}.")
        return
    if args.fixed_switch and args.switch_step is not None:
        raise DrpError("--fixed-switch and --switch-step both choose the switch step; give one of them.")
    for kind in ("content", "style"):
        if getattr(args, f"{kind}_mask") and not getattr(args, kind):
            raise DrpError(f"--{kind}-mask is the mask of --{kind}, and no --{kind} was given; add it, or drop "
                           "the mask.")
    other = "self-attention" if mode == "ip-adapter" else "ip-adapter"
    for flag in given(SELF_ATTENTION_FLAGS if mode == "ip-adapter" else IP_FLAGS):
        if not why:
            raise DrpError(f"{flag} is a setting of the {other} mode, not of --mode {mode}; drop it, or use "
                           f"--mode {other}.")
        how = ("get IP-Adapter's files with `python convert_weights.py --download ip-adapter`" if other == "ip-adapter"
               else "add --mode self-attention")
        raise DrpError(f"{flag} is a setting of the {other} mode, and {why}; {how}, or drop {flag}.")
    check_switch_step(args.switch_step, args.steps)
    if mode == "ip-adapter":  # every knob, against the UNet's layer names
        check_options(IPOptions(**ip_knobs(args)), unet_layer_names(args.weights))


def ip_knobs(args):
    """The ip-adapter mode's knobs given on the command line (drp/dual_reference_ip.py, Options); the rest default."""
    knobs = dict(rank_energy=args.rank_energy, rank_rule=args.rank_rule, floor=args.floor, power=args.power,
                 scale_early=args.scale_early, scale_late=args.scale_late, late=args.late,
                 bg_prompt=False if args.no_bg_prompt else None, bg_placeholder=args.bg_placeholder,
                 ip_layers=args.ip_layers, filter_values=args.filter_values, fixed_switch=args.fixed_switch)
    return {k: v for k, v in knobs.items() if v is not None}


def self_attention_knobs(args):
    """The self-attention mode's knobs given on the command line (drp/dual_reference.py, Options)."""
    knobs = dict(layers=args.layers, use_masks=False if args.no_masks else None, style_caption=args.style_caption,
                 cache_dir=args.cache_dir, use_cache=False if args.no_cache else None, fixed_switch=args.fixed_switch)
    return {k: v for k, v in knobs.items() if v is not None}
