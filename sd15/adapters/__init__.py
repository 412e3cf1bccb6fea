"""Adapters: LoRA and LyCORIS files (LoRA, LoCon, Tucker, LoHa, LoKr, DoRA) applied to the models.

names (file keys -> our modules, through the key map), files (reading, refusing other families),
deltas (ΔW of each kind, in float32), apply (merged with exact restore, kept merged between generations, or on the fly), library
(LoRA folders, prompt tags, the CLI's FILE:W:UNET_W).
"""

from .apply import KeptMerge, Use, merged, on_the_fly
from .files import AdapterFile, read_adapter
from .library import LoraSpec, Loras, spec_from_tag

__all__ = ["AdapterFile", "KeptMerge", "LoraSpec", "Loras", "Use", "merged", "on_the_fly", "read_adapter", "spec_from_tag"]
