"""Measure the ways of casting a fp16 .safetensors into float32 tensors against their peak memory and time.

    python -m tools.measure_load_pages /tmp/sd15bench/random-sd15-fp16.safetensors [--repeats 3]

Each variant runs in a fresh subprocess (huge pages on, as the CLI runs) and reports its peak RSS above
the RSS it had after importing sd15 and torch, its wall time and its CPU time (user + system; steadier
than wall time on a shared machine). The variants (BENCHMARKS.md, "Loading", tells what they showed):

- mmap, keep:         sd15's reader (safetensors mmap), every tensor cast to float32; the fp16 pages stay
                      mapped until the end (what `sd15.load` did before `sd15.files.pages`)
- mmap + madvise:     the same, each source's pages released right after its cast (`MappedPages.release`)
- mmap + fadvise:     the same, with posix_fadvise(POSIX_FADV_DONTNEED) on the source's file range instead
- pread per tensor:   safetensors' pread backend, one fresh fp16 tensor at a time, cast, dropped
- readinto reused:    each tensor read with readinto into one reused buffer, cast from there
- sd15.load keep / sd15.load madvise: the whole load to float32 models, release switched off / on
"""

import argparse
import os
import statistics
import subprocess
import sys

VARIANTS = ("mmap, keep", "mmap + madvise", "mmap + fadvise", "pread per tensor", "readinto reused",
            "sd15.load keep", "sd15.load madvise")

SNIPPET = r"""
import sys, time, os, json, struct
import sd15.process
sd15.process.use_fast_memory()
import torch
import sd15
from sd15.files.pages import MappedPages
from sd15.files.readers import read_safetensors
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
path, variant = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
header.pop("__metadata__", None)
DTYPES = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64}
base = vm("VmRSS:")
wall, cpu = time.perf_counter(), time.process_time()
out = {}
if variant.startswith("mmap"):
    tensors, _ = read_safetensors(path)
    fd = os.open(path, os.O_RDONLY)
    with MappedPages() as pages:
        for key, t in tensors.items():
            out[key] = t.float()
            if variant == "mmap + madvise":
                pages.release(t)
            elif variant == "mmap + fadvise":
                start, end = header[key]["data_offsets"]
                os.posix_fadvise(fd, 8 + n + start, end - start, os.POSIX_FADV_DONTNEED)
    del tensors
elif variant == "pread per tensor":
    from safetensors import safe_open
    with safe_open(path, framework="pt", backend="pread") as f:
        for key in f.keys():
            out[key] = f.get_tensor(key).float()
elif variant == "readinto reused":
    biggest = max(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    buf = torch.empty(biggest, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(path, "rb", buffering=0) as f:
        for key, e in header.items():
            start, end = e["data_offsets"]
            f.seek(8 + n + start)
            f.readinto(view[:end - start])
            t = buf[:end - start].view(DTYPES[e["dtype"]]).reshape(e["shape"])
            out[key] = t.float()
else:
    if variant == "sd15.load keep":
        MappedPages.release = lambda self, tensor: 0
    out = sd15.load(path, device="cpu", dtype=torch.float32)
print(vm("VmHWM:") - base, time.perf_counter() - wall, time.process_time() - cpu)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = p.parse_args()
    size = os.path.getsize(args.path)
    runs = {v: [] for v in args.only}
    for _ in range(args.repeats):          # interleaved, so a busy spell spreads over all variants
        for v in args.only:
            out = subprocess.run([sys.executable, "-c", SNIPPET, args.path, v], check=True, capture_output=True,
                                 text=True).stdout.split()
            runs[v].append((int(out[-3]), float(out[-2]), float(out[-1])))
    print(f"{'variant':20} {'peak/file':>9} {'wall s':>7} {'cpu s':>7}   (medians of {args.repeats}; file "
          f"{size / 2**30:.2f} GiB; load average {open('/proc/loadavg').read().split()[0]})")
    for v, rs in runs.items():
        peak, wall, cpu = (statistics.median(r[i] for r in rs) for i in range(3))
        print(f"{v:20} {peak / size:9.2f} {wall:7.2f} {cpu:7.2f}")


if __name__ == "__main__":
    main()
