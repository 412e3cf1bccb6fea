"""Unpickle a torch checkpoint's pickle without running anything the file asks for.

A `.ckpt` pickle is a little program: GLOBAL opcodes name callables, REDUCE calls them. A plain
checkpoint only needs a handful of them (rebuild a tensor over a storage, make an OrderedDict), so
`find_class` hands out our *own* small functions for those, turns the harmless metadata real
checkpoints carry (Lightning callbacks, numpy scalars/dtypes) into inert placeholders, and refuses
every other global by name. Nothing from the file is ever imported or called.

Before unpickling, `scan_pickle` walks the opcodes once (pickletools) to bound the pickle's size and
the nesting depth of what it builds: a few KB of TUPLE1 opcodes make a tuple nested a million deep,
and hashing that as a dict key overflows CPython's C stack (a segfault, not an exception).
"""

from __future__ import annotations  # Inert.__new__ returns the class being defined

import collections
import io
import math
import mmap
import pickle
import pickletools
import reprlib
import warnings
from collections.abc import Callable, Iterable
from typing import IO, TypeGuard

import torch

from .errors import CheckpointError

# A real SD checkpoint's pickle is 0.1-1 MB (about 150 bytes per tensor, EMA and optimizer state
# included); 16 MiB leaves ample headroom and bounds the pure-Python scan below to a few seconds.
MAX_PICKLE_BYTES = 16 << 20
MAX_DEPTH = 100              # real checkpoints nest < 10 deep (Lightning optimizer state)
MAX_DIMS = 32

# ---- pre-scan: size and nesting depth -------------------------------------------------------

_PUSH = set("INT BININT BININT1 BININT2 LONG LONG1 LONG4 STRING BINSTRING SHORT_BINSTRING BINBYTES "
            "SHORT_BINBYTES BINBYTES8 BYTEARRAY8 NONE NEWTRUE NEWFALSE UNICODE SHORT_BINUNICODE "
            "BINUNICODE BINUNICODE8 FLOAT BINFLOAT EMPTY_LIST EMPTY_TUPLE EMPTY_DICT EMPTY_SET GLOBAL "
            "EXT1 EXT2 EXT4 PERSID".split())
_FROM_MARK = set("TUPLE LIST DICT FROZENSET OBJ INST".split())        # pop to mark, push container
_INTO_TOP_FROM_MARK = set("APPENDS SETITEMS ADDITEMS".split())       # pop to mark, add to top
_POP_PUSH = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "STACK_GLOBAL": 2, "REDUCE": 2,
             "NEWOBJ": 2, "NEWOBJ_EX": 3, "BINPERSID": 1}
_INTO_TOP = {"APPEND": 1, "SETITEM": 2, "BUILD": 1}
_NO_STACK = {"PROTO", "FRAME"}


def scan_pickle(f: IO[bytes] | mmap.mmap, name: str, limit: int = MAX_PICKLE_BYTES) -> int:
    """Walk the opcodes of the pickle starting at f's position; return the position after STOP.

    Tracks a conservative nesting depth for every stack item (containers are one deeper than what
    they hold) and refuses pickles longer than `limit` bytes or deeper than MAX_DEPTH.
    """
    try:
        with warnings.catch_warnings():  # pickletools warns about odd escapes in protocol-0 strings
            warnings.simplefilter("ignore", DeprecationWarning)
            return _walk(f, name, limit)
    except CheckpointError:
        raise
    except Exception as e:  # pickletools: ValueError on bad opcodes/EOF; _walk: Index/KeyError
        raise CheckpointError(f"{name}: malformed pickle: {type(e).__name__}: {e}") from None


