"""Hand a memory-mapped checkpoint's pages back to the OS once a tensor has been copied out of them.

sd15.files maps checkpoint files (safetensors, torch zip) instead of reading them: a tensor's bytes are
pages of a private file mapping, faulted in when first touched and counted in the process's RSS until
the whole mapping goes away at the end of `sd15.load`. Where the loader casts (fp16 file -> float32
models, the CPU default) or copies (CPU -> GPU) a tensor, its mapped source pages would stay resident
beside the copy: 3x the file at the peak instead of 2x. `MappedPages.release(tensor)`, called right
after the copy, drops them (madvise(MADV_DONTNEED)), so the peak is the copies plus one tensor.

Why that cannot change a number:
- On a page of a file mapping that was never written, MADV_DONTNEED only removes the page-table entry;
  the clean page stays in the page cache and the next read of the tensor faults the same bytes back.
- On anonymous memory, or on a page of a private file mapping that *was* written (copy-on-write made
  it anonymous), MADV_DONTNEED discards data: the next read would see zeros or the file's old bytes.
  So a range is released only if it lies inside a mapping of a file (/proc/self/maps) and no page of
  it is anonymous or swapped out (/proc/self/pagemap). Anything else is left alone.
Off Linux, or where /proc cannot be read, `release` does nothing: the load just keeps its old peak.

    with MappedPages() as pages:              # while the source tensors are alive
        copy = tensor.to(torch.float32)
        pages.release(tensor)                 # tensor still reads the same values afterwards
"""

import bisect
import ctypes
import mmap
import os
import sys

import numpy as np
import torch

_MADV_DONTNEED = 4                    # Linux's value (asm-generic/mman-common.h)
# /proc/self/pagemap: one little-endian 64-bit entry per virtual page (Documentation/admin-guide/mm/pagemap.rst)
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61
# A read fault on a file mapping maps more than the page it needs from the page cache: the aligned 64 KiB
# block around it ("fault-around") or, on recent kernels, the whole large folio the page is in (measured
# here, Linux 6.18: 64-512 KiB per fault on a freshly written file; folios go up to 2 MiB). So a cast maps
# pages of its neighbours too, some of them released already: a release takes the whole 2 MiB blocks the
# tensor starts and ends in (a neighbour not cast yet faults back what it needs, from the page cache).
_BLOCK = 2 << 20


def _libc_madvise():
    if sys.platform != "linux":
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return madvise


def file_mappings(maps: str = "/proc/self/maps") -> list[tuple[int, int]]:
    """Sorted (start, end) address ranges of this process's mappings that a file backs (inode != 0)."""
    ranges = []
    with open(maps) as f:
        for line in f:
            fields = line.split(maxsplit=5)   # address perms offset dev inode [path]
            if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                start, end = fields[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    ranges.sort()
    return ranges


class MappedPages:
    """madvise(MADV_DONTNEED) for the pages under tensors that live in clean file mappings.

    The process's file mappings are read once, at the first `release`: the tensors released through
    one MappedPages must be alive then (their storages keep their mappings in place, so the snapshot
    stays true for them however the rest of the address space changes). The pagemap check of every
    range is what makes a release safe in any case; the snapshot only narrows it to file mappings.
    """

    def __init__(self) -> None:
        self._madvise = _libc_madvise()
        self._starts: list[int] | None = None        # the snapshot: sorted starts, and the ranges
        self._ranges: list[tuple[int, int]] = []
        self._pagemap: int | None = None
        self.released_bytes = 0

    def close(self) -> None:
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap = None

    def __enter__(self) -> "MappedPages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _snapshot(self) -> bool:
        if self._starts is None:
            try:
                self._ranges = file_mappings()
                self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
            except OSError:   # no /proc (or a sandbox hides it): release nothing
                self._ranges, self._madvise = [], None
            self._starts = [start for start, _ in self._ranges]
        return self._madvise is not None

    def _file_mapping_around(self, start: int, end: int) -> tuple[int, int] | None:
        """The one file mapping that holds [start, end), or None."""
        i = bisect.bisect_right(self._starts, start) - 1
        return self._ranges[i] if i >= 0 and self._ranges[i][1] >= end else None

    def _all_clean_file_pages(self, first_page: int, pages: int) -> bool:
        """No page of the range is anonymous (written since it was mapped) or swapped out."""
        data = os.pread(self._pagemap, 8 * pages, 8 * first_page)
        if len(data) != 8 * pages:
            return False
        flags = np.frombuffer(data, dtype="<u8") & (_PRESENT | _SWAPPED | _FILE)
        # An untouched page (no flag) has nothing to lose; a present one must be a file's, never anonymous.
        return bool(((flags == 0) | (flags == _PRESENT | _FILE)).all())

    def release(self, tensor: torch.Tensor) -> int:
        """Drop the pages under a CPU tensor that lives in a clean file mapping; returns the bytes released.

        The 2 MiB blocks it starts and ends in go whole, neighbours' pages included: they are clean file
        pages, so a neighbour faults them back when it is read. Returns 0 (and does nothing) for anything else.
        """
        if self._madvise is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return 0
        if not self._snapshot():
            return 0
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            return 0
        mapping = self._file_mapping_around(tensor.data_ptr(), tensor.data_ptr() + nbytes)
        if mapping is None:
            return 0
        page = mmap.PAGESIZE
        # Whole fault-around blocks, within the mapping, as the cast's page faults mapped them; failing that
        # (a written page nearby), the tensor's own pages.
        for block in (_BLOCK, page):
            start = max(mapping[0], tensor.data_ptr() // block * block)
            end = min(mapping[1], -(-(tensor.data_ptr() + nbytes) // block) * block)
            if self._all_clean_file_pages(start // page, (end - start) // page):
                break
        else:
            return 0
        if self._madvise(start, end - start, _MADV_DONTNEED) != 0:
            return 0
        self.released_bytes += end - start
        return end - start
