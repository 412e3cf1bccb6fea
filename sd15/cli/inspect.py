"""Describe a checkpoint file without running anything in it.

    python -m sd15.inspect FILE

Prints the format, model family, dtypes, parameter counts per component, EMA, the quirks found and
normalised, the file size and the short sha256 (A1111's "Model hash"). Exits 1 with one line on a
file we cannot or will not load.
"""

import argparse
import os
import sys
from collections import Counter

from ..files.checkpoint import FAMILY_PROBLEMS, detect_family, read_state, split_sd1, vae_from_state
from ..files.errors import CheckpointError
from ..files.hashing import sha256_short


def _params(tensors):
    return sum(t.numel() for t in tensors.values())


def describe(path):
    """The report's lines, or CheckpointError."""
    fmt, state, quirks = read_state(path)
    tensors = {k: t for k, t in state.items() if hasattr(t, "dtype")}
    family = detect_family({k: tuple(t.shape) for k, t in tensors.items()})
    size = os.path.getsize(path)
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
    lines = [f"file:         {path}",
             f"size:         {size / 2**20:,.1f} MiB ({size:,} bytes)",
             f"sha256:       {sha256_short(path)} (short hash = A1111 model hash)",
             f"format:       {fmt}",
             f"family:       {family}",
             f"tensors:      {len(tensors):,}",
             "dtypes:       " + ", ".join(f"{d} x{n}" for d, n in dtypes.most_common())]
    if family == "sd1":
        ckpt = split_sd1(str(path), fmt, state, quirks, require_vae=False)
        for label, part in (("unet", ckpt.unet), ("vae", ckpt.vae), ("text_encoder", ckpt.text_encoder)):
            lines.append(f"{label + ':':<14}{_params(part):,} parameters in {len(part)} tensors")
        ema = f"yes, {ckpt.ema_parameters:,} parameters (used only with ema=True)" if ckpt.has_ema else "no"
        lines.append(f"ema:          {ema}")
    elif family == "lora":
        lines += describe_lora(path, tensors)
    elif family == "sd1-vae":
        vae = vae_from_state(str(path), state, quirks)
        lines.append(f"vae:          {_params(vae):,} parameters in {len(vae)} tensors")
    else:
        lines.append(f"not loadable: {FAMILY_PROBLEMS.get(family, 'not a Stable Diffusion 1.x checkpoint')}")
    lines.append("quirks:" + ("" if quirks else "       none"))
    lines.extend(f"  - {q}" for q in quirks)
    return lines


def describe_lora(path, tensors) -> list[str]:
    """Kind, ranks, alphas, modules, base model and kohya metadata of a LoRA / LyCORIS file."""
    from ..adapters.files import base_model, describe, read_adapter
    from ..adapters.names import module_index
    from ..files.readers import read_checkpoint_file
    from ..models.config import TextEncoderConfig, UNetConfig
    metadata = {str(k): str(v) for k, v in (read_checkpoint_file(path).metadata or {}).items()}
    base = base_model(list(tensors), tensors, metadata)
    lines = [f"base model:   {dict(sd1='SD 1.x', sd2='SD 2.x', sdxl='SDXL')[base]}"]
    try:
        lines += describe(read_adapter(path, module_index(UNetConfig(), TextEncoderConfig())))
    except CheckpointError as e:
        lines.append(f"not usable:   {e}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sd15.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("file")
    args = parser.parse_args(argv)
    try:
        print("\n".join(describe(args.file)))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
