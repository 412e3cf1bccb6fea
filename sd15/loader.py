"""`sd15.load`: an original SD 1.x checkpoint file -> our models holding exactly its weights.

Lean by construction: modules are built on the meta device (no random initialisation of a billion
parameters), the file's tensors are renamed and checked by `weights_map`, converted to the target dtype
one tensor at a time only where they differ, and assigned into the modules without a further copy.
"""

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from weights_map.checkpoint import read_sd1_checkpoint, read_vae_file
from weights_map.errors import CheckpointError
from weights_map.keymap import text_key_map, unet_key_map, vae_key_map, vae_transforms
from weights_map.remap import remap

from .config import TextEncoderConfig, UNetConfig, VAEConfig
from .text_encoder import TextEncoder
from .unet import UNet
from .vae import VAE

# Safetensors metadata keys under which tools.make_checkpoint records non-SD1.5 (tiny) configs.
# Real checkpoints never carry them and get the SD1.5 defaults.
CONFIG_METADATA = {"unet": ("sd15.unet_config", UNetConfig),
                   "vae": ("sd15.vae_config", VAEConfig),
                   "text_encoder": ("sd15.text_encoder_config", TextEncoderConfig)}


@dataclasses.dataclass(frozen=True)
class Configs:
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # fp16 is the norm for SD on GPUs; CPUs are slow and inexact in fp16, so fp32 there.
    return torch.float16 if device.type == "cuda" else torch.float32


def configs_from_metadata(metadata: dict[str, str] | None) -> Configs:
    """Configs recorded in a safetensors header by tools.make_checkpoint, else SD1.5's."""
    found = {}
    for field, (key, cls) in CONFIG_METADATA.items():
        if metadata and key in metadata:
            values = json.loads(metadata[key])
            found[field] = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    return Configs(**found)


def configs_to_metadata(configs: Configs) -> dict[str, str]:
    return {key: json.dumps(dataclasses.asdict(getattr(configs, field)))
            for field, (key, _cls) in CONFIG_METADATA.items()}


def build(module_cls, cfg, tensors, key_map, *, component, device, dtype, transforms=None) -> nn.Module:
    """Meta-built module filled with the file's tensors: renamed, checked, cast only where needed."""
    with torch.device("meta"):
        module = module_cls(cfg)
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    state = remap(tensors, key_map, shapes, component=component, transform_names=transforms)
    for key, tensor in state.items():
        if tensor.dtype != dtype or tensor.device != device:
            state[key] = tensor.to(device=device, dtype=dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_models(path, *, vae=None, device=None, dtype=None, ema=False, configs: Configs | None = None):
    """Read `path` (and the optional separate `vae` file) into (text_encoder, unet, vae, checkpoint info)."""
    path = Path(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    ckpt = read_sd1_checkpoint(path, ema=ema, require_vae=vae is None)
    if configs is None:
        configs = configs_from_metadata(ckpt.metadata)
    vae_tensors = ckpt.vae
    if vae is not None:
        vae_tensors = read_vae_file(Path(vae))

    common = dict(device=device, dtype=dtype)
    try:
        text_encoder = build(TextEncoder, configs.text_encoder, ckpt.text_encoder,
                             text_key_map(configs.text_encoder), component="text encoder", **common)
        unet = build(UNet, configs.unet, ckpt.unet, unet_key_map(configs.unet), component="UNet", **common)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        vae_model = build(VAE, configs.vae, vae_tensors, vae_key_map(configs.vae), component="VAE",
                          transforms=vae_transforms(configs.vae), **common)
    except CheckpointError as e:
        raise CheckpointError(f"{vae if vae is not None else path}: {e}") from None
    return text_encoder, unet, vae_model, ckpt
