"""The checkpoints a server offers, by name only, and switching between them.

    store = ModelStore(models_dir, initial=Path("v1-5.safetensors"), loader=load_pipeline)
    store.rows()                     # A1111's /sd-models: title "name [hash10]", filename relative to the dir
    store.switch(store.find("other.safetensors [0123456789]"))      # on the job worker: waits its turn

A client names a model; it never gives a path. Names are looked up in a listing of the models folder
(an allowlist), so `..`, absolute paths and anything else that is not a listed name are simply "not
found". The listing itself leaves out files whose real path is outside the folder (a symlink pointing
elsewhere), and nothing it returns holds a path outside the folder: `filename` is relative to it (A1111
sends absolute paths). The same containment rule serves the LoRA and embedding folders
(`contained_files`, `ContainedLoras`).

Hashes (A1111's sha256 "Model hash") are read once per file version, the loaded model's at start and
the others on a background thread, so a folder of 4 GB files does not stall a request; until a file's
hash is known its title is its bare name, as in A1111.
"""

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..adapters.library import EXTENSIONS as LORA_EXTENSIONS
from ..adapters.library import Loras

log = logging.getLogger("sd15.serve")
CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")
_REPORTED: set[Path] = set()       # links already named in the log (listings are read on every request)


def contained_files(root: Path, extensions: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(name relative to root with '/', real path) of every regular file below root with one of the
    extensions whose real path stays inside root; hidden files and links leaving root are left out."""
    root = Path(root).resolve()
    out = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(extensions):
                continue
            path = Path(folder) / name
            real = path.resolve()
            if not real.is_relative_to(root) or not real.is_file():
                if path not in _REPORTED:
                    _REPORTED.add(path)
                    log.warning("%s is left out: it links outside %s", path, root)
                continue
            out.append((path.relative_to(root).as_posix(), real))
    return out


class ContainedLoras(Loras):
    """LoRA folders whose files are only those really inside them: a prompt's <lora:name> (from anyone
    who can reach the server) cannot reach a file a symlink points to elsewhere."""

    def _files(self) -> list[Path]:
        return [real for folder in self.folders for _, real in contained_files(folder, LORA_EXTENSIONS)]


@dataclass(frozen=True)
class ModelEntry:
    name: str           # relative to the models folder ("sub/model.safetensors"), or the file name
    path: Path          # real path

    @property
    def model_name(self) -> str:
        """A1111's model_name: the name without extension, '/' as '_'."""
        return self.name.rsplit(".", 1)[0].replace("/", "_")

    @property
    def stem(self) -> str:
        return Path(self.name).stem


class HashCache:
    """sha256 of files, by (path, size, mtime): computed once per version of a file."""

    def __init__(self):
        self._known: dict[tuple, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: Path) -> tuple:
        st = path.stat()
        return (str(path), st.st_size, st.st_mtime_ns)

    def get(self, path: Path) -> str | None:
        try:
            key = self._key(path)
        except OSError:
            return None
        with self._lock:
            return self._known.get(key)

    def compute(self, path: Path) -> str | None:
        if (known := self.get(path)) is not None:
            return known
        digest = hashlib.sha256()
        try:
            key = self._key(path)
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except OSError as e:
            log.warning("cannot hash %s: %s", path, e)
            return None
        with self._lock:
            self._known[key] = digest.hexdigest()
        return self._known[key]


class ModelNotFound(ValueError):
    pass


class SwitchFailed(ValueError):
    """A model that is listed but would not load; the old one is still being served."""