def _walk(f: IO[bytes] | mmap.mmap, name: str, limit: int) -> int:
    start = f.tell()
    stack, marks, memo = [], [], {}

    def pop_to_mark() -> int:
        k = marks.pop()
        items = stack[k:]
        del stack[k:]
        return max(items, default=-1)

    for op, arg, pos in pickletools.genops(f):
        if pos - start > limit:
            raise CheckpointError(f"{name}: pickle is larger than {limit >> 20} MiB; "
                                  "a checkpoint's pickle is well under 1 MiB")
        n = op.name
        if n in _PUSH:
            stack.append(0)
        elif n == "MARK":
            marks.append(len(stack))
        elif n == "STOP":
            if len(stack) != 1 or marks:
                raise CheckpointError(f"{name}: malformed pickle (stack not balanced at STOP)")
            return f.tell()
        elif n in _FROM_MARK:
            stack.append(pop_to_mark() + 1)
        elif n in _INTO_TOP_FROM_MARK:
            stack[-1] = max(stack[-1], pop_to_mark() + 1)
        elif n in _POP_PUSH or n in _INTO_TOP:
            k = _POP_PUSH.get(n) or _INTO_TOP[n]
            if len(stack) < k + (n in _INTO_TOP):
                raise IndexError("stack underflow")
            d = max(stack[-k:]) + 1
            del stack[-k:]
            if n in _POP_PUSH:
                stack.append(d)
            else:
                stack[-1] = max(stack[-1], d)
        elif n == "POP":
            if stack and (not marks or len(stack) > marks[-1]):
                stack.pop()
            else:
                marks.pop()
        elif n == "POP_MARK":
            pop_to_mark()
        elif n == "DUP":
            stack.append(stack[-1])
        elif n in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif n in ("PUT", "BINPUT", "LONG_BINPUT"):
            # picklers number memo slots 0, 1, 2...; a huge index makes the C unpickler allocate
            # (and zero) a memo table that large
            if not 0 <= arg <= len(memo) + 1024:
                raise CheckpointError(f"{name}: malformed pickle (memo index {arg} out of sequence)")
            memo[arg] = stack[-1]
        elif n == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif n not in _NO_STACK:  # NEXT_BUFFER, READONLY_BUFFER: out-of-band data, never in torch files
            raise CheckpointError(f"{name}: pickle uses unsupported opcode {n}")
        if stack and stack[-1] > MAX_DEPTH:
            raise CheckpointError(f"{name}: pickle nests objects more than {MAX_DEPTH} deep; "
                                  "refusing (a real checkpoint nests < 10 deep)")
    raise CheckpointError(f"{name}: malformed pickle: no STOP opcode")


# ---- what find_class hands out --------------------------------------------------------------
# Their arguments come from the file, so they are typed `object` and checked before use.

