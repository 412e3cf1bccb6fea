"""Mutation fuzzing: damaged checkpoint files either load or raise CheckpointError, never anything
else, never a crash or a hang. Valid tiny files in each format are flipped, truncated, spliced;
torch zips also get their data.pkl mutated and re-zipped with a correct CRC, so the pickle parser
itself is exercised. Bounded to well under a minute in total (CI has 2 cores)."""

import io
import os
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpt_writers import lightning_checkpoint, sd1_state, fake_modules, ModelCheckpoint
from sd15.files import CheckpointError, read_sd1_checkpoint, read_vae_file

# CI: a fixed, quick sample (~10 s on 2 cores). SD15_FUZZ_EXAMPLES=5000 runs a longer random campaign.
_CAMPAIGN = int(os.environ.get("SD15_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(max_examples=_CAMPAIGN or 250, deadline=5000 if not _CAMPAIGN else None,
                    derandomize=not _CAMPAIGN, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _state():
    state = sd1_state(ema=True, position_ids=torch.arange(77).unsqueeze(0))
    return {k: v[:1].contiguous() if v.dim() else v for k, v in state.items()}  # smaller still


def _bytes_of(save):
    buf = io.BytesIO()
    save(buf)
    return buf.getvalue()


def _base_files():
    from safetensors.torch import save as st_save
    state = _state()
    with fake_modules(ModelCheckpoint):
        zip_bytes = _bytes_of(lambda f: torch.save(lightning_checkpoint(state), f))
        legacy = _bytes_of(lambda f: torch.save(lightning_checkpoint(state), f, _use_new_zipfile_serialization=False))
    safetensors = st_save(state)
    header_end = 8 + int.from_bytes(safetensors[:8], "little")
    pickle_end = legacy.index(b"storage", legacy.rindex(b"_rebuild_tensor_v2")) + 400
    return {"safetensors": (safetensors, header_end), "torch-zip": (zip_bytes, len(zip_bytes)),
            "torch-legacy": (legacy, pickle_end)}


BASE = _base_files()

position = st.tuples(st.booleans(), st.floats(0, 1, exclude_max=True))  # (in the interesting span?, where)
mutation = st.one_of(
    st.tuples(st.just("flip"), position, st.integers(1, 255)),
    st.tuples(st.just("truncate"), position),
    st.tuples(st.just("splice"), position, position, st.integers(1, 64)),
    st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), position, st.integers(1, 32)),
    st.tuples(st.just("int"), position, st.sampled_from([b"\0" * 4, b"\xff" * 4, b"\x7f\xff\xff\xff",
                                                         b"\x00\x00\x00\x80", b"\x01\x00\x00\x00"])),
)


def mutate(data, span, mutations):
    data = bytearray(data)
    for m in mutations:
        if not data:
            break

        def at(p):
            in_span, frac = p
            return int(frac * (min(span, len(data)) if in_span else len(data)))
        kind = m[0]
        if kind == "flip":
            data[at(m[1])] ^= m[2]
        elif kind == "truncate":
            del data[at(m[1]):]
        elif kind == "splice":
            src, dst, n = at(m[1]), at(m[2]), m[3]
            data[dst:dst + n] = data[src:src + n]
        elif kind == "insert":
            i = at(m[1])
            data[i:i] = m[2]
        elif kind == "delete":
            i = at(m[1])
            del data[i:i + m[2]]
        else:
            i = at(m[1])
            data[i:i + 4] = m[2]
    return bytes(data)


def rezip_with_pickle(zip_bytes, mutations):
    """Mutate only data.pkl and write a well-formed zip around it (CRC correct)."""
    src = zipfile.ZipFile(io.BytesIO(zip_bytes))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("data.pkl"):
                data = mutate(data, len(data), mutations)
            z.writestr(name, data)
    return out.getvalue()


def check_loads_or_refuses(path):
    for read in (read_sd1_checkpoint, read_vae_file):
        try:
            result = read(path)
        except CheckpointError as e:
            assert str(e).startswith(str(path))
            continue
        parts = (result.unet, result.vae, result.text_encoder) if read is read_sd1_checkpoint else (result,)
        for part in parts:
            for t in part.values():
                t.float().sum()  # touch every byte: no out-of-bounds view survives validation


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_base_files_load(workdir):
    for fmt, (data, _) in BASE.items():
        path = workdir / f"base-{fmt}"
        path.write_bytes(data)
        ckpt = read_sd1_checkpoint(path, ema=True)
        assert ckpt.format == fmt and len(ckpt.unet) == 6


@pytest.mark.parametrize("fmt", list(BASE))
@SETTINGS
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_file_loads_or_refuses(workdir, fmt, mutations):
    data, span = BASE[fmt]
    path = workdir / f"mutated-{fmt}"
    path.write_bytes(mutate(data, span, mutations))
    check_loads_or_refuses(path)


@SETTINGS
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_pickle_in_valid_zip_loads_or_refuses(workdir, mutations):
    path = workdir / "mutated-pickle.ckpt"
    path.write_bytes(rezip_with_pickle(BASE["torch-zip"][0], mutations))
    check_loads_or_refuses(path)
