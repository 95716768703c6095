"""drp — Stable Diffusion 1.x and DRP-Diff (dual-reference personalization), from scratch.

    import drp
    sd = drp.load("weights")
    result = drp.generate(sd, "a cat on the beach, in the style of a painting",
                          content="cat.png", subject="cat", style="painting.jpg")
    result.images[0].save("out.png")

Reading order: tokenizer, clip, attention, unet, vae, ddim, sampling, pipeline, dual_reference (then masks,
entropy, cache), and the plumbing: convert/keymaps (with weight_files, torch_files), model_io, images,
report, devices, png_info. The paper's mode on IP-Adapter: vision, ip_adapter, then dual_reference_ip
(with svd_keys; what both modes share is in method_common). The README's tour of drp/ lists every file;
evaluate/ (`python -m drp.evaluate`) and bench/ (`python -m drp.bench`) stand apart from the reading path.
"""

from .errors import DrpError
from .model_io import StableDiffusion, load
from .pipeline import Result, generate
from .sampling import Trajectory, invert

__all__ = ["DrpError", "StableDiffusion", "Result", "Trajectory", "load", "generate", "invert"]
