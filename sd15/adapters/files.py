"""LoRA and LyCORIS files: read without running anything, their modules matched to ours.

    adapter = read_adapter("loras/add_detail.safetensors", index)
    adapter.modules          # {(component, our module path): {part: tensor}}
    adapter.unmatched        # the file's module names that match none of this model's

Pickled files (`.pt`, `.ckpt`, `.bin`) go through the restricted unpickler like checkpoints. Files for
another model family are refused by name: SDXL (`lora_te2_`, metadata `ss_base_model_version`), SD 2.x
(`ss_v2`, 1024-wide cross-attention or text layers). Adapter kinds sd15 does not implement (OFT, GLoRA,
IA3, full-weight diffs) are refused with their name; a file that matches none of the model's modules too.
`hash` is A1111's "Lora hashes" value: for safetensors the sha256 of the file after its header (the
kohya / additional-networks hash), for other files of the whole file; 12 hex digits.
"""

import hashlib
import os
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files.errors import CheckpointError
from ..files.readers import read_checkpoint_file
from .deltas import Factors, kind_of
from .names import TEXT, UNET, ModuleIndex, our_module, split_key

UNSUPPORTED_PARTS = {"oft_blocks": "OFT/BOFT", "oft_diag": "OFT/BOFT", "a1.weight": "GLoRA", "a2.weight": "GLoRA",
                     "b1.weight": "GLoRA", "b2.weight": "GLoRA", "on_input": "IA3", "diff": "a full-weight diff",
                     "diff_b": "a full-weight diff", "w_norm": "a norm adapter", "b_norm": "a norm adapter",
                     "weight": "IA3 or a full-weight diff", "bias": "a bias diff"}


@dataclass(frozen=True, eq=False)
class AdapterFile:
    name: str                                    # the file name without extension: what <lora:NAME> calls it
    path: Path
    hash: str                                    # A1111's "Lora hashes" value, 12 hex digits
    modules: dict[tuple[str, str], Factors]      # (unet | text_encoder, our module path) -> its parts
    metadata: dict[str, str] = field(default_factory=dict)
    unmatched: tuple[str, ...] = ()              # the file's module names that none of ours is

    @property
    def kinds(self) -> list[str]:
        return sorted({kind_of(f) + ("+DoRA" if "dora_scale" in f else "") for f in self.modules.values()})

    def __repr__(self) -> str:
        return f"AdapterFile({self.name!r}, {len(self.modules)} modules, {'/'.join(self.kinds)})"


def adapter_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix.lower() == ".safetensors" and len(head) == 8:
            f.seek(8 + struct.unpack("<Q", head)[0])        # past the JSON header: the tensors' bytes only
        else:
            digest.update(head)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def base_model(keys: list[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """'sd1', 'sd2' or 'sdxl', from kohya's metadata when it says, else from keys and shapes."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl") or any(k.startswith("lora_te2_") for k in keys) or "ss_sdxl" in version:
        return "sdxl"
    if metadata.get("ss_v2") == "True" or version.startswith("sd_v2"):
        return "sd2"
    for key, t in tensors.items():     # cross-attention k/v read a 1024- (SD2) or 2048-wide (SDXL) context
        if ("attn2" in key and ("to_k" in key or "to_v" in key) and key.endswith(("lora_down.weight", "lora_A.weight"))
                and t.dim() >= 2):
            if t.shape[1] == 1024:
                return "sd2"
            if t.shape[1] == 2048:
                return "sdxl"
    return "sd1"


def read_adapter(path: str | os.PathLike, index: ModuleIndex, name: str | None = None) -> AdapterFile:
    path = Path(path)
    raw = read_checkpoint_file(path)
    label = str(path)
    root = raw.root
    if isinstance(root, dict) and isinstance(root.get("state_dict"), dict):
        root = root["state_dict"]
    if not isinstance(root, dict) or not root:
        raise CheckpointError(f"{label}: holds no tensors, so it is not a LoRA")
    tensors = {k: v for k, v in root.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    metadata = {str(k): str(v) for k, v in (raw.metadata or {}).items()}
    family = base_model(list(tensors), tensors, metadata)
    if family != "sd1":
        what = {"sd2": "an SD 2.x LoRA", "sdxl": "an SDXL LoRA"}[family]
        raise CheckpointError(f"{label}: is {what}; this engine runs SD 1.x, whose modules it does not fit")

    grouped: dict[tuple[str, str], Factors] = defaultdict(dict)
    strays = []
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            strays.append(key)
            continue
        component, module, part = split
        if part in UNSUPPORTED_PARTS:
            raise CheckpointError(f"{label}: is {UNSUPPORTED_PARTS[part]} adapter ({key}); sd15 applies LoRA, "
                                  "LoCon, Tucker, LoHa, LoKr and DoRA")
        grouped[(component, module)][part] = tensor
    if not grouped:
        sample = ", ".join(sorted(tensors)[:4]) or "none"
        raise CheckpointError(f"{label}: not a LoRA or LyCORIS file (no key names a LoRA module; e.g. {sample})")

    modules, unmatched = {}, []
    for (component, module), factors in grouped.items():
        ours = our_module(index, component, module)
        if ours is None:
            unmatched.append(f"{'lora_unet_' if component == UNET else 'lora_te_'}{module}")
        elif kind_of(factors) == "unknown":
            raise CheckpointError(f"{label}: module {module} has parts {', '.join(sorted(factors))}, which make no "
                                  "adapter sd15 knows")
        else:
            modules[(component, ours)] = factors
    if not modules:
        raise CheckpointError(f"{label}: none of its {len(grouped)} modules is one of this SD 1.x model's "
                              f"(e.g. {', '.join(sorted(unmatched)[:3])}): a LoRA for another model?")
    return AdapterFile(name or path.name.rsplit(".", 1)[0], path, adapter_hash(path), modules, metadata,
                       tuple(sorted(unmatched)))


def describe(adapter: AdapterFile) -> list[str]:
    """The inspector's lines for a LoRA: kinds, ranks, alphas, modules, kohya metadata."""
    from .deltas import rank_of
    ranks = sorted({r for f in adapter.modules.values() if (r := rank_of(f)) is not None})
    alphas = sorted({float(f["alpha"]) for f in adapter.modules.values() if "alpha" in f})
    parts = defaultdict(int)
    for component, _ in adapter.modules:
        parts[component] += 1
    lines = [f"kind:         {' + '.join(adapter.kinds)}",
             f"modules:      {parts[UNET]} UNet, {parts[TEXT]} text encoder"
             + (f"; {len(adapter.unmatched)} unmatched" if adapter.unmatched else ""),
             f"ranks:        {', '.join(map(str, ranks)) or 'n/a'}",
             f"alphas:       {', '.join(f'{a:g}' for a in alphas) or 'none (scale 1)'}",
             f"lora hash:    {adapter.hash} (A1111's Lora hashes)"]
    kohya = {k: v for k, v in adapter.metadata.items() if k.startswith("ss_") and k != "ss_tag_frequency"}
    for key in sorted(kohya)[:24]:
        value = kohya[key]
        lines.append(f"  {key}: {value if len(value) <= 80 else value[:77] + '...'}")
    return lines
