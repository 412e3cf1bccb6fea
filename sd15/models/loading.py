"""Checkpoint file -> our three models holding exactly its weights.

Lean by construction: modules are built on the meta device (no random initialisation of a billion
parameters), the file's tensors are renamed and checked by `sd15.files.remap`, converted to the target
dtype one tensor at a time only where they differ (each cast source's mapped file pages given back
right after: `sd15.files.pages`), and assigned into the modules without a further copy.

Configs come from the tensors' shapes (a checkpoint says how wide and deep it is, and an inpainting UNet
says it takes 9 input channels), plus two facts shapes cannot tell, the head counts and the GroupNorm
group count: SD 1.x's values, unless the file's safetensors metadata records others (the tiny random
checkpoints of `sd15.models.demo` do).
"""

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..files.checkpoint import SD1Checkpoint, read_sd1_checkpoint, read_vae_file
from ..files.controlnet import ControlNetState, read_controlnet
from ..files.errors import CheckpointError
from ..files.pages import MappedPages
from ..files.remap import remap
from .config import ControlNetConfig, TextEncoderConfig, UNetConfig, VAEConfig
from .controlnet import ControlNet
from .keymap import controlnet_key_map, text_key_map, unet_key_map, vae_key_map, vae_transforms
from .text_encoder import TextEncoder
from .unet import UNet
from .vae import VAE

# Safetensors metadata under which sd15.models.demo records its (tiny) configs: one key holding all three
# (one key, because the safetensors writer puts several in a random order, and the file's sha256, its
# "Model hash", must not change from one write to the next), or, as earlier files have it, one per network.
CONFIGS_KEY = "sd15.configs"
CONFIG_METADATA = {"unet": ("sd15.unet_config", UNetConfig),
                   "vae": ("sd15.vae_config", VAEConfig),
                   "text_encoder": ("sd15.text_encoder_config", TextEncoderConfig)}
# What shapes cannot tell; everything else is read from the tensors.
NOT_IN_SHAPES = {"unet": ("num_heads", "norm_groups"), "vae": ("norm_groups",), "text_encoder": ("num_heads",)}

Shapes = Mapping[str, tuple[int, ...]]


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


# ---- configs: recorded in metadata, read from shapes ---------------------------------------------------

def recorded_fields(metadata: Mapping[str, str] | None) -> dict[str, dict]:
    """The config fields a safetensors header records (sd15.models.demo writes them), per component."""
    metadata = metadata or {}
    combined = json.loads(metadata[CONFIGS_KEY]) if CONFIGS_KEY in metadata else {}
    found = {}
    for field, (key, _cls) in CONFIG_METADATA.items():
        values = combined.get(field) or (json.loads(metadata[key]) if key in metadata else None)
        if values is not None:
            found[field] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return found


def configs_from_metadata(metadata: Mapping[str, str] | None) -> Configs:
    """Configs recorded in a safetensors header, SD1.5's values for the fields it does not record."""
    return Configs(**{field: CONFIG_METADATA[field][1](**values)
                      for field, values in recorded_fields(metadata).items()})


def configs_to_metadata(configs: Configs) -> dict[str, str]:
    return {CONFIGS_KEY: json.dumps({field: dataclasses.asdict(getattr(configs, field)) for field in CONFIG_METADATA})}


def _count(shapes: Shapes, pattern: str) -> int:
    """How many distinct indices fill the `(\\d+)` of `pattern` among the keys."""
    regex = re.compile(pattern)
    return len({m[1] for k in shapes if (m := regex.match(k))})


