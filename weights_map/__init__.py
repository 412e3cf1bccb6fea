"""Original SD 1.x checkpoint names -> engine names: format readers, checkpoint splitting, key maps."""

from .checkpoint import SD1Checkpoint, detect_family, read_sd1_checkpoint, read_vae_file
from .errors import CheckpointError
from .hashing import sha256_short
from .readers import RawCheckpoint, read_checkpoint_file, sniff_format

__all__ = ["CheckpointError", "RawCheckpoint", "SD1Checkpoint", "detect_family", "read_checkpoint_file",
           "read_sd1_checkpoint", "read_vae_file", "sha256_short", "sniff_format"]
