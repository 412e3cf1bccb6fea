"""sd15: a Stable Diffusion 1.x inference engine written by hand in PyTorch.

    import sd15
    pipe = sd15.load("v1-5-pruned-emaonly.safetensors")
    image = pipe.txt2img("a lighthouse at dusk, oil painting", seed=42)[0]
"""

import os
import sys

# Transparent huge pages for torch's large CPU allocations (>= 2 MiB): fresh memory then faults in
# 2 MiB at a time instead of 4 KiB, which made a 512² VAE decode ~15 % faster and a fp16 -> fp32 cast
# ~5x faster on the benchmark machine (BENCHMARKS.md). torch (on Linux) reads the variable once, at an
# early allocation, so this only takes effect when sd15 is imported before torch (the CLI always is); an
# explicit THP_MEM_ALLOC_ENABLE=0 is respected. Numbers are unaffected: only where memory comes from.
# An untouched 4 MiB tensor makes sure torch has read it; then it is removed again, so the user's child
# processes do not inherit it.
# `huge_pages` says whether torch's allocator was asked for them (by sd15, or by the user's environment).
huge_pages = sys.platform == "linux" and os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
if sys.platform == "linux" and "torch" not in sys.modules and "THP_MEM_ALLOC_ENABLE" not in os.environ:
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    try:
        import torch
        torch.empty(4 << 20, dtype=torch.uint8)
        huge_pages = True
    finally:
        del os.environ["THP_MEM_ALLOC_ENABLE"]

from pathlib import Path

import torch

from tokenizer import CLIPTokenizer
from weights_map.errors import CheckpointError

from .config import TextEncoderConfig, UNetConfig, VAEConfig
from .loader import Configs, load_models
from .pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, Pipeline
from .samplers import SAMPLERS, resolve_sampler

__all__ = ["load", "Pipeline", "CheckpointError", "Configs", "UNetConfig", "VAEConfig", "TextEncoderConfig",
           "SAMPLERS", "resolve_sampler", "DEFAULT_SAMPLER", "DEFAULT_STEPS", "DEFAULT_GUIDANCE"]


def load(path, *, vae=None, device=None, dtype=None, ema=False, configs: Configs | None = None) -> Pipeline:
    """Load an original SD 1.x checkpoint (.safetensors, .ckpt, legacy torch file) into a Pipeline.

    vae: a separate VAE file replacing the checkpoint's VAE. device: defaults to CUDA when available,
    else CPU. dtype: defaults to float16 on CUDA, float32 elsewhere. ema: take the EMA UNet weights when
    the file has them (the default follows diffusers and A1111: the regular weights).
    configs: model sizes; by default SD1.5's, or the ones a tools.make_checkpoint file records.
    Raises CheckpointError for any file that cannot or will not be loaded.
    """
    text_encoder, unet, vae_model, ckpt = load_models(path, vae=vae, device=device, dtype=dtype, ema=ema,
                                                      configs=configs)
    param = next(unet.parameters())
    return Pipeline(tokenizer=CLIPTokenizer(), text_encoder=text_encoder, unet=unet, vae=vae_model,
                    device=param.device, dtype=param.dtype, checkpoint_path=Path(path),
                    vae_path=Path(vae) if vae is not None else None, quirks=list(ckpt.quirks))