class Inert:
    """Stands in for harmless metadata we do not rebuild (a Lightning callback, a numpy scalar).

    Accepts whatever the pickle does to it (construct, set state, append, set items) and keeps none
    of it. Each allowed global gets its own subclass so it still works as a dict key.
    """

    qualified_name = "?"

    def __new__(cls, *args: object, **kwargs: object) -> Inert:
        return object.__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass

    def add(self, item: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


class ParameterDictState(Inert):
    """Stands in for `torch.nn.ParameterDict`, which old textual-inversion files (the original LDM code's
    `string_to_param`) pickle whole: nothing of the module is built or run, only the parameters the
    pickle's state holds are kept, in `parameters`."""

    qualified_name = "torch.nn.modules.container.ParameterDict"

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.parameters: dict[str, object] = {}

    def __new__(cls, *args: object, **kwargs: object) -> "ParameterDictState":
        obj = object.__new__(cls)
        obj.parameters = {}
        return obj

    def __setstate__(self, state: object) -> None:
        params = state.get("_parameters") if isinstance(state, dict) else None
        if isinstance(params, dict):
            # string keys only: converting another object to text could cost what a tiny pickle cannot
            self.parameters = {k: v for k, v in params.items() if isinstance(k, str) and len(k) <= 256}


class StorageRef:
    """A validated storage from the archive: dtype, number of elements, and the untyped bytes."""

    def __init__(self, dtype: torch.dtype, numel: int, untyped: torch.UntypedStorage) -> None:
        self.dtype, self.numel, self.untyped = dtype, numel, untyped


class _StorageType:
    """Stands for `torch.FloatStorage` & co inside persistent ids; only carries the dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
_DTYPES = {str(d).removeprefix("torch."): d for d in _STORAGE_DTYPES.values()}


def _is_int(x: object) -> TypeGuard[int]:
    return type(x) is int and 0 <= x < 2**62


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxtuple, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 4, 40, 40


def _short(x: object) -> str:
    # a bounded repr: a file's value may be a small pickle of a huge shared structure
    text = _REPR.repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _rebuild_tensor(storage: object, storage_offset: object, size: object, stride: object,
                    *_ignored: object) -> torch.Tensor:
    """Our `_rebuild_tensor_v2`: a view of a validated storage, checked to lie inside it."""
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"tensor rebuilt over a {type(storage).__name__}, not an archive storage")
    if not (_is_int(storage_offset) and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and len(size) == len(stride) <= MAX_DIMS and all(map(_is_int, [*size, *stride]))):
        raise CheckpointError("tensor has an invalid storage offset, size or stride: "
                              f"{_short(storage_offset)}, {_short(size)}, {_short(stride)}")
    size, stride = tuple(size), tuple(stride)
    if math.prod(size) == 0:
        end = storage_offset
    else:
        end = storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if end > storage.numel:
        raise CheckpointError(f"tensor of size {list(size)} at offset {storage_offset} reaches element {end}, "
                              f"past the end of its storage ({storage.numel} elements)")
    t = torch.empty((0,), dtype=storage.dtype)
    return t.set_(storage.untyped, storage_offset, size, stride)


def _rebuild_parameter(data: object, requires_grad: object = False, backward_hooks: object = None,
                       state: object = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"parameter rebuilt from a {type(data).__name__}, not a tensor")
    return data


class _TensorTypeMarker(Inert):
    qualified_name = "torch.Tensor"


def _rebuild_from_type_v2(func: object, new_type: object, args: Iterable[object],
                          state: object = None) -> torch.Tensor:
    if func not in (_rebuild_tensor, _rebuild_parameter) or not (
            isinstance(new_type, type) and issubclass(new_type, _TensorTypeMarker)):
        raise CheckpointError("_rebuild_from_type_v2 used with something other than a plain tensor")
    return func(*args)


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    """numpy scalars carry their raw bytes as latin-1 text: turn it back into bytes, nothing else."""
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
        raise CheckpointError("_codecs.encode used other than for latin-1 bytes")
    return text.encode("latin1")


def _reconstructor(cls: object, base: object, state: object) -> Inert:
    """copyreg._reconstructor (protocol 0/1 object pickles): only for placeholder classes."""
    if not (isinstance(cls, type) and issubclass(cls, Inert)):
        raise CheckpointError("copyreg._reconstructor used on a class we do not allow")
    return cls()


def _torch_size(items: Iterable[object] = ()) -> torch.Size:
    items = tuple(items)
    if not all(map(_is_int, items)):
        raise CheckpointError("torch.Size with non-integer items")
    return torch.Size(items)


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("builtins", "object"): object, ("__builtin__", "object"): object,
    ("copyreg", "_reconstructor"): _reconstructor, ("copy_reg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): _torch_size,
    ("torch", "Tensor"): _TensorTypeMarker,
    ("torch.nn.parameter", "Parameter"): _TensorTypeMarker,
    ("torch.nn.modules.container", "ParameterDict"): ParameterDictState,
}
# Harmless metadata: rebuilt as inert placeholders (never imported).
_INERT_EXACT = {
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "dtype"), ("numpy", "ndarray"), ("torch", "device"),
}
_INERT_MODULE_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.",
                          "numpy.dtypes")


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler that only resolves allowlisted globals (see module docstring).

    `load_storage(persistent_id) -> StorageRef` validates storage references against the archive.
    """

    def __init__(self, data: bytes, name: str, load_storage: Callable[[object], StorageRef]) -> None:
        super().__init__(io.BytesIO(data))
        self._name, self._load_storage, self._inert = name, load_storage, {}

    def find_class(self, module: str, name: str) -> object:
        key = (module, name)
        if key in _FUNCTIONS:
            return _FUNCTIONS[key]
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        if key in _INERT_EXACT or (module + ".").startswith(_INERT_MODULE_PREFIXES):
            qualified = f"{module}.{name}"
            if qualified not in self._inert:
                self._inert[qualified] = type(name, (Inert,), {"qualified_name": qualified})
            return self._inert[qualified]
        raise CheckpointError(f"{self._name}: refusing to load: the pickle references {module}.{name}, "
                              "which is not part of a plain checkpoint (unpickling it could run code)")

    def persistent_load(self, pid: object) -> StorageRef:
        return self._load_storage(pid)


def safe_loads(data: bytes, name: str, load_storage: Callable[[object], StorageRef]) -> object:
    """Unpickle `data` (already size/depth-checked by scan_pickle) with SafeUnpickler."""
    try:
        return SafeUnpickler(data, name, load_storage).load()
    except CheckpointError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(name) else f"{name}: {msg}") from None
    except Exception as e:  # any malformed pickle: UnpicklingError, EOFError, TypeError, ...
        raise CheckpointError(f"{name}: malformed pickle: {type(e).__name__}: {e}") from None


def check_storage_type(name: str, storage_type: object) -> torch.dtype:
    if not isinstance(storage_type, _StorageType):
        raise CheckpointError(f"{name}: storage reference with a {type(storage_type).__name__} "
                              "where a storage type (torch.FloatStorage, ...) belongs")
    return storage_type.dtype


