"""Shared by the batch tests (test_batch_local.py, test_batch_ray.py): job files, reading an output folder
back, running `python -m sd15.batch` in a process of its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sd15.pipeline.png import TEMP_NAME, read_parameters

SAMPLERS = ["Euler a", "DPM++ 2M Karras", "Euler", "DDIM", "Heun"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def forty_row_job(folder: Path) -> Path:
    """40 rows: 37 plain txt2img rows (samplers, CFG, sizes, seeds explicit and derived, both seed modes),
    an img2img row, a 2 x 2 grid and one bad row: 42 images, 1 error."""
    Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)).save(folder / "start.png")
    rows = []
    for i in range(37):
        row = {"prompt": f"a lighthouse number {i}, oil painting", "steps": 3 + i % 3, "size": "64x64",
               "sampler": SAMPLERS[i % len(SAMPLERS)], "cfg": 5 + i % 4}
        if i % 3 == 0:
            row["id"] = f"row{i:02d}"
        if i % 4 == 1:
            row["seed"] = 1000 + i
        if i % 5 == 2:
            row |= {"seed_mode": "a1111", "negative": "blurry, (lowres:1.2)"}
        if i == 7:
            row["size"] = "64x96"
        rows.append(row)
    rows.append({"id": "img2img", "prompt": "the same in winter", "init_image": "start.png", "strength": 0.6,
                 "steps": 4})
    rows.append({"id": "grid", "prompt": "a fox", "steps": 3, "size": "64x64", "seed": [1, 2], "cfg": [5, 7]})
    rows.append({"id": "bad", "prompt": "x", "sampler": "Euler z"})
    return write_jsonl(folder / "forty.jsonl", rows)


def slow_job(folder: Path, count: int = 20) -> Path:
    """Images that take a while each (~0.2 s on 2 cores), to interrupt a run in the middle."""
    return write_jsonl(folder / "slow.jsonl", [{"id": f"s{i:02d}", "prompt": f"a tower {i}", "size": "128x128",
                                                 "steps": 6} for i in range(count)])


def manifest(out: Path, strict: bool = True) -> list[dict]:
    """The manifest's lines; strict=False skips a line being written (a run still going, or killed)."""
    path = out / "manifest.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line) for line in lines if strict or line.endswith("\n")]


def errors(out: Path) -> list[dict]:
    path = out / "errors.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pngs(out: Path) -> dict[str, bytes]:
    """Every PNG under the folder (grids/ included), by path relative to it."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def temp_files(out: Path) -> list[str]:
    return [p.name for p in out.rglob("*") if TEMP_NAME.match(p.name)]


def file_stamps(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of each image file: unchanged means not written again."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}


def infotexts(out: Path) -> dict[str, str]:
    return {entry["id"]: read_parameters(out / entry["file"]) for entry in manifest(out)}


def batch_command(*args) -> list[str]:
    return [sys.executable, "-m", "sd15.batch", *map(str, args)]


def batch_env(**extra) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **extra}


def run_batch(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(batch_command(*args), env=env or batch_env(), capture_output=True, text=True,
                          timeout=timeout)
