"""Original SD 1.x checkpoint files -> engine names: format readers, checkpoint splitting, remapping.

The key maps themselves live in `sd15.models.keymap`, next to the modules they name.
"""

from .checkpoint import SD1Checkpoint, detect_family, read_sd1_checkpoint, read_vae_file
from .errors import CheckpointError
from .hashing import sha256_short
from .readers import RawCheckpoint, read_checkpoint_file, sniff_format

__all__ = ["CheckpointError", "RawCheckpoint", "SD1Checkpoint", "detect_family", "read_checkpoint_file",
           "read_sd1_checkpoint", "read_vae_file", "sha256_short", "sniff_format"]
