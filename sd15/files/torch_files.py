"""Read torch.save files (zip since torch 1.6, and the older "legacy" stream) without torch.load.

The pickle goes through `safe_pickle`; every storage it references is checked against the archive
(key, dtype, size) before a tensor may view it. Zip storages are uncompressed records: we map the
whole file once, privately and lazily (`UntypedStorage.from_file(shared=False)`, what
`torch.load(mmap=True)` does), and each storage is a slice of that map, so nothing is copied and
only touched pages are read. Legacy files interleave 8-byte headers with data, so their storages
are read into fresh memory, once.
"""

import io
import mmap
import os
import re
import struct
import zipfile
from collections.abc import Callable
from typing import NoReturn

import torch

from .errors import CheckpointError
from .safe_pickle import MAX_PICKLE_BYTES, StorageRef, check_storage_type, safe_loads, scan_pickle

# Members torch.save writes (1.6 .. 2.x) besides data.pkl and data/<key>.
_ZIP_METADATA = {"version", ".data/version", "byteorder", ".format_version", ".storage_alignment",
                 ".data/serialization_id", "data/serialization_id"}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_LEGACY_HEAD = re.compile(  # PROTO, optional FRAME, LONG1 with the 10-byte magic number, STOP
    rb"\x80[\x02-\x05](\x95.{8})?\x8a\x0a" + re.escape(LEGACY_MAGIC.to_bytes(10, "little")) + rb"\.", re.DOTALL)


def is_legacy_torch(head: bytes) -> bool:
    return _LEGACY_HEAD.match(head) is not None


def _storage_id(name: str, pid: object, expected_len: int) -> tuple[torch.dtype, str, int]:
    """Check a persistent id ('storage', StorageType, key, location, numel[, view]) -> dtype, key, numel."""
    if not (isinstance(pid, tuple) and len(pid) == expected_len and pid[0] in ("storage", b"storage")):
        raise CheckpointError(f"{name}: pickle has a persistent reference that is not a storage")
    dtype = check_storage_type(name, pid[1])
    key, location, numel = pid[2], pid[3], pid[4]
    if not (isinstance(key, str) and isinstance(location, (str, bytes)) and type(numel) is int and numel >= 0):
        raise CheckpointError(f"{name}: malformed storage reference (key {type(key).__name__}, "
                              f"numel {type(numel).__name__})")
    return dtype, key, numel


def _zip_members(name: str, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{name}: zip archive lists the same member twice; refusing an ambiguous archive")
    top = names[0].split("/")[0] if names else ""
    if not top or any(not n.startswith(top + "/") for n in names):
        raise CheckpointError(f"{name}: a zip archive that is not a torch checkpoint "
                              f"(members: {', '.join(names[:5]) or 'none'})")
    members = {n[len(top) + 1:]: i for n, i in zip(names, infos)}
    if "constants.pkl" in members or any(m.startswith("code/") for m in members):
        raise CheckpointError(f"{name}: a TorchScript archive (torch.jit.save), not a checkpoint; "
                              "export the model's state_dict instead")
    if "data.pkl" not in members:
        raise CheckpointError(f"{name}: a zip archive without data.pkl, not a torch checkpoint "
                              f"(members: {', '.join(names[:5])})")
    odd = [m for m in members if m not in _ZIP_METADATA and m != "data.pkl"
           and not re.fullmatch(r"data/[^/]+", m) and not m.endswith("/")]
    if odd:
        raise CheckpointError(f"{name}: torch zip with unexpected members: {', '.join(odd[:5])}")
    return members


def read_torch_zip(path: str | os.PathLike[str], name: str, size: int) -> object:
    with open(path, "rb") as fh:
        try:
            zf = zipfile.ZipFile(fh)
            members = _zip_members(name, zf)
            if "byteorder" in members:
                with zf.open(members["byteorder"]) as f:
                    if f.read(16) != b"little":
                        raise CheckpointError(f"{name}: big-endian torch checkpoint; not supported")
            info = members["data.pkl"]
            if info.file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"{name}: data.pkl is {info.file_size} bytes; refusing a pickle over "
                                      f"{MAX_PICKLE_BYTES >> 20} MiB (a checkpoint's is well under 1 MiB)")
            with zf.open(info) as f:
                data = f.read(MAX_PICKLE_BYTES + 1)
        except CheckpointError:
            raise
        except Exception as e:  # BadZipFile, CRC errors, NotImplementedError (compression), OSError ...
            raise CheckpointError(f"{name}: corrupt zip archive: {type(e).__name__}: {e}") from None
        records = _ZipRecords(path, name, size, fh, members)
        end = scan_pickle(io.BytesIO(data), f"{name} (data.pkl)")
        return safe_loads(data[:end], name, records.load_storage)