def unet_config_from_shapes(shapes: Shapes, base: UNetConfig = UNetConfig()) -> UNetConfig:
    """Widths, depth, attention levels and channel counts of an original-layout UNet (keys after
    `model.diffusion_model.`); `base` supplies what shapes cannot tell. KeyError if a key it reads is missing."""
    first = shapes["input_blocks.0.0.weight"]                       # [channels, in_channels, 3, 3]
    widths, res_counts, attention_levels, res = [], [], [], 0
    for block in range(1, _count(shapes, r"input_blocks\.(\d+)\.")):
        prefix = f"input_blocks.{block}."
        if prefix + "0.op.weight" in shapes:                        # a downsampler closes the level
            widths.append(shapes[prefix + "0.op.weight"][0])
            res_counts.append(res)
            res = 0
            continue
        res += 1
        if any(k.startswith(prefix + "1.") for k in shapes) and len(widths) not in attention_levels:
            attention_levels.append(len(widths))
    widths.append(shapes[f"input_blocks.{block}.0.in_layers.2.weight"][0])
    res_counts.append(res)
    context = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), base.context_dim)
    cond_proj = shapes.get("time_embedding.cond_proj.weight")           # LCM-distilled: [channels, 256]
    return dataclasses.replace(
        base, in_channels=first[1], out_channels=shapes["out.2.weight"][0], channels=first[0],
        channel_mult=tuple(w // first[0] for w in widths), num_res_blocks=max(res_counts),
        attention_levels=tuple(attention_levels), context_dim=context,
        time_cond_proj_dim=cond_proj[1] if cond_proj is not None and len(cond_proj) == 2 else None)


def vae_config_from_shapes(shapes: Shapes, base: VAEConfig = VAEConfig()) -> VAEConfig:
    """The same for an original-layout VAE (keys after `first_stage_model.`)."""
    levels = _count(shapes, r"encoder\.down\.(\d+)\.")
    channels = shapes["encoder.conv_in.weight"][0]
    widths = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
    return dataclasses.replace(
        base, in_channels=shapes["encoder.conv_in.weight"][1], latent_channels=shapes["post_quant_conv.weight"][0],
        channels=channels, channel_mult=tuple(w // channels for w in widths),
        num_res_blocks=_count(shapes, r"encoder\.down\.0\.block\.(\d+)\."))


def text_config_from_shapes(shapes: Shapes, base: TextEncoderConfig = TextEncoderConfig(),
                            num_heads: int | None = None) -> TextEncoderConfig:
    """The same for the CLIP text model (keys after `cond_stage_model.transformer.`). Unless `num_heads`
    is given, heads are 64 wide, as in every CLIP text model (ViT-L/14's 768 = 12 x 64)."""
    vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
    hidden = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
    return dataclasses.replace(
        base, vocab_size=vocab, width=width, max_length=shapes["text_model.embeddings.position_embedding.weight"][0],
        num_layers=_count(shapes, r"text_model\.encoder\.layers\.(\d+)\."), mlp_ratio=hidden // width,
        num_heads=num_heads or max(1, width // 64))


def _widths_fit(component: str, widths: list[int], groups: int, heads: int | None = None) -> None:
    """Shapes that SD 1.x's group (and head) counts cannot divide: a model of another family or size."""
    bad = [w for w in widths if w % groups or (heads and w % heads)]
    if bad:
        what = f"{groups} GroupNorm groups" + (f" and {heads} attention heads" if heads else "")
        raise CheckpointError(f"{component}: its tensors give widths {', '.join(map(str, widths))}, which "
                              f"{what} do not divide: not an SD 1.x model of a known size (a model of another "
                              "size needs its configs: sd15.load(..., configs=...))")


def configs_from_checkpoint(ckpt: SD1Checkpoint, vae_tensors: Mapping[str, torch.Tensor]) -> Configs:
    """Configs read from the tensors' shapes, with metadata (or SD1.5's values) for what shapes cannot tell.

    Where a tensor the reading needs is missing, that component keeps the recorded (or SD1.5) config, so
    the loader names the missing tensor instead of guessing a smaller model.
    """
    recorded = configs_from_metadata(ckpt.metadata)
    heads = recorded_fields(ckpt.metadata).get("text_encoder", {}).get("num_heads")
    found = {}
    for name, tensors, reader in (("unet", ckpt.unet, unet_config_from_shapes),
                                  ("vae", vae_tensors, vae_config_from_shapes),
                                  ("text_encoder", ckpt.text_encoder,
                                   lambda shapes, base: text_config_from_shapes(shapes, base, heads))):
        base = getattr(recorded, name)
        try:
            found[name] = reader({k: tuple(t.shape) for k, t in tensors.items()}, base)
        except (KeyError, IndexError, ValueError):
            found[name] = base
    configs = Configs(**found)
    unet, vae, text = configs.unet, configs.vae, configs.text_encoder
    _widths_fit("text encoder", [text.width], 1, text.num_heads)
    _widths_fit("UNet", [unet.channels * m for m in unet.channel_mult], unet.norm_groups, unet.num_heads)
    _widths_fit("VAE", [vae.channels * m for m in vae.channel_mult], vae.norm_groups)
    return configs


# ---- building the models -------------------------------------------------------------------------------

def build(module_cls: type[nn.Module], cfg, tensors: Mapping[str, torch.Tensor], key_map: dict[str, str], *,
          component: str, device: torch.device, dtype: torch.dtype,
          transforms: dict[str, str] | None = None) -> nn.Module:
    """Meta-built module filled with the file's tensors: renamed, checked, cast only where needed."""
    with torch.device("meta"):
        module = module_cls(cfg)
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    state = remap(dict(tensors), key_map, shapes, component=component, transform_names=transforms)
    with MappedPages() as pages:
        for key, tensor in state.items():
            if tensor.dtype != dtype or tensor.device != device:
                state[key] = tensor.to(device=device, dtype=dtype)
                # The file's pages under the source are not needed any more: give them back now, not at the
                # end of the load (fp16 file -> float32 models: 2x the file at the peak instead of 3x).
                pages.release(tensor)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_models(path: str | Path, *, vae: str | Path | None = None, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None, ema: bool = False, configs: Configs | None = None,
                ) -> tuple[TextEncoder, UNet, VAE, SD1Checkpoint]:
    """Read `path` (and the optional separate `vae` file) into (text_encoder, unet, vae, checkpoint info)."""
    path = Path(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    ckpt = read_sd1_checkpoint(path, ema=ema, require_vae=vae is None)
    vae_tensors = ckpt.vae if vae is None else read_vae_file(Path(vae))
    common = dict(device=device, dtype=dtype)
    try:
        if configs is None:
            configs = configs_from_checkpoint(ckpt, vae_tensors)
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


# ---- ControlNets ---------------------------------------------------------------------------------------

def _added_to_unet(path: Path, tensors: dict, unet: UNet) -> dict:
    """A difference file's tensors plus the UNet's under the same original names (every key the UNet has:
    its encoder copy; the hint network and zero convs are the ControlNet's own), summed in float32."""
    names, ours = unet_key_map(unet.cfg), unet.state_dict()
    out = {}
    for key, t in tensors.items():
        if key in names:
            base = ours[names[key]]
            if tuple(base.shape) != tuple(t.shape):
                raise CheckpointError(f"{path}: difference tensor {key} has shape {tuple(t.shape)}, the UNet's "
                                      f"{tuple(base.shape)}: it was not made against this kind of UNet")
            t = t.float() + base.detach().float().cpu()
        out[key] = t
    return out


def controlnet_config_from_shapes(shapes: Shapes, base: UNetConfig = UNetConfig()) -> ControlNetConfig:
    """The encoder copy's config as `unet_config_from_shapes` reads a UNet's (a ControlNet has no output head:
    the UNet it controls predicts as many channels as it takes), and the hint network's widths."""
    first = shapes["input_blocks.0.0.weight"]
    unet = unet_config_from_shapes({**shapes, "out.2.weight": (first[1],)}, base)
    convs = sorted(int(k.split(".")[1]) for k in shapes if re.fullmatch(r"input_hint_block\.\d+\.weight", k))
    # Convs 0, 4, 8, ... open a width (the first, then each stride-2 conv); the last one leads to the UNet's.
    widths = tuple(shapes[f"input_hint_block.{i}.weight"][0] for i in convs[:-1:2])
    return ControlNetConfig(unet=unet, hint_channels=shapes[f"input_hint_block.{convs[0]}.weight"][1],
                            hint_widths=widths)


def load_controlnet(path: str | Path, *, unet: UNet | UNetConfig | None = None,
                    device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> tuple[ControlNet, ControlNetState]:
    """Read an SD 1.x ControlNet file into a ControlNet (and what was found in the file).

    `unet`: the UNet it will control, or its config (default SD 1.5's); it supplies what shapes cannot tell
    (head and group counts), and the ControlNet must fit it: each residual the width of the skip it joins.
    A "difference" file needs the UNet itself: its encoder tensors are added to the UNet's."""
    path = Path(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    state = read_controlnet(path)
    module, unet = (unet, unet.cfg) if isinstance(unet, UNet) else (None, unet)
    if state.difference:
        if module is None:
            raise CheckpointError(f"{path}: a 'difference' ControlNet holds its weights minus SD 1.5's: load it "
                                  "with the UNet it controls (sd15.load_controlnet(path, pipe))")
        state.tensors = _added_to_unet(path, state.tensors, module)
    base = unet if unet is not None else UNetConfig()
    try:
        try:
            cfg = controlnet_config_from_shapes({k: tuple(t.shape) for k, t in state.tensors.items()}, base)
        except (KeyError, IndexError, ValueError):
            cfg = ControlNetConfig(unet=base)      # remap names what is missing
        _widths_fit("ControlNet", [cfg.unet.channels * m for m in cfg.unet.channel_mult], cfg.unet.norm_groups,
                    cfg.unet.num_heads)
        if unet is not None:
            ours = dataclasses.replace(cfg.unet, out_channels=unet.out_channels, time_cond_proj_dim=unet.time_cond_proj_dim)
            # An inpainting UNet (9 channels in) takes a 4-channel ControlNet: it sees the latents only.
            if dataclasses.replace(ours, in_channels=unet.in_channels) != unet:
                raise CheckpointError(f"ControlNet: its encoder ({cfg.unet}) is not a copy of this UNet's ({unet})")
        model = build(ControlNet, cfg, state.tensors, controlnet_key_map(cfg), component="ControlNet",
                      device=device, dtype=dtype)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model, state
