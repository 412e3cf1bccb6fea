"""Which adapters a generation uses: requests and prompt tags -> files, read once and kept.

    LoraSpec("add_detail", te=0.8, unet=0.5)        # a request's (Python `loras=`, CLI `--lora`)
    spec_from_tag(("add_detail", "0.8"))            # <lora:add_detail:0.8> in a prompt, A1111's rules
    library = Loras([Path("loras")])
    adapter = library.load(spec, index)             # AdapterFile, cached by path, size and mtime

A tag names a file by its stem, found only inside the library's folders (a prompt, which may come from a
stranger over HTTP, never names a path). A request's own spec may also be a path to a file.
"""

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .files import AdapterFile, read_adapter
from .names import ModuleIndex

EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")
TAG_KINDS = ("lora", "lyco")          # <lyco:...> is A1111's alias of <lora:...>


@dataclass(frozen=True)
class LoraSpec:
    name: str                         # a file stem in the LoRA folders, or (from a request, not a tag) a path
    te: float = 1.0                   # strength on the text encoder
    unet: float = 1.0                 # strength on the UNet
    dyn: int | None = None            # A1111's DyLoRA rank cut

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a LoRA is named by a file name or path, got {self.name!r}")
        for what in ("te", "unet"):
            value = getattr(self, what)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"LoRA {self.name!r}: the {what} strength must be a finite number, got {value!r}")
            object.__setattr__(self, what, float(value))
        if self.dyn is not None and (not isinstance(self.dyn, int) or self.dyn < 1):
            raise ValueError(f"LoRA {self.name!r}: dyn must be a positive rank, got {self.dyn!r}")

    @classmethod
    def of(cls, value) -> "LoraSpec":
        """A spec from what the Python API takes: a spec, a name, (name, w) or (name, te, unet)."""
        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls(os.fspath(value))
        if isinstance(value, (tuple, list)) and len(value) in (2, 3):
            name, te, *rest = value
            return cls(os.fspath(name), te, rest[0] if rest else te)
        raise ValueError(f"a LoRA is a name or path, (name, strength) or (name, te, unet), got {value!r}")

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """The CLI's FILE[:W[:UNET_W]] (W for both parts unless UNET_W is given)."""
        head, *numbers = text.rsplit(":", 2) if text.count(":") else (text,)
        while numbers and not _is_number(numbers[0]):      # a colon inside the path itself
            head, numbers = f"{head}:{numbers[0]}", numbers[1:]
        try:
            values = [float(n) for n in numbers]
        except ValueError:
            raise ValueError(f"--lora {text}: expected FILE[:W[:UNET_W]]") from None
        return cls(head, *(values[:1] * 2 if len(values) == 1 else values))

    def text(self) -> str:
        """As the infotext writes it: name:te:unet."""
        return f"{self.name}:{self.te:g}:{self.unet:g}"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def spec_from_tag(args: tuple[str, ...]) -> LoraSpec:
    """A1111's <lora:NAME[:TE[:UNET[:DYN]]]> with the named forms te=, unet=, dyn= (one number = both)."""
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    if not positional:
        raise ValueError(f"<lora:{':'.join(args)}> names no LoRA")
    try:
        te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
        unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
        dyn = named.get("dyn", positional[3] if len(positional) > 3 else None)
        dyn = int(dyn) if dyn is not None else None
    except ValueError:
        raise ValueError(f"<lora:{':'.join(args)}>: strengths must be numbers (<lora:name:TE:UNET>)") from None
    return LoraSpec(positional[0], te, unet, dyn)


class Loras:
    """The LoRA folders of a pipeline and the files read from them (the last few kept parsed)."""

    KEEP = 8

    def __init__(self, folders=()):
        self.folders = [Path(f) for f in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise ValueError(f"LoRA folder {folder} does not exist or is not a folder")
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return sorted({p.name.rsplit(".", 1)[0] for p in self._files()})

    def _files(self) -> list[Path]:
        return [p for folder in self.folders for p in folder.rglob("*")
                if p.suffix.lower() in EXTENSIONS and p.is_file()]

    def find(self, name: str, paths_allowed: bool) -> Path:
        """The file a spec names: a stem in the folders; or, where allowed, a path to a file."""
        if paths_allowed and (os.sep in name or "/" in name or Path(name).suffix.lower() in EXTENSIONS):
            path = Path(name)
            if not path.is_file():
                raise ValueError(f"LoRA file {path} does not exist")
            return path
        matches = [p for p in self._files() if p.name.rsplit(".", 1)[0] == name]
        if not matches:
            matches = [p for p in self._files() if p.name.rsplit(".", 1)[0].lower() == name.lower()]
        if not matches:
            where = ", ".join(map(str, self.folders)) or "no LoRA folder (pass lora_dirs= or --lora-dir)"
            raise ValueError(f"no LoRA named {name!r} in {where}")
        if len(matches) > 1:
            raise ValueError(f"LoRA name {name!r} is ambiguous: {', '.join(map(str, matches))}")
        return matches[0]

    def load(self, spec: LoraSpec, index: ModuleIndex, paths_allowed: bool = True) -> AdapterFile:
        path = self.find(spec.name, paths_allowed).resolve()
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns, id(index))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        adapter = read_adapter(path, index)
        with self._lock:
            self._cache[key] = adapter
            while len(self._cache) > self.KEEP:
                self._cache.popitem(last=False)
        return adapter