class _ZipRecords:
    """Resolves persistent ids to slices of a private, lazy mmap of the whole file."""

    whole: torch.UntypedStorage | bool | None
    loaded: dict[str, StorageRef]  # storage key -> its validated record

    def __init__(self, path: str | os.PathLike[str], name: str, size: int, fh: io.BufferedReader,
                 members: dict[str, zipfile.ZipInfo]) -> None:
        self.path, self.name, self.size, self.fh, self.members = path, name, size, fh, members
        self.whole, self.loaded = None, {}  # whole: the file's map (None: not yet, False: cannot map)

    def _data_offset(self, key: str, info: zipfile.ZipInfo) -> int:
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
            raise CheckpointError(f"{self.name}: storage record data/{key} is compressed or encrypted; "
                                  "torch stores tensors uncompressed (re-save the file)")
        self.fh.seek(info.header_offset)
        local = self.fh.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.name}: corrupt zip: bad local header for data/{key}")
        n, m = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + n + m
        if start + info.file_size > self.size or info.compress_size != info.file_size:
            raise CheckpointError(f"{self.name}: storage record data/{key} extends past the end of the file "
                                  "(truncated download?)")
        return start

    def load_storage(self, pid: object) -> StorageRef:
        dtype, key, numel = _storage_id(self.name, pid, 5)
        if key in self.loaded:
            ref = self.loaded[key]
            if ref.dtype != dtype or ref.numel != numel:
                raise CheckpointError(f"{self.name}: storage data/{key} is referenced as both {ref.dtype} "
                                      f"x{ref.numel} and {dtype} x{numel}")
            return ref
        info = self.members.get(f"data/{key}")
        if info is None:
            raise CheckpointError(f"{self.name}: pickle references storage data/{key}, which the archive lacks")
        nbytes = numel * dtype.itemsize
        if info.file_size != nbytes:
            raise CheckpointError(f"{self.name}: storage data/{key} holds {info.file_size} bytes but the pickle "
                                  f"expects {numel} x {dtype} = {nbytes} bytes")
        start = self._data_offset(key, info)
        if self.whole is None and not start % dtype.itemsize:
            try:
                self.whole = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=self.size)
            except RuntimeError:  # a filesystem that cannot mmap: read copies instead
                self.whole = False
        if isinstance(self.whole, torch.UntypedStorage) and not start % dtype.itemsize:
            untyped = self.whole[start:start + nbytes]
        else:  # no map, or a hand-made zip without torch's alignment: copy this record
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self.fh.seek(start)
            if self.fh.readinto(buf.numpy()) != nbytes:
                raise CheckpointError(f"{self.name}: storage data/{key} is truncated")
            untyped = buf.untyped_storage()
        self.loaded[key] = ref = StorageRef(dtype, numel, untyped)
        return ref


def read_torch_legacy(path: str | os.PathLike[str], name: str, size: int) -> object:
    """The pre-1.6 stream: magic, protocol, sys_info, main pickle, storage keys, then per storage
    an 8-byte little-endian element count followed by its raw bytes."""
    declared: dict[str, tuple[StorageRef, torch.Tensor]] = {}  # key -> (ref, uint8 buffer filled after the pickles)
    total = 0

    # The pickles are scanned on a read-only map: a corrupt length field then costs nothing (a file
    # object's read(n) would allocate n bytes up front).
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        def next_pickle(what: str, load_storage: Callable[[object], StorageRef] | None = None) -> object:
            start = mm.tell()
            end = scan_pickle(mm, f"{name} ({what})")
            mm.seek(end)
            return safe_loads(mm[start:end], name, load_storage or _no_storage)

        def _no_storage(pid: object) -> NoReturn:
            raise CheckpointError(f"{name}: storage reference outside the main pickle")

        def load_storage(pid: object) -> StorageRef:
            nonlocal total
            if isinstance(pid, tuple) and len(pid) == 6 and pid[5] is not None:
                raise CheckpointError(f"{name}: legacy storage views are not supported")
            dtype, key, numel = _storage_id(name, pid, 6)
            if key in declared:
                ref = declared[key][0]
                if ref.dtype != dtype or ref.numel != numel:
                    raise CheckpointError(f"{name}: storage {key} is referenced with two different types/sizes")
                return ref
            total += numel * dtype.itemsize
            if total > size:
                raise CheckpointError(f"{name}: storages declared by the pickle are larger than the file "
                                      "(truncated or corrupt)")
            buf = torch.empty(numel * dtype.itemsize, dtype=torch.uint8)
            ref = StorageRef(dtype, numel, buf.untyped_storage())
            declared[key] = (ref, buf)
            return ref

        magic = next_pickle("magic number")
        if magic != LEGACY_MAGIC:
            raise CheckpointError(f"{name}: not a torch file (wrong magic number)")
        if next_pickle("protocol version") != LEGACY_PROTOCOL:
            raise CheckpointError(f"{name}: unsupported legacy torch protocol version")
        sys_info = next_pickle("sys info")
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise CheckpointError(f"{name}: legacy torch file from a big-endian machine (or corrupt); not supported")
        root = next_pickle("main pickle", load_storage)
        keys = next_pickle("storage keys")
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise CheckpointError(f"{name}: legacy torch file with a malformed storage key list")
        if sorted(keys) != sorted(declared):
            raise CheckpointError(f"{name}: legacy storage key list does not match the storages the pickle uses")
        fh.seek(mm.tell())
        for key in keys:
            ref, buf = declared[key]
            header = fh.read(8)
            if len(header) != 8 or struct.unpack("<q", header)[0] != ref.numel:
                raise CheckpointError(f"{name}: storage {key} has a wrong or missing size header (truncated?)")
            if buf.numel() and fh.readinto(buf.numpy()) != buf.numel():
                raise CheckpointError(f"{name}: storage {key} is truncated (file ends inside its data)")
    return root
