"""Hostile and malformed files, generated here: each must raise CheckpointError saying what is wrong,
quickly, and no payload may run (the canary file it would create must not appear)."""

import json
import pickle
import struct
import time
import warnings
import zipfile

import pytest
import torch

from ckpt_writers import (UNET, legacy_parts, lightning_checkpoint, op_global, op_int, op_str, op_tuple, payloads,
                          raw_global_call, sd1_state, tensor_pickle, torch_zip_bytes_members, torch_zip_members,
                          write_safetensors, write_torch, zip_with, fake_modules, ModelCheckpoint)
from sd15.files import CheckpointError, read_checkpoint_file, read_sd1_checkpoint, read_vae_file

PAYLOADS = ["os.system", "builtins.exec", "builtins.eval", "subprocess.Popen", "getattr-chain"]
# protocol 2 spells builtins '__builtin__', protocol 4 'builtins'
PAYLOAD_GLOBALS = {"os.system": "posix.system", "builtins.exec": "builtin__.exec", "builtins.eval": "builtin__.eval",
                   "subprocess.Popen": ".Popen", "getattr-chain": "builtin__.getattr"}
CASES = {}  # id -> (build(tmp_path, canary) -> path, words the message must contain)


def case(name, *words):
    def register(build):
        CASES[name] = (build, words)
        return build
    return register


# ---- code-running pickles, in every place a pickle can hide --------------------------------

def _payload_cases(kind):
    def in_state_dict(tmp, canary):
        state = sd1_state()
        state[UNET + "input_blocks.0.0.weight"] = payloads(canary)[kind]
        return write_torch(tmp / "model.ckpt", {"state_dict": state})

    def in_lightning_entry(tmp, canary):
        obj = lightning_checkpoint(sd1_state())
        obj["callbacks"] = {"ModelCheckpoint": payloads(canary)[kind]}
        with fake_modules(ModelCheckpoint):
            return write_torch(tmp / "model.ckpt", obj)

    def in_legacy(tmp, canary):
        state = sd1_state()
        state["cond_stage_model.transformer.text_model.x"] = payloads(canary)[kind]
        return write_torch(tmp / "model.ckpt", state, legacy=True)

    def protocol4_in_zip(tmp, canary):  # STACK_GLOBAL instead of GLOBAL
        members = torch_zip_members(sd1_state())
        members["data.pkl"] = pickle.dumps({"x": payloads(canary)[kind]}, protocol=4)
        return zip_with(tmp / "model.ckpt", members)

    def bare(tmp, canary):
        (tmp / "model.ckpt").write_bytes(pickle.dumps(payloads(canary)[kind], protocol=2))
        return tmp / "model.ckpt"

    def bare_named_safetensors(tmp, canary):
        (tmp / "model.safetensors").write_bytes(pickle.dumps({"w": payloads(canary)[kind]}, protocol=2))
        return tmp / "model.safetensors"

    g = PAYLOAD_GLOBALS[kind]
    case(f"{kind}-in-state-dict", "refusing", g)(in_state_dict)
    case(f"{kind}-in-lightning-entry", "refusing", g)(in_lightning_entry)
    case(f"{kind}-in-legacy-torch", "refusing", g)(in_legacy)
    case(f"{kind}-protocol4-zip", "refusing", g.replace("builtin__", "builtins"))(protocol4_in_zip)
    case(f"{kind}-bare-pickle", "bare Python pickle")(bare)
    case(f"{kind}-bare-pickle-named-safetensors", "bare Python pickle", ".safetensors")(bare_named_safetensors)


for _kind in PAYLOADS:
    _payload_cases(_kind)


def _zip_pickle(pkl, records=None):
    def build(tmp, canary):
        return zip_with(tmp / "model.ckpt", torch_zip_bytes_members(pkl(canary) if callable(pkl) else pkl, records))
    return build


