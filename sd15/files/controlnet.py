"""A ControlNet file -> the control model's original-layout tensors (keys as in `cldm.py`'s `ControlNet`).

Layouts in the wild (reference notes, ControlNet section 2.2):
- v1.1 `control_v11*_sd15_*.pth`: the control model alone, every key under `control_model.`;
- v1.0 `control_sd15_*.pth`: a whole `ControlLDM`, the `control_model.*` keys beside a full SD 1.5
  (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`), which is ignored;
- pruned / fp16 `.safetensors` (`extract_controlnet.py`): the same keys with no prefix.

Read through the safe readers (no pickle code ever runs). Other kinds are named and refused: SD 2.x and
SDXL ControlNets, T2I-Adapters, control-LoRAs, diffusers-format files, and plain SD checkpoints.
A "difference" file (a `difference` key; control_model.* holds control minus SD 1.5) is read as the
others and marked: its loader adds the controlled UNet's weights. Key names inside the control model are checked by `remap` when it is built.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .checkpoint import _is_ignored, _sample, _shapes, state_from_raw
from .errors import CheckpointError
from .readers import read_checkpoint_file

CONTROL = "control_model."
SD_PARTS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")
# What the control model holds beyond the UNet encoder it copies.
CONTROL_ONLY = ("input_hint_block.", "zero_convs.", "middle_block_out.")


@dataclass
class ControlNetState:
    tensors: dict       # keys as in cldm.py's ControlNet: 'input_hint_block.0.weight', 'zero_convs.3.0.bias', ...
    quirks: list        # human-readable notes on what was found and normalised
    format: str = ""    # "safetensors" | "torch-zip" | "torch-legacy"
    difference: bool = False   # the encoder tensors are deltas against the SD 1.5 UNet (Mikubill's extract_controlnet_diff)
    metadata: dict = field(default_factory=dict)


def _refusal(state: Mapping[str, object], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why this file is not an SD 1.x ControlNet in the original layout, or None if it may be one."""
    keys = list(state)

    def has(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    if "lora_controlnet" in state or has("lora_controlnet"):
        return ("is a Control-LoRA (stabilityai/control-lora, an SDXL ControlNet stored as LoRA deltas on the base "
                "UNet); this engine runs SD 1.x ControlNets only")
    if has("label_emb.") or has("add_embedding.") or 2048 in _contexts(shapes):
        return "is an SDXL ControlNet; this engine runs SD 1.x ControlNets only"
    if 1024 in _contexts(shapes) or any(k.endswith(".proj_in.weight") and len(s) == 2 for k, s in shapes.items()):
        return ("is a Stable Diffusion 2.x ControlNet (1024-wide cross-attention / linear transformer projections); "
                "this engine runs SD 1.x ControlNets only")
    if (any(k.startswith(("adapter.", "body.", "backbone.")) for k in keys) or has("style_embedding")
            or ("conv_in.weight" in state and not has("input_blocks."))):
        return ("is a T2I-Adapter (TencentARC), not a ControlNet; T2I-Adapters are not supported")
    if has("controlnet_cond_embedding.") or has("controlnet_down_blocks."):
        return ("holds a diffusers-format ControlNet (controlnet_cond_embedding/down_blocks...); this engine loads "
                "the original layout (control_model.* or the pruned input_hint_block/zero_convs/... file)")
    return None


def _contexts(shapes: Mapping[str, tuple[int, ...]]) -> set[int]:
    return {s[1] for k, s in shapes.items() if k.endswith(("attn2.to_k.weight", "attn2.to_k.lora_down.weight"))
            and len(s) == 2}


def controlnet_from_state(name: str, fmt: str, state: Mapping[str, object], quirks: list[str]) -> ControlNetState:
    """read_controlnet after the file is read: refuse other kinds, strip the prefix, drop a bundled SD model."""
    why = _refusal(state, _shapes(state))
    if why:
        raise CheckpointError(f"{name}: {why}")
    difference = "difference" in state
    if difference:
        state = {k: v for k, v in state.items() if k != "difference"}
        quirks.append("a 'difference' ControlNet: its encoder holds deltas, added to the controlled UNet's weights")
    if any(k.startswith(CONTROL) for k in state):
        bundled = [k for k in state if k.startswith(SD_PARTS)]
        rest = [k for k in state if not k.startswith(CONTROL) and not k.startswith(SD_PARTS) and not _is_ignored(k)]
        if rest:
            raise CheckpointError(f"{name}: has {len(rest)} keys beside control_model.* that belong to no "
                                  f"ControlNet file: {_sample(rest)}")
        if bundled:
            quirks.append(f"a v1.0 ControlLDM file: took control_model.* and ignored the {len(bundled)} tensors "
                          "of the Stable Diffusion model bundled with it")
        quirks.append("keys under 'control_model.' (the original layout): prefix removed")
        control = {k[len(CONTROL):]: t for k, t in state.items() if k.startswith(CONTROL)}
    else:
        if any(k.startswith(SD_PARTS) for k in state):
            raise CheckpointError(f"{name}: is a Stable Diffusion checkpoint, not a ControlNet (no control_model.*, "
                                  "input_hint_block.* or zero_convs.* keys)")
        control = {k: t for k, t in state.items() if not _is_ignored(k)}
    if not any(k.startswith(CONTROL_ONLY[0]) for k in control) or not any(k.startswith(CONTROL_ONLY[1]) for k in control):
        raise CheckpointError(f"{name}: not a ControlNet: no input_hint_block.* / zero_convs.* tensors "
                              f"({len(control)} entries, e.g. {_sample(control, 4)})")
    bad = [k for k, t in control.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{name}: ControlNet entries that are not tensors: {_sample(bad)}")
    return ControlNetState(control, quirks, fmt, difference=difference)


def read_controlnet(path: str | os.PathLike[str]) -> ControlNetState:
    """Read an SD 1.x ControlNet file (.safetensors / .pth, prefixed or pruned) into its control model's tensors."""
    raw = read_checkpoint_file(path)
    fmt, state, quirks = state_from_raw(raw)
    out = controlnet_from_state(str(path), fmt, state, quirks)
    out.metadata = dict(raw.metadata or {})
    return out
