"""Process-wide settings that only a program that owns its process should make (the CLI, a server, a
benchmark): never done by `import sd15`. Importing this module imports nothing else.

    import sd15.process
    sd15.process.use_fast_memory()       # first thing, before torch is imported: both settings below
    import sd15

- `use_huge_pages`: torch's large CPU allocations in 2 MiB pages (fewer, cheaper page faults).
- `keep_freed_memory`: glibc's malloc keeps freed memory for the next allocation instead of giving it back.
"""

import ctypes
import ctypes.util
import os
import platform
import sys

_ENV = "THP_MEM_ALLOC_ENABLE"
_asked = False


def use_huge_pages() -> bool:
    """Ask torch's CPU allocator for transparent huge pages; must run before torch is imported.

    Fresh memory then faults in 2 MiB at a time instead of 4 KiB, which made a fp16 -> fp32 cast several
    times faster and a 512² VAE decode ~15 % faster on our benchmark machine (BENCHMARKS.md). Numbers are
    unaffected: only where memory comes from. torch (on Linux) reads the variable once, at an early
    allocation: an untouched 4 MiB tensor makes sure it has, then the variable is removed again so the
    process's children do not inherit it. An explicit THP_MEM_ALLOC_ENABLE=0 is respected.
    Returns whether the allocator was asked for huge pages (by this call or by the environment).
    """
    global _asked
    if sys.platform != "linux":
        return False
    if _asked or _ENV in os.environ or "torch" in sys.modules:
        return _asked or os.environ.get(_ENV) == "1"
    os.environ[_ENV] = "1"
    try:
        import torch
        torch.empty(4 << 20, dtype=torch.uint8)
        _asked = True
    finally:
        del os.environ[_ENV]
    return True


_KEEP_ENV = "SD15_KEEP_FREED_MEMORY"
_GLIBC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4          # mallopt parameters, from glibc's malloc.h
_kept = False


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory and reuse it, instead of returning it to the kernel.

    torch's CPU allocator takes every tensor from malloc, and glibc serves each large one (above 32 MiB at
    most) with a fresh mmap that it unmaps when the tensor is freed: every big activation of every model
    call faults in new, kernel-zeroed pages. With mmap off and trimming off (`mallopt`), freed memory stays
    in the heap and the next call's tensors reuse it, as PyTorch's CUDA caching allocator does on a GPU. On
    an AMD benchmark machine a 512² VAE decode (2 threads) spent 1.2-1.9 s of its ~11 CPU-s in the kernel and
    took 6.2 s; with this, no kernel time and 4.7 s; a UNet step 4.1 -> 3.9 s (BENCHMARKS.md). The price: the
    process keeps its peak heap (peak RSS of load + decode + UNet step: 7.3 -> 7.5 GB). Numbers are
    unaffected. Any time before the big allocations; it affects later ones only. glibc only; left alone
    where the user set glibc's own malloc variables, or SD15_KEEP_FREED_MEMORY=0. Returns whether it is on.
    """
    global _kept
    if _kept:
        return True
    if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or os.environ.get(_KEEP_ENV) == "0"
            or any(name in os.environ for name in _GLIBC_ENV)):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _kept


def use_fast_memory() -> dict[str, bool]:
    """`use_huge_pages()` and `keep_freed_memory()`: what the CLI, the server, the batch runner and the
    benchmarks call first. Returns what each did."""
    return {"huge_pages": use_huge_pages(), "keep_freed_memory": keep_freed_memory()}
