"""A batch job's output folder: ID.png per image, manifest.jsonl, errors.jsonl, grids/ID.png.

    out = OutputDir(Path("outputs"))          # creates it; one run at a time (a lock file)
    out.remove_temp_files()                   # what an interrupted write left behind
    entries = out.manifest()                  # id -> Entry: the last intact line per id
    entry = out.write_image(item, png, seconds)   # the file atomically, then its manifest line
    out.record_error(row=7, id="x", message="unknown sampler ...")
    out.close()

- An image is written to a hidden temporary name in the folder, fsynced, and renamed over ID.png
  (`sd15.pipeline.png.write_atomically`), so the name only ever holds a complete PNG. Only then is its
  manifest line appended (and fsynced): a line names a file that was complete when it was written.
- manifest.jsonl: one JSON object per image made: id, file, seed, sha256 (of the PNG file), seconds (to
  make it), fingerprint (of its request: sd15.batch.ids), row (its line in the job file). A crash can
  leave at most a torn last line; reading skips it, and each run starts by rewriting the manifest
  (atomically) with one intact line per id.
- errors.jsonl: the rows that failed in the latest run: row, id, message. Each run starts it afresh.
- The writer is one process (the local runner, or the Ray driver), so lines never interleave.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..pipeline.png import TEMP_NAME, write_atomically
from .job import Item, JobError

MANIFEST, ERRORS, LOCK, GRIDS = "manifest.jsonl", "errors.jsonl", ".sd15-batch.lock", "grids"


@dataclass(frozen=True)
class Entry:
    """One manifest line."""
    id: str
    file: str
    seed: int
    sha256: str
    seconds: float
    fingerprint: str
    row: int


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class OutputDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise JobError(f"--out {self.path} exists and is not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JobError(f"cannot create output folder {self.path}: {e.strerror}") from None
        if not os.access(self.path, os.W_OK):
            raise JobError(f"cannot write to {self.path}: permission denied")
        self._lock = _lock(self.path / LOCK)
        self._manifest = None

    def close(self) -> None:
        if self._manifest is not None:
            self._manifest.close()
            self._manifest = None
        if self._lock is not None:
            os.close(self._lock)            # releases the lock
            self._lock = None

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading what is there ------------------------------------------------------------------------

    def remove_temp_files(self) -> list[str]:
        """Delete the temporary files interrupted writes left (ours only: `.NAME.<12 hex>.tmp`)."""
        removed = []
        for folder in (self.path, self.path / GRIDS):
            if folder.is_dir():
                for entry in folder.iterdir():
                    if TEMP_NAME.match(entry.name) and entry.is_file():
                        entry.unlink()
                        removed.append(entry.name)
        return removed

    def manifest(self) -> dict[str, Entry]:
        """id -> its last intact manifest line (a torn or foreign line is skipped)."""
        entries: dict[str, Entry] = {}
        path = self.path / MANIFEST
        if not path.exists():
            return entries
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = Entry(**json.loads(line))
                except (ValueError, TypeError):
                    continue
                entries[entry.id] = entry
        return entries

    def file_matches(self, entry: Entry) -> bool:
        """The entry's file is there and holds exactly the bytes the manifest recorded."""
        path = self.path / entry.file
        try:
            data = path.read_bytes()
        except OSError:
            return False
        return sha256_of(data) == entry.sha256

    # ---- writing ----------------------------------------------------------------------------------------

    def rewrite_manifest(self, entries: list[Entry]) -> None:
        """Replace the manifest (atomically) by these lines, then append to it."""
        text = "".join(json.dumps(asdict(e)) + "\n" for e in entries)
        write_atomically(self.path / MANIFEST, text.encode("utf-8"), replace=True)

    def clear_errors(self) -> None:
        (self.path / ERRORS).unlink(missing_ok=True)

    def write_image(self, item: Item, png: bytes, seconds: float) -> Entry:
        file = f"{item.id}.png"
        write_atomically(self.path / file, png, replace=True)    # replaces a broken or stale file
        entry = Entry(item.id, file, item.fields["seed"], sha256_of(png), round(seconds, 3), item.fingerprint,
                      item.row)
        if self._manifest is None:
            self._manifest = open(self.path / MANIFEST, "a", encoding="utf-8")
        _append(self._manifest, json.dumps(asdict(entry)))
        return entry

    def record_error(self, row: int, id: str | None, message: str) -> None:
        with open(self.path / ERRORS, "a", encoding="utf-8") as f:
            _append(f, json.dumps({"row": row, "id": id, "message": message}, ensure_ascii=False))

    def grid_path(self, base_id: str) -> Path:
        return self.path / GRIDS / f"{base_id}.png"

    def write_grid(self, base_id: str, png: bytes) -> Path:
        (self.path / GRIDS).mkdir(exist_ok=True)
        return write_atomically(self.grid_path(base_id), png, replace=True)


def _append(f, line: str) -> None:
    f.write(line + "\n")
    f.flush()
    os.fsync(f.fileno())


def _lock(path: Path) -> int | None:
    """An exclusive lock on the folder for this run (two runs on one folder would both redo the same rows)."""
    try:
        import fcntl
    except ImportError:            # Windows: no lock
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise JobError(f"another batch run is writing to {path.parent} (it holds {path.name}); wait for it "
                       "to finish or stop it") from None
    return fd
