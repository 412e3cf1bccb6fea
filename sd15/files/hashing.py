"""File hashes people use to identify a checkpoint."""

import hashlib
import os

from .errors import CheckpointError


def sha256_short(path: str | os.PathLike[str], length: int = 10, chunk_bytes: int = 1 << 20) -> str:
    """First `length` hex digits of the file's sha256: A1111's "Model hash" (AutoV2) at length 10."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
    except OSError as e:
        raise CheckpointError(f"{os.fspath(path)}: cannot read file: {e.strerror or e}") from None
    return digest.hexdigest()[:length]


def legacy_hash(path: str | os.PathLike[str]) -> str:
    """A1111's old short hash (8 hex digits): sha256 of the 64 KiB at offset 1 MiB. The ControlNet extension
    still names its models by it ("control_v11p_sd15_canny [d14c016b]")."""
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    except OSError as e:
        raise CheckpointError(f"{os.fspath(path)}: cannot read file: {e.strerror or e}") from None
