"""Open a checkpoint file of any supported format, chosen by its content (never its extension).

Formats: safetensors (8-byte little-endian header length + JSON header + data), torch zip
(`PK` magic; torch >= 1.6) and legacy torch (a pickled magic number; torch < 1.6). Anything else
gets a CheckpointError that says what the file looks like instead.

Tensors come back as stored (a fp16 file gives fp16 tensors) and are memory-mapped where the format
allows (safetensors, torch zip): nothing is read from disk until a tensor is touched.
"""

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .torch_files import is_legacy_torch, read_torch_legacy, read_torch_zip

SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_SNIFF_BYTES = 4096


@dataclass
class RawCheckpoint:
    """What a file holds, before any Stable Diffusion interpretation."""

    path: str
    format: str                                   # "safetensors" | "torch-zip" | "torch-legacy"
    root: object                                  # top-level object; a dict for every real checkpoint
    metadata: dict = field(default_factory=dict)  # safetensors "__metadata__" (str -> str)


def _describe_directory(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    if (p / "model_index.json").is_file() or (p / "unet").is_dir():
        return ("is a diffusers folder (model_index.json/unet/...); this engine loads the original "
                "single-file checkpoint (.safetensors or .ckpt) instead")
    if (p / "config.json").is_file() and any(p.glob("diffusion_pytorch_model*")):
        return ("is a diffusers component folder; this engine loads the original single-file "
                "checkpoint (.safetensors or .ckpt) instead")
    return "is a directory, not a checkpoint file"


def _describe_unknown(head: bytes, size: int) -> str:
    """Say what a file that is no checkpoint looks like."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "is a PNG image, not a checkpoint"
    if head.startswith(b"\xff\xd8\xff"):
        return "is a JPEG image, not a checkpoint"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" or head[:6] in (b"GIF87a", b"GIF89a"):
        return "is an image, not a checkpoint"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return ("is a bare Python pickle, not a torch checkpoint; refusing to unpickle it "
                "(a pickle can run arbitrary code)")
    if len(head) > 262 and head[257:262] == b"ustar":
        return "is a tar archive (the pre-1.0 torch format is not supported)"
    if b"\0" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as e:
            text = head[:e.start].decode("utf-8") if e.start > len(head) - 4 else None
        if text is not None:
            if text.startswith("version https://git-lfs"):
                return ("is a Git LFS pointer, not the model itself; fetch the real file "
                        "(git lfs pull) or download it directly")
            if text.lstrip()[:15].lower().startswith(("<!doctype html", "<html")):
                return "is an HTML page, not a checkpoint (a failed download?)"
            first = text.strip().splitlines()[0][:60] if text.strip() else ""
            return f"is a text file ({size} bytes, starts {first!r}), not a checkpoint"
    if size < 9:
        return f"is only {size} bytes, too short for any checkpoint format"
    return f"is not a checkpoint format we know (first bytes: {head[:8].hex(' ')})"


def sniff_format(path: str | os.PathLike[str]) -> str:
    """Return "safetensors", "torch-zip" or "torch-legacy"; raise CheckpointError for anything else."""
    name = os.fspath(path)
    if not os.path.lexists(name):
        raise CheckpointError(f"{name}: no such file")
    if os.path.isdir(name):
        raise CheckpointError(f"{name}: {_describe_directory(name)}")
    try:
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read file: {e.strerror or e}") from None
    hint = " (named .safetensors)" if name.endswith(".safetensors") else ""
    if size == 0:
        raise CheckpointError(f"{name}: file is empty (0 bytes){hint}")
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if is_legacy_torch(head):
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        n = struct.unpack("<Q", head[:8])[0]
        if n > SAFETENSORS_MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{name}: invalid safetensors file: header length {n} "
                                  f"{'exceeds the 100 MB limit' if n > SAFETENSORS_MAX_HEADER else 'runs past the end'}"
                                  f" of a {size}-byte file (truncated or corrupt)")
        return "safetensors"
    raise CheckpointError(f"{name}: {_describe_unknown(head, size)}{hint}")


def read_checkpoint_file(path: str | os.PathLike[str]) -> RawCheckpoint:
    """Read any supported file into a RawCheckpoint (tensors mmap-backed where possible)."""
    name = os.fspath(path)
    fmt = sniff_format(name)
    size = os.path.getsize(name)
    if fmt == "safetensors":
        tensors, metadata = _read_safetensors(name)
        return RawCheckpoint(name, fmt, tensors, metadata)
    reader = read_torch_zip if fmt == "torch-zip" else read_torch_legacy
    return RawCheckpoint(name, fmt, reader(name, name, size))


def _safetensors_error(name: str, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{name}: invalid safetensors file: {type(e).__name__}: {e}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a repeated name would make the library and us disagree on which entry wins."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate tensor name {dup!r}")
    return dict(pairs)


def _check_safetensors_header(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Decode the header ourselves first so the common faults get a plain-words message."""
    with open(name, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise CheckpointError(f"{name}: invalid safetensors file: header is not valid UTF-8") from None
    except (ValueError, RecursionError) as e:
        what = str(e) if str(e).startswith("duplicate") else f"header is not valid JSON ({e})"
        raise CheckpointError(f"{name}: invalid safetensors file: {what}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: invalid safetensors file: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{name}: invalid safetensors file: __metadata__ is not an object")
    return header, metadata


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return ({name: tensor}, metadata); the safetensors library validates and mmaps the data."""
    name = os.fspath(path)
    if sniff_format(name) != "safetensors":
        raise CheckpointError(f"{name}: not a safetensors file")
    return _read_safetensors(name)


def _read_safetensors(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open  # imported here: torch files do not need it

    header, metadata = _check_safetensors_header(name)
    tensors = {}
    try:
        with safe_open(name, framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                tensors[key] = f.get_tensor(key)
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError, ValueError, TypeError (unknown dtype), OSError
        raise _safetensors_error(name, e) from None
    except BaseException as e:  # a Rust panic surfaces as pyo3's PanicException (a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise _safetensors_error(name, e) from None
    if set(keys) != set(header):
        raise CheckpointError(f"{name}: invalid safetensors file: the library and the JSON header disagree "
                              "on the tensor names")
    return tensors, {str(k): str(v) for k, v in metadata.items()}