class ModelStore:
    """The models folder's checkpoints, the one loaded, and the switch between them (run it on the job
    worker, so it waits for the running generation: `jobs.JobQueue`)."""

    def __init__(self, models_dir: Path | None, initial: Path, loader: Callable[[Path], object]):
        self.models_dir = Path(models_dir).resolve() if models_dir is not None else None
        self._loader = loader
        self.hashes = HashCache()
        self._lock = threading.Lock()
        self._hasher: threading.Thread | None = None
        self.initial_entry = self.current_entry = self._entry_for(Path(initial))
        self.hashes.compute(self.current_entry.path)
        self.current = loader(self.current_entry.path)

    def _entry_for(self, path: Path) -> ModelEntry:
        real = path.resolve()
        for entry in self._folder_entries():
            if entry.path == real:
                return entry
        return ModelEntry(path.name, real)       # a --ckpt outside the folder: named by its file name only

    def _folder_entries(self) -> list[ModelEntry]:
        if self.models_dir is None:
            return []
        return [ModelEntry(name, real) for name, real in contained_files(self.models_dir, CHECKPOINT_EXTENSIONS)]

    def entries(self) -> list[ModelEntry]:
        """The checkpoints in the folder (rescanned each time: A1111 needs a refresh call, we do not),
        plus the one the server started with if it lives elsewhere (--ckpt, --demo)."""
        found = self._folder_entries()
        if all(e.path != self.initial_entry.path for e in found):
            found.insert(0, self.initial_entry)
        return found

    def start_hashing(self) -> threading.Thread:
        """Hash the files not hashed yet on a background thread (one at a time, however often asked)."""
        with self._lock:
            if self._hasher is None or not self._hasher.is_alive():
                self._hasher = threading.Thread(target=lambda: [self.hashes.compute(e.path) for e in self.entries()],
                                                name="sd15-model-hashes", daemon=True)
                self._hasher.start()
            return self._hasher

    def title(self, entry: ModelEntry) -> str:
        sha = self.hashes.get(entry.path)
        return f"{entry.name} [{sha[:10]}]" if sha else entry.name

    def row(self, entry: ModelEntry) -> dict:
        sha = self.hashes.get(entry.path)
        return {"title": self.title(entry), "model_name": entry.model_name, "hash": sha[:10] if sha else None,
                "sha256": sha, "filename": entry.name, "config": None}

    def rows(self) -> list[dict]:
        return [self.row(e) for e in self.entries()]

    def find(self, name) -> ModelEntry:
        """The entry a client's name means: any of A1111's aliases (title, name, name without extension,
        model_name, hash10, sha256, "name [hash10]"). Everything else, paths included, is not found."""
        if not isinstance(name, str) or not name.strip():
            raise ModelNotFound(f"sd_model_checkpoint must be a model title, got {name!r}")
        wanted = name.strip()
        entries = self.entries()
        for entry in entries:
            sha = self.hashes.get(entry.path)
            aliases = {entry.name, entry.stem, entry.model_name, self.title(entry), entry.name.rsplit(".", 1)[0]}
            if sha:
                aliases |= {sha, sha[:10], f"{entry.name} [{sha[:10]}]"}
            if wanted in aliases:
                return entry
        shown = ", ".join(self.title(e) for e in entries) or "none"
        raise ModelNotFound(f"model {wanted!r} not found; the models are: {shown}")

    def _scrub(self, message: str, entry: ModelEntry) -> str:
        """An error message without the server's absolute paths (the loaders name the file they read)."""
        message = message.replace(str(entry.path), entry.name)
        return message.replace(str(self.models_dir), "<models>") if self.models_dir else message

    def switch(self, entry: ModelEntry) -> None:
        """Load `entry` and make it current; if it fails, the old model stays loaded and the error
        (CheckpointError, a ValueError) says why."""
        if entry.path == self.current_entry.path:
            return
        inside = self.models_dir is not None and entry.path.resolve().is_relative_to(self.models_dir)
        if not inside and entry.path != self.initial_entry.path:      # replaced by a link since it was listed
            raise ModelNotFound(f"model {entry.name!r} is no longer inside the models folder")
        log.info("loading %s", entry.name)
        try:
            pipe = self._loader(entry.path)        # raises: nothing below runs, the old model stays
        except Exception as e:
            log.warning("loading %s failed", entry.name, exc_info=e)
            why = self._scrub(str(e), entry) if isinstance(e, ValueError) else type(e).__name__
            raise SwitchFailed(f"cannot load {entry.name}: {why}; still serving {self.title(self.current_entry)}") \
                from None
        self.hashes.compute(entry.path)
        with self._lock:
            self.current, self.current_entry = pipe, entry
        log.info("now serving %s", self.title(entry))
