"""Textual-inversion embeddings: the files people download (`easynegative`, `badhandv4`, ...), read
without running anything in them, and matched in the token stream by name.

    library = Embeddings(tokenizer, width=768)
    library.add(read_embedding("embeddings/easynegative.safetensors"))   # trigger: "easynegative"
    library.add_dir("embeddings/")                                        # every file below, bad ones named

Formats (each a pickle or a safetensors file; pickles go through the restricted unpickler, never
`torch.load`):
  A1111 `.pt`             {"string_to_param": {"*": [n, 768]}, "name": ..., "step": ...}; very old files
                          pickle `string_to_param` as a torch.nn.ParameterDict
  kohya `.safetensors`    {"emb_params": [n, 768]}
  diffusers `.bin`/`.safetensors`  {"<token>": [768] or [n, 768]}
  SDXL pairs              {"clip_l": [n, 768], "clip_g": [n, 1280]}: the clip_l half is SD 1.x's (as ComfyUI
                          uses it; A1111 skips such files on SD 1.x)
The trigger word is the file's name without its extension, as in A1111 (not the name stored inside), and
matching is on token ids, so it ignores case as CLIP's tokenizer does; of several names that match at a
place the longest wins. `Embedding.hash` is A1111's "TI hashes" value: the first 12 hex digits of the
file's sha256.
"""

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files.errors import CheckpointError
from ..files.readers import read_checkpoint_file
from ..files.safe_pickle import ParameterDictState
from .tokenizer import CLIPTokenizer

