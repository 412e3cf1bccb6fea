"""The load section of `tools.benchmark`: `sd15.load` time and peak memory against a raw read of the file.

Each load runs in a fresh subprocess that reports its peak resident memory (VmHWM) above the RSS it had
after importing torch and sd15 (its pipeline code included), and the time to load and then touch every
weight page (mmap-backed tensors are read lazily, so "loaded" alone would flatter a lazy loader).
`import sd15` is lazy: the first `sd15.load` would also import the pipeline code; that import is timed on
its own (`import_s`), before the load's clock starts, so the load time is the weights'. Linux only (/proc).
"""

import subprocess
import sys
import time
from pathlib import Path

import torch

# Huge pages before torch is imported, as the CLI does (torch reads THP_MEM_ALLOC_ENABLE once).
LOAD_SNIPPET = r"""
import sys, time
import sd15.process
sd15.process.use_fast_memory()
import sd15
import torch
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
start = time.perf_counter()
import sd15.pipeline           # the code sd15.load needs (`import sd15` is lazy): timed apart from the load
imported = time.perf_counter() - start
base = vm("VmRSS:")
start = time.perf_counter()
pipe = sd15.load(sys.argv[1], device="cpu", dtype=getattr(torch, sys.argv[2]))
loaded = time.perf_counter() - start
with torch.inference_mode():   # touch every page of every weight: mmap-backed tensors are read lazily
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        for p in m.parameters():
            p.reshape(-1)[::max(1, 4096 // p.element_size())].sum()
touched = time.perf_counter() - start
print(f"{imported} {base} {vm('VmHWM:')} {loaded} {touched}")
"""


def raw_read_seconds(path: Path, chunk=64 << 20) -> tuple[float, float]:
    """Plain reads of the whole file, after one read to warm the page cache: (into one reused 64 MiB buffer,
    into one fresh buffer of the file's size, which also pays for the new pages as a loader would)."""
    size = path.stat().st_size

    def read_reused():
        view = memoryview(bytearray(chunk))
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass

    def read_fresh():
        buf = torch.empty(size, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            view, done = memoryview(buf.numpy()), 0
            while done < size:
                done += f.readinto(view[done:done + chunk])

    read_reused()
    times = []
    for fn in (read_reused, read_fresh):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def load_rows(files: list[tuple[Path, str]], repeats: int) -> list[dict]:
    """One row per (file, dtype): the median (by load + touch time) of `repeats` fresh-process loads."""
    rows = []
    for path, dtype in files:
        print(f"  load {path.name} -> {dtype} ...", file=sys.stderr, flush=True)
        size = path.stat().st_size
        reads = [raw_read_seconds(path) for _ in range(2)]
        raw, fresh = min(r[0] for r in reads), min(r[1] for r in reads)
        runs = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, str(path), dtype], check=True,
                                 capture_output=True, text=True).stdout.split()
            imported, base, hwm = float(out[-5]), int(out[-4]), int(out[-3])
            runs.append((float(out[-1]), float(out[-2]), hwm - base, imported))
        touched, loaded, peak, imported = sorted(runs)[len(runs) // 2]
        rows.append(dict(file=path.name, dtype=dtype, file_bytes=size, raw_read_s=raw, fresh_read_s=fresh,
                         import_s=imported, load_s=loaded, load_touched_s=touched, ratio_to_read=touched / raw,
                         peak_bytes=peak, peak_to_file=peak / size))
    return rows

