"""Stable ids, seeds and fingerprints of a job's images: fixed before anything runs, so a re-run, a resume
and a run spread over many machines all make the same image under the same name.

    base = row_id(canonical_row)              # a row without an explicit id: 12 hex digits of its content
    seed = derived_seed(job_seed=0, base_id=base)
    print(fingerprint(fields, model_hash))    # what the manifest keeps to notice a changed row

- **Id**: the row's `id`, else the first 12 hex digits of the sha256 of the row's canonical JSON (canonical
  column names and typed values, keys sorted, no whitespace, UTF-8): the same row gives the same id from a
  CSV or a JSONL file. A grid point appends `.AXIS=VALUE` per axis (`sunset.seed=1.cfg=7.5`).
- **Seed**: a row's `seed`, else `int.from_bytes(sha256(f"{job_seed}/{base_id}".encode()).digest()[:4], "big")`
  (a 32-bit seed, like A1111's). It derives from the row's id without the grid point, so the points of a
  grid share their seed (A1111's X/Y/Z plot), unless seed is an axis.
- **Fingerprint**: 16 hex digits of the sha256 of the canonical JSON of {"fields": the point's values with
  its seed, "model": the checkpoint's hash}. It does not cover the contents of init images or LoRA files.
"""

import hashlib
import json
import re

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,119}$")
MAX_ID = 200                     # characters: a file name (id + ".png") stays well under 255 bytes
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,31}$")


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_explicit_id(value) -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ValueError(f"id {value!r} cannot name a file: use 1 to 120 letters, digits and . _ - = +, "
                         "starting with a letter or digit")
    return value


def row_id(canonical_row: dict) -> str:
    return _sha(canonical_json(canonical_row))[:12]


def value_labels(values: list) -> list[str]:
    """How each value of a grid axis is written in ids: as itself when short and safe for file names
    (spaces become _), else "h" + 8 hex digits of its hash; hashes for the whole axis if two would collide."""
    labels = [_plain_label(v) for v in values]
    if None in labels or len(set(labels)) != len(labels):
        labels = ["h" + _sha(canonical_json(v))[:8] for v in values]
    return labels


def _plain_label(value) -> str | None:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str) and _SAFE_VALUE.match(value.replace(" ", "_")):
        return value.replace(" ", "_")
    return None


def point_id(base_id: str, parts: list[tuple[str, str]]) -> str:
    """base + ".key=label" per axis; a suffix that would make the name too long becomes its hash."""
    suffix = "".join(f".{key}={label}" for key, label in parts)
    if len(base_id) + len(suffix) > MAX_ID:
        suffix = ".grid=" + _sha(suffix)[:12]
    return base_id + suffix


def derived_seed(job_seed: int, base_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{job_seed}/{base_id}".encode("utf-8")).digest()[:4], "big")


def fingerprint(fields: dict, model_hash: str | None) -> str:
    return _sha(canonical_json({"fields": fields, "model": model_hash}))[:16]
