"""A job file (JSONL or CSV, one request per row) -> the images to make, each with its id, seed and
fingerprint fixed, and the rows that cannot be made, with their row numbers and the reason.

    job = read_job(Path("prompts.jsonl"), job_seed=0, model_hash="e1226bfd1c")
    job.items        # [Item]: one per image (a grid row gives several), in file order
    job.bad          # [BadRow]: row number, id, message
    job.grids        # [GridRow]: rows with a 1-D or 2-D grid, for their contact sheets

Row numbers are line numbers in the file (a CSV's header is line 1). JSONL: one JSON object per line,
blank lines skipped. CSV: a header of column names; a cell holding a JSON array (`[1, 2, 3]`,
`["a cat", "a dog"]`) is a list, so a grid axis. In both, an empty or null value is an absent column.
Every request is built once here (init images read, LoRA names looked up) so that bad rows are reported
before anything runs.
"""

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters.library import Loras
from .fields import RowError, canonical_name, check_loras, request_of
from .grid import Axis, canonical_row, points, split_axes
from .ids import check_explicit_id, derived_seed, fingerprint, point_id, row_id

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}


class JobError(ValueError):
    """The job as a whole cannot run (no such file, an unknown format, no header): nothing is made."""


@dataclass(frozen=True)
class Item:
    """One image to make."""
    row: int                  # the row's line number in the job file
    id: str                   # its file is ID.png
    base_id: str              # the row's id (without the grid point)
    fields: dict              # canonical column -> value of this image, its seed included
    fingerprint: str

    def to_json(self) -> str:
        return json.dumps({"row": self.row, "id": self.id, "base_id": self.base_id, "fields": self.fields,
                           "fingerprint": self.fingerprint})

    @classmethod
    def from_json(cls, text: str) -> "Item":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class BadRow:
    row: int
    id: str | None
    message: str


@dataclass(frozen=True)
class GridRow:
    """A row whose grid has one or two axes: its contact sheet's layout."""
    row: int
    base_id: str
    axes: tuple[Axis, ...]
    ids: tuple[str, ...]      # every point's id, the last axis varying fastest


@dataclass
class Job:
    path: Path
    items: list[Item] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    grids: list[GridRow] = field(default_factory=list)


def read_rows(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """(line number, values as written, None) per row, or (line number, None, why it cannot be read)."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise JobError(f"job file {path}: use a .jsonl (one JSON object per line) or a .csv file")
    try:
        text = path.read_text(encoding="utf-8-sig")         # -sig: spreadsheets write a byte-order mark
    except FileNotFoundError:
        raise JobError(f"job file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise JobError(f"job file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise JobError(f"cannot read job file {path}: {e.strerror}") from None
    return _jsonl_rows(text) if kind == "jsonl" else _csv_rows(path, text)


def _jsonl_rows(text: str):
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as e:
            rows.append((number, None, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(values, dict):
            rows.append((number, None, f"a row is a JSON object such as {{\"prompt\": \"a cat\"}}, got "
                                       f"{type(values).__name__}"))
            continue
        rows.append((number, values, None))
    return rows


def _csv_rows(path: Path, text: str):
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = next(reader)
    except StopIteration:
        raise JobError(f"job file {path} is empty: a CSV job needs a header of column names") from None
    except csv.Error as e:
        raise JobError(f"job file {path}, line 1: {e}") from None
    names = [name.strip() for name in header]
    if "prompt" not in [n.lower() for n in names]:
        raise JobError(f"job file {path}: the CSV header ({', '.join(names)}) has no 'prompt' column")
    rows, start = [], reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.append((start, None, f"not valid CSV ({e})"))
            start = reader.line_num + 1
            continue
        number, start = start, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(names):
            rows.append((number, None, f"{len(cells)} cells for {len(names)} columns (a comma inside a value "
                                       "needs the value in double quotes)"))
            continue
        rows.append((number, {n: _cell(c) for n, c in zip(names, cells) if c.strip()}, None))
    return rows


def _cell(text: str):
    """A CSV cell: a JSON array is a list (a grid axis, or LoRAs); anything else is the text itself."""
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return text                    # e.g. A1111 prompt editing: "[cat:dog:10]"
        if isinstance(value, list):
            return value
    return text


def read_job(path: Path, *, job_seed: int = 0, model_hash: str | None = None,
             loras: Loras | None = None) -> Job:
    """Every image of the job, validated; `model_hash` goes into the fingerprints, `loras` finds LoRA names."""
    path = Path(path)
    job, base_dir = Job(path), path.resolve().parent
    library = loras if loras is not None else Loras()
    seen: dict[str, int] = {}                  # id -> the row that has it
    for number, values, problem in read_rows(path):
        if problem is not None:
            job.bad.append(BadRow(number, None, problem))
            continue
        try:
            named = _canonical_names(values)
            fixed, axes = split_axes(named)
            base = check_explicit_id(fixed["id"]) if "id" in fixed else row_id(canonical_row(fixed, axes))
            grid_points = points(fixed, axes)
        except (RowError, ValueError) as e:
            explicit = values.get("id") if isinstance(values.get("id"), str) else None
            job.bad.append(BadRow(number, explicit, str(e)))
            continue
        ids = []
        for point in grid_points:
            item_id = point_id(base, list(point.parts))
            ids.append(item_id)
            fields = {k: v for k, v in point.fields.items() if k != "id"}
            fields.setdefault("seed", derived_seed(job_seed, base))
            if item_id in seen:
                job.bad.append(BadRow(number, item_id, _duplicate(item_id, seen[item_id], "id" in fixed)))
                continue
            try:
                check_loras(request_of(fields, base_dir), library)
            except ValueError as e:              # RowError, the Request's own checks, ImageError
                job.bad.append(BadRow(number, item_id, str(e)))
                continue
            seen[item_id] = number
            job.items.append(Item(number, item_id, base, fields, fingerprint(fields, model_hash)))
        if 1 <= len(axes) <= 2:
            job.grids.append(GridRow(number, base, tuple(axes), tuple(ids)))
    return job


def _canonical_names(values: dict) -> dict:
    named: dict[str, object] = {}
    for written, value in values.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue              # an empty value is an absent one, as an empty CSV cell
        name = canonical_name(written)
        if name in named:
            raise RowError(f"column {written!r} says again what another column of the row says ({name})")
        named[name] = value
    return named


def _duplicate(item_id: str, first_row: int, explicit: bool) -> str:
    if explicit:
        return f"id {item_id} is also row {first_row}'s: give every row its own id"
    return (f"the row repeats row {first_row} exactly (same derived id {item_id}), so it would make the same "
            "image again; give it its own id or seed")