for _module, _name in [("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "check_output"),
                       ("builtins", "__import__"), ("__builtin__", "eval"), ("runpy", "_run_code"),
                       ("torch", "load"), ("torch.serialization", "load"), ("numpy", "load"),
                       ("pytorch_lightning_evil", "system"), ("webbrowser", "open")]:
    case(f"raw-global-{_module}.{_name}", "refusing", f"{_module}.{_name}")(
        _zip_pickle(lambda canary, m=_module, n=_name: raw_global_call(m, n, f"touch {canary}")))

case("payload-inside-inert-lightning-object", "refusing", "posix.system")(_zip_pickle(
    lambda canary: b"\x80\x02" + op_global("pytorch_lightning.callbacks", "X") + op_tuple(
        op_global("posix", "system") + op_tuple(op_str(f"touch {canary}")) + b"R") + b"R."))
case("codecs-encode-not-latin1", "_codecs.encode")(_zip_pickle(
    b"\x80\x02" + op_global("_codecs", "encode") + op_tuple(op_str("x"), op_str("rot13")) + b"R."))
case("reconstructor-on-real-class", "_reconstructor")(_zip_pickle(
    b"\x80\x02" + op_global("copyreg", "_reconstructor") + op_tuple(
        op_global("collections", "OrderedDict"), op_global("builtins", "object"), b"N") + b"R."))
case("rebuild-from-type-with-other-type", "_rebuild_from_type_v2")(_zip_pickle(
    b"\x80\x02" + op_global("torch._tensor", "_rebuild_from_type_v2") + op_tuple(
        op_global("torch._utils", "_rebuild_tensor_v2"), op_global("collections", "OrderedDict"),
        b")", b"N") + b"R."))
case("rebuild-tensor-over-a-string", "not an archive storage")(_zip_pickle(
    b"\x80\x02" + op_global("torch._utils", "_rebuild_tensor_v2") + op_tuple(
        op_str("x"), op_int(0), op_tuple(op_int(1)), op_tuple(op_int(1))) + b"R."))
case("torch-size-with-strings", "torch.Size")(_zip_pickle(
    b"\x80\x02" + op_global("torch", "Size") + op_tuple(op_tuple(op_str("a"))) + b"R."))

# ---- storages and views that do not fit -----------------------------------------------------

case("tensor-offset-past-storage", "past the end of its storage")(_zip_pickle(tensor_pickle(offset=1000)))
case("tensor-size-past-storage", "past the end of its storage")(_zip_pickle(tensor_pickle(size=(20, 3))))
case("tensor-stride-past-storage", "past the end of its storage")(_zip_pickle(tensor_pickle(stride=(300, 1))))
case("tensor-negative-offset", "invalid storage offset")(_zip_pickle(tensor_pickle(offset=-1)))
case("tensor-negative-size", "invalid storage offset")(_zip_pickle(tensor_pickle(size=(-2, 3))))
case("tensor-huge-size-zero-dim", "invalid storage offset")(_zip_pickle(tensor_pickle(size=(0, 2**70))))
case("tensor-too-many-dims", "invalid storage offset")(_zip_pickle(tensor_pickle(size=(1,) * 40, stride=(1,) * 40)))
case("tensor-size-stride-length-differ", "invalid storage offset")(_zip_pickle(tensor_pickle(stride=(1,))))
case("storage-numel-larger-than-record", "expects")(_zip_pickle(tensor_pickle(numel=10**12)))
case("storage-record-missing", "lacks")(_zip_pickle(tensor_pickle(key="7")))
case("storage-key-path-traversal", "lacks")(_zip_pickle(tensor_pickle(key="../../etc/passwd")))
case("storage-type-not-a-storage", "refusing", "torch.nn.Module")(_zip_pickle(
    tensor_pickle(storage_type="FloatStorage\n").replace(b"torch\nFloatStorage\n\n", b"torch.nn\nModule\n")))
case("storage-type-a-dtype", "storage type")(_zip_pickle(tensor_pickle(storage_type="float32")))
case("persistent-id-not-a-tuple", "not a storage")(_zip_pickle(tensor_pickle(pid=op_str("storage"))))
case("persistent-id-module", "not a storage")(_zip_pickle(tensor_pickle(
    pid=op_tuple(op_str("module"), op_str("x"), op_str("y")))))
case("same-storage-two-dtypes", "referenced as both")(_zip_pickle(
    b"\x80\x02]" + op_tuple(op_str("storage"), op_global("torch", "FloatStorage"), op_str("0"), op_str("cpu"),
                            op_int(6)) + b"Qa" +
    op_tuple(op_str("storage"), op_global("torch", "HalfStorage"), op_str("0"), op_str("cpu"), op_int(12)) + b"Qa."))
case("bare-storage-as-weight", "StorageRef")(_zip_pickle(
    b"\x80\x02}" + op_str(UNET + "x") + op_tuple(op_str("storage"), op_global("torch", "FloatStorage"), op_str("0"),
                                                  op_str("cpu"), op_int(6)) + b"Qs."))

# ---- pickles built to exhaust the loader ----------------------------------------------------

case("deeply-nested-tuple-key", "more than 100 deep")(_zip_pickle(b"\x80\x02}N" + b"\x85" * 1_000_000 + b"Ns."))
case("deeply-nested-lists", "more than 100 deep")(_zip_pickle(b"\x80\x02" + b"]" * 200 + b"a" * 199 + b"."))
case("huge-memo-index", "memo index")(_zip_pickle(b"\x80\x02}r\xff\xff\xff\x7f."))
case("get-of-unknown-memo", "malformed pickle")(_zip_pickle(b"\x80\x02h\x05."))
case("pickle-without-stop", "malformed pickle")(_zip_pickle(b"\x80\x02}"))
case("pickle-garbage", "malformed pickle")(_zip_pickle(b"\x80\x02\xff\xfe\xfd"))
case("pickle-stack-underflow", "malformed pickle")(_zip_pickle(b"\x80\x02s."))
case("pickle-out-of-band-buffer", "opcode")(_zip_pickle(b"\x80\x05\x97."))
case("oversized-data-pkl", "MiB")(_zip_pickle(b"\x80\x02\x8e" + struct.pack("<Q", 17 << 20) + bytes(17 << 20) + b"."))


@case("oversized-legacy-main-pickle", "MiB")
def _(tmp, canary):
    return write_torch(tmp / "model.ckpt", {"blob": bytes(17 << 20)}, legacy=True)


# ---- zip archives that are not (only) a checkpoint ------------------------------------------

@case("torchscript-archive", "TorchScript")
def _(tmp, canary):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, the files are not
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp / "model.ckpt"))
    return tmp / "model.ckpt"