log = logging.getLogger("sd15")
EXTENSIONS = (".pt", ".bin", ".safetensors")
FAMILIES = {1024: "an SD 2.x embedding (1024 wide)", 1280: "an SDXL embedding (1280 wide, OpenCLIP bigG)"}


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str                 # the trigger word
    vectors: torch.Tensor     # [n, width] float32
    hash: str                 # sha256 of the file, 12 hex digits ("TI hashes")
    path: Path | None = None

    def __repr__(self) -> str:
        return f"Embedding({self.name!r}, {len(self.vectors)} vectors)"


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _vectors_of(root: object, name: str) -> torch.Tensor:
    """The [n, width] tensor of an embedding file's top-level object, whatever its format."""
    if not isinstance(root, dict):
        raise CheckpointError(f"{name}: holds a {type(root).__name__}, not an embedding")
    if "string_to_param" in root:                                   # A1111 / original LDM
        params = root["string_to_param"]
        if isinstance(params, ParameterDictState):
            params = params.parameters
        if not isinstance(params, dict) or len(params) != 1:
            raise CheckpointError(f"{name}: its string_to_param holds {len(params) if isinstance(params, dict) else 0} "
                                  "terms; an embedding file holds exactly one")
        value = next(iter(params.values()))
    elif "clip_l" in root:                                          # SDXL pair: SD 1.x's half
        value = root["clip_l"]
    else:
        tensors = {k: v for k, v in root.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            keys = ", ".join(list(map(str, root))[:6])
            raise CheckpointError(f"{name}: not a textual-inversion embedding (expected one tensor, or "
                                  f"string_to_param / emb_params / clip_l; found {keys or 'nothing'})")
        value = next(iter(tensors.values()))                         # emb_params, or a diffusers {token: tensor}
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{name}: its embedding is a {type(value).__name__}, not a tensor")
    return value


def read_embedding(path: str | os.PathLike, width: int = 768, name: str | None = None) -> Embedding:
    """One embedding file, checked: width `width` (the text encoder's), finite values, 1..75 vectors.

    Raises CheckpointError naming the problem (another family's embedding, NaNs, a pickle that would run code).
    """
    path = Path(path)
    raw = read_checkpoint_file(path)
    label = str(path)
    vectors = _vectors_of(raw.root, label)
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2:
        raise CheckpointError(f"{label}: embedding has shape {tuple(vectors.shape)}; expected [vectors, {width}]")
    if vectors.shape[1] != width:
        what = FAMILIES.get(vectors.shape[1], f"{vectors.shape[1]} wide")
        raise CheckpointError(f"{label}: is {what}; this model's text encoder takes {width}-wide embeddings "
                              "(SD 1.x: 768)")
    if not 1 <= len(vectors) <= 75:
        raise CheckpointError(f"{label}: has {len(vectors)} vectors; an embedding fits one 75-token chunk")
    vectors = vectors.detach().to(torch.float32).clone()
    if not torch.isfinite(vectors).all():
        raise CheckpointError(f"{label}: the embedding holds NaN or infinite values")
    return Embedding(name or path.name.rsplit(".", 1)[0], vectors, _file_hash(path), path)


@dataclass(frozen=True)
class EmbeddingTable:
    """One immutable set of embeddings, with the lookup by the first token id of each name."""
    by_name: dict[str, tuple[tuple[int, ...], Embedding]]          # name -> (its token ids, embedding)
    by_first_id: dict[int, tuple[tuple[tuple[int, ...], Embedding], ...]]   # longest name first

    def match(self, tokens: list[int], pos: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's token ids start at tokens[pos], and how many ids the name takes."""
        for ids, embedding in self.by_first_id.get(tokens[pos], ()):
            if tuple(tokens[pos:pos + len(ids)]) == ids:
                return embedding, len(ids)
        return None

    def __bool__(self) -> bool:
        return bool(self.by_name)


class Embeddings:
    """The embeddings a pipeline knows, by trigger word, matched on token ids.

    Each change makes a new `EmbeddingTable`; a generation takes one (`table()`) when it starts and uses
    it throughout, so adding embeddings on another thread never changes a prompt half way.
    """

    def __init__(self, tokenizer: CLIPTokenizer, width: int = 768):
        self.tokenizer, self.width = tokenizer, width
        self._table = EmbeddingTable({}, {})
        self._lock = threading.Lock()

    def table(self) -> EmbeddingTable:
        return self._table

    def __len__(self) -> int:
        return len(self._table.by_name)

    def __contains__(self, name: str) -> bool:
        return name in self._table.by_name

    def __getitem__(self, name: str) -> Embedding:
        return self._table.by_name[name][1]

    def names(self) -> list[str]:
        return sorted(self._table.by_name)

    def match(self, tokens: list[int], pos: int) -> tuple[Embedding, int] | None:
        return self._table.match(tokens, pos)

    def add(self, embedding: Embedding) -> None:
        vectors = embedding.vectors
        if vectors.dim() != 2 or vectors.shape[1] != self.width:
            raise ValueError(f"embedding {embedding.name!r} has shape {tuple(vectors.shape)}; this model takes "
                             f"[vectors, {self.width}]")
        if not 1 <= len(vectors) <= 75:
            raise ValueError(f"embedding {embedding.name!r} has {len(vectors)} vectors; it must fit one 75-token "
                             "chunk (1 to 75)")
        ids = tuple(self.tokenizer.encode(embedding.name))
        if not ids:
            raise ValueError(f"embedding name {embedding.name!r} has no tokens to match")
        with self._lock:
            old = self._table
            by_name = dict(old.by_name)
            replaced = by_name.pop(embedding.name, None)
            by_name[embedding.name] = (ids, embedding)
            by_first = dict(old.by_first_id)
            if replaced is not None:            # a name given again: the new file takes its place
                first = replaced[0][0]
                by_first[first] = tuple(e for e in by_first[first] if e[1] is not replaced[1])
            by_first[ids[0]] = tuple(sorted((*by_first.get(ids[0], ()), (ids, embedding)), key=lambda e: -len(e[0])))
            self._table = EmbeddingTable(by_name, by_first)

    def add_file(self, path: str | os.PathLike, name: str | None = None) -> Embedding:
        embedding = read_embedding(path, self.width, name)
        self.add(embedding)
        return embedding

    def add_dir(self, folder: str | os.PathLike) -> list[tuple[Path, str]]:
        """Every embedding file below `folder`; the ones that cannot be used are logged and returned."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"embeddings folder {folder} does not exist or is not a folder")
        images = [p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".webp", ".jxl", ".avif")
                  and not p.name.endswith(".preview.png")]
        if images:
            log.warning("%s: %d image file(s) not read: embeddings stored inside images (A1111's) are not "
                        "supported", folder, len(images))
        skipped = []
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()):
            try:
                self.add_file(path)
            except (CheckpointError, ValueError) as e:
                skipped.append((path, str(e)))
                log.warning("embedding skipped: %s", e)
        return skipped
