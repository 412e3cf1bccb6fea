"""Tiny random-weight SD 1.x checkpoints in the original layout: for `--demo` runs and the tests.

The tiny family has every structural feature of SD1.5 (three UNet levels, two with attention, a VAE
with four levels, a causal CLIP) in a few MB, so a whole txt2img takes well under a second. The images
are noise: the weights are random. Files record their configs in safetensors metadata, which
`sd15.models.loading` reads back for what the shapes cannot tell (head and group counts).

    write_demo_checkpoint(Path("tiny.safetensors"))
    sd = random_state_dict(seed=0)           # {original key: tensor}, e.g. "model.diffusion_model.out.2.bias"
"""

import math
from pathlib import Path

import torch

from ..files.remap import invert_map
from .config import ControlNetConfig, TextEncoderConfig, UNetConfig, VAEConfig
from .controlnet import ControlNet
from .keymap import controlnet_key_map, text_key_map, unet_key_map, vae_key_map, vae_transforms
from .loading import Configs, configs_to_metadata
from .text_encoder import TextEncoder
from .unet import UNet
from .vae import VAE

PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
          "text_encoder": "cond_stage_model.transformer."}

TINY_UNET = UNetConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1),
                       num_heads=2, context_dim=32, norm_groups=8)
TINY_VAE = VAEConfig(channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)
TINY_TEXT = TextEncoderConfig(width=32, num_layers=2, num_heads=4)
TINY = Configs(TINY_UNET, TINY_VAE, TINY_TEXT)
TINY_CONTROLNET = ControlNetConfig(unet=TINY_UNET, hint_widths=(8, 8, 16, 16))


def tiny_metadata() -> dict[str, str]:
    return configs_to_metadata(TINY)


def random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Weights with fan-in scaling so activations stay O(1) through a deep random network."""
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    if "norm" in key and key.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return 0.05 * torch.randn(shape, generator=gen)


def random_state_dict(unet: UNetConfig = TINY_UNET, vae: VAEConfig = TINY_VAE, text: TextEncoderConfig = TINY_TEXT,
                      seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Original-layout tensors for any configs, written back through the inverted key map."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, model, key_map, transforms in (
            ("unet", UNet(unet), unet_key_map(unet), None),
            ("vae", VAE(vae), vae_key_map(vae), vae_transforms(vae)),
            ("text_encoder", TextEncoder(text), text_key_map(text), None)):
        engine = {k: random_tensor(k, tuple(v.shape), gen) for k, v in model.state_dict().items()}
        for key, tensor in invert_map(key_map, engine, transforms).items():
            out[PREFIX[name] + key] = tensor.to(dtype).contiguous()
    return out


def write_demo_checkpoint(path: Path, seed: int = 0) -> Path:
    """The tiny random checkpoint as a .safetensors file with its configs recorded."""
    from safetensors.torch import save_file
    save_file(random_state_dict(seed=seed), str(path), metadata=tiny_metadata())
    return path


def random_controlnet_state(cfg: ControlNetConfig = TINY_CONTROLNET, seed: int = 1) -> dict[str, torch.Tensor]:
    """A ControlNet's original-layout tensors, unprefixed (as pruned files are); its zero convs are random too,
    so that it changes what the UNet does."""
    gen = torch.Generator().manual_seed(seed)
    engine = {k: random_tensor(k, tuple(v.shape), gen) for k, v in ControlNet(cfg).state_dict().items()}
    return {k: t.contiguous() for k, t in invert_map(controlnet_key_map(cfg), engine).items()}


def write_demo_controlnet(path: Path, seed: int = 1) -> Path:
    """A tiny random ControlNet for the demo checkpoint, as a pruned .safetensors file."""
    from safetensors.torch import save_file
    save_file(random_controlnet_state(seed=seed), str(path))
    return path