@case("zip-without-pickle", "without data.pkl")
def _(tmp, canary):
    members = torch_zip_members(sd1_state())
    del members["data.pkl"]
    return zip_with(tmp / "model.ckpt", members)


@case("zip-unexpected-member", "unexpected members", "extra/hook.py")
def _(tmp, canary):
    members = torch_zip_members(sd1_state())
    members["extra/hook.py"] = b"import os; os.system('touch CANARY')"
    return zip_with(tmp / "model.ckpt", members)


@case("zip-two-top-folders", "not a torch checkpoint")
def _(tmp, canary):
    zip_with(tmp / "model.ckpt", torch_zip_members(sd1_state()))
    with zipfile.ZipFile(tmp / "model.ckpt", "a") as z:
        z.writestr("other/data.pkl", b"\x80\x02}.")
    return tmp / "model.ckpt"


@case("zip-duplicate-member", "same member twice")
def _(tmp, canary):
    members = torch_zip_members(sd1_state())
    path = zip_with(tmp / "model.ckpt", members)
    with pytest.warns(UserWarning), zipfile.ZipFile(path, "a") as z:
        z.writestr("archive/data.pkl", raw_global_call("posix", "system", f"touch {canary}"))
    return path


@case("zip-compressed-storage", "compressed")
def _(tmp, canary):
    members = torch_zip_members({UNET + "x": torch.ones(64)})
    with zipfile.ZipFile(tmp / "model.ckpt", "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(f"archive/{name}", data)
    return tmp / "model.ckpt"


@case("zip-big-endian", "big-endian")
def _(tmp, canary):
    members = torch_zip_members(sd1_state())
    members["byteorder"] = b"big"
    return zip_with(tmp / "model.ckpt", members)


@case("zip-truncated", "corrupt zip")
def _(tmp, canary):
    data = write_torch(tmp / "full.ckpt", sd1_state()).read_bytes()
    (tmp / "model.ckpt").write_bytes(data[:len(data) // 2])
    return tmp / "model.ckpt"


@case("zip-bad-crc-in-pickle", "corrupt zip")
def _(tmp, canary):
    data = bytearray(write_torch(tmp / "full.ckpt", sd1_state()).read_bytes())
    at = data.index(b"model.diffusion_model")
    data[at] ^= 0x20
    (tmp / "model.ckpt").write_bytes(bytes(data))
    return tmp / "model.ckpt"


@case("zip-storage-record-past-end", "past the end")
def _(tmp, canary):
    path = zip_with(tmp / "model.ckpt", torch_zip_bytes_members(tensor_pickle(), {"0": bytes(24)}))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("archive/data/0")
    struct.pack_into("<H", data, info.header_offset + 28, 60000)  # local extra-field length
    path.write_bytes(bytes(data))
    return path


# ---- legacy (pre-1.6) torch files -----------------------------------------------------------

def _legacy(edit):
    def build(tmp, canary):
        parts, tail = legacy_parts(sd1_state())
        parts, tail = edit(parts, tail, canary)
        (tmp / "model.ckpt").write_bytes(b"".join(parts) + tail)
        return tmp / "model.ckpt"
    return build


case("legacy-payload-in-sys-info", "refusing", "posix.system")(_legacy(
    lambda p, t, c: (p[:2] + [raw_global_call("posix", "system", f"touch {c}")] + p[3:], t)))
case("legacy-payload-in-storage-keys", "refusing", "posix.system")(_legacy(
    lambda p, t, c: (p[:4] + [raw_global_call("posix", "system", f"touch {c}")], t)))
case("legacy-wrong-protocol", "protocol version")(_legacy(
    lambda p, t, c: (p[:1] + [pickle.dumps(999, protocol=2)] + p[2:], t)))
case("legacy-big-endian", "big-endian")(_legacy(
    lambda p, t, c: (p[:2] + [pickle.dumps({"little_endian": False}, protocol=2)] + p[3:], t)))
case("legacy-truncated-storages", "truncated")(_legacy(lambda p, t, c: (p, t[:len(t) // 2])))
case("legacy-storage-size-header-wrong", "size header")(_legacy(
    lambda p, t, c: (p, struct.pack("<q", 999) + t[8:])))
case("legacy-storage-keys-mismatch", "does not match")(_legacy(
    lambda p, t, c: (p[:4] + [pickle.dumps(["nope"], protocol=2)], t)))
case("legacy-storage-keys-not-a-list", "malformed storage key list")(_legacy(
    lambda p, t, c: (p[:4] + [pickle.dumps({"a": 1}, protocol=2)], t)))
case("legacy-no-storage-data", "size header")(_legacy(lambda p, t, c: (p, b"")))
case("legacy-storage-larger-than-file", "larger than the file")(_legacy(
    lambda p, t, c: (p[:3] + [tensor_pickle(pid=op_tuple(op_str("storage"), op_global("torch", "FloatStorage"),
                                                       op_str("0"), op_str("cpu"), op_int(10**9), b"N"))] + p[4:], t)))

# ---- safetensors ----------------------------------------------------------------------------

GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def one(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"a": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


def _st(header=None, data=b"\0" * 8, length=None, raw=None):
    def build(tmp, canary):
        h = raw if raw is not None else json.dumps(header).encode()
        blob = struct.pack("<Q", len(h) if length is None else length) + h + data
        (tmp / "model.safetensors").write_bytes(blob)
        return tmp / "model.safetensors"
    return build


def _bytes(blob):
    def build(tmp, canary):
        (tmp / "model.safetensors").write_bytes(blob)
        return tmp / "model.safetensors"
    return build


case("st-empty", "empty")(_bytes(b""))
case("st-shorter-than-8-bytes", "too short")(_bytes(b"\x10\x00\x00\x00\x00"))
case("st-only-length", "not a checkpoint format")(_bytes(struct.pack("<Q", 2) + b"\0"))
case("st-header-length-past-end", "header length", "past the end")(_st(GOOD, length=10**6))
case("st-header-length-absurd", "header length", "100 MB")(_st(GOOD, length=2**63 + 5))
case("st-invalid-json", "not valid JSON")(_st(raw=b"{not json}"))
case("st-invalid-utf8", "not valid UTF-8")(_st(raw=b'{"\xff\xfe": 1}'))
case("st-header-not-object", "not a checkpoint format")(_st(raw=b"[1, 2]"))
case("st-deep-json", "not valid JSON")(_st(raw=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
case("st-unknown-dtype", "invalid safetensors", "F99")(_st(one(dtype="F99")))
case("st-overlapping-offsets", "invalid safetensors", "offset")(_st(
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, data=b"\0" * 12))
case("st-gap-between-tensors", "invalid safetensors", "offset")(_st(
    {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
     "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, data=b"\0" * 12))
case("st-out-of-range-offsets", "invalid safetensors")(_st(one(offsets=(0, 80))))
case("st-reversed-offsets", "invalid safetensors", "offset")(_st(one(shape=(0,), offsets=(8, 0))))
case("st-shape-size-mismatch", "invalid safetensors")(_st(one(shape=(3,))))
case("st-negative-shape", "invalid safetensors")(_st(one(shape=(-2,))))
case("st-shape-overflow", "invalid safetensors", "overflow")(_st(
    {"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 0]}}, data=b""))
case("st-truncated-data", "invalid safetensors")(_st(GOOD, data=b"\0" * 4))
case("st-trailing-data", "invalid safetensors")(_st(GOOD, data=b"\0" * 12))
case("st-duplicate-names", "duplicate tensor name")(_st(  # the library reads one of them silently
    raw=b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'))
case("st-metadata-not-strings", "invalid safetensors")(_st({"__metadata__": {"x": 1}, **GOOD}))


@case("st-truncated-real-file", "header length")
def _(tmp, canary):
    data = write_safetensors(tmp / "full.safetensors", sd1_state()).read_bytes()
    (tmp / "model.safetensors").write_bytes(data[:40])
    return tmp / "model.safetensors"


@case("st-truncated-real-file-data", "invalid safetensors")
def _(tmp, canary):
    data = write_safetensors(tmp / "full.safetensors", sd1_state()).read_bytes()
    (tmp / "model.safetensors").write_bytes(data[:-100])
    return tmp / "model.safetensors"


# ---- the tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_hostile_file_is_refused_cleanly(tmp_path, name):
    build, words = CASES[name]
    canary = tmp_path / "CANARY"
    path = build(tmp_path, canary)
    start = time.perf_counter()
    for read in (read_sd1_checkpoint, read_vae_file):
        with pytest.raises(CheckpointError) as err:
            read(path)
        msg = str(err.value)
        assert msg.startswith(str(path)), msg
        for w in words:
            assert w in msg, (w, msg)
    assert time.perf_counter() - start < 20
    assert not canary.exists(), "payload ran"


def test_case_count():
    assert len(CASES) >= 100


@pytest.mark.parametrize("kind", PAYLOADS)
def test_payloads_are_live(tmp_path, kind):
    """The payloads are real: a plain unpickle runs them (so the refusals above mean something)."""
    canary = tmp_path / "LIVE"
    obj = pickle.loads(pickle.dumps(payloads(canary)[kind], protocol=2))
    if kind == "subprocess.Popen":
        obj.wait()
    assert canary.exists()


def test_torch_load_without_weights_only_would_run_it(tmp_path):
    canary = tmp_path / "LIVE"
    build, _ = CASES["os.system-in-state-dict"]
    torch.load(build(tmp_path, canary), weights_only=False)
    assert canary.exists()


def test_refusal_names_the_global_for_the_user(tmp_path):
    build, _ = CASES["os.system-in-state-dict"]
    with pytest.raises(CheckpointError, match=r"refusing to load: the pickle references posix\.system"):
        read_checkpoint_file(build(tmp_path, tmp_path / "CANARY"))


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)
