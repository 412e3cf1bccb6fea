"""Process-wide settings that only a program that owns its process should make (the CLI, a server, a
benchmark): never done by `import sd15`. Importing this module imports nothing else.

    import sd15.process
    sd15.process.use_huge_pages()        # first thing, before torch is imported
    import sd15
"""

import os
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
