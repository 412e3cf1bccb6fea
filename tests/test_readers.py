"""Format readers: detection by content, every format, dtypes, laziness, and plain-words refusals."""

import os
import struct
import zipfile

import pytest
import torch

from ckpt_writers import torch_zip_members, write_safetensors, write_torch, zip_with
from sd15.files import CheckpointError, read_checkpoint_file, sha256_short, sniff_format
from sd15.files.readers import read_safetensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sample(dtype=torch.float32):
    return {"a": torch.arange(6, dtype=dtype).reshape(2, 3), "b": torch.tensor([1.5, -2.0], dtype=dtype),
            "c": torch.zeros(0, dtype=dtype)}


def assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["safetensors", "torch-zip", "torch-legacy"])
def test_every_format_round_trips_with_its_dtype(tmp_path, fmt, dtype):
    path = tmp_path / "model.bin"  # extension says nothing: content decides
    if fmt == "safetensors":
        write_safetensors(path, sample(dtype))
    else:
        write_torch(path, sample(dtype), legacy=fmt == "torch-legacy")
    assert sniff_format(path) == fmt
    raw = read_checkpoint_file(path)
    assert raw.format == fmt and raw.path == str(path)
    assert_same(raw.root, sample(dtype))


def test_extension_is_ignored(tmp_path):
    write_torch(tmp_path / "model.safetensors", sample())
    write_safetensors(tmp_path / "model.ckpt", sample())
    assert sniff_format(tmp_path / "model.safetensors") == "torch-zip"
    assert sniff_format(tmp_path / "model.ckpt") == "safetensors"


def test_safetensors_metadata_is_returned(tmp_path):
    write_safetensors(tmp_path / "m.safetensors", sample(), metadata={"format": "pt", "note": "hi"})
    raw = read_checkpoint_file(tmp_path / "m.safetensors")
    assert raw.metadata == {"format": "pt", "note": "hi"}


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_views_params_and_shared_storage(tmp_path, legacy):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {"t": base.t(), "row": base[2], "slice": base[1:3, 2:5], "param": torch.nn.Parameter(torch.ones(3)),
           "size": torch.Size([2, 3]), "nested": {"x": [base[0, 1:3]]}}
    write_torch(tmp_path / "v.pt", obj, legacy=legacy)
    root = read_checkpoint_file(tmp_path / "v.pt").root
    for k in ("t", "row", "slice"):
        assert torch.equal(root[k], obj[k]) and root[k].stride() == obj[k].stride()
    assert type(root["param"]) is torch.Tensor and torch.equal(root["param"], torch.ones(3))
    assert root["size"] == torch.Size([2, 3])
    assert torch.equal(root["nested"]["x"][0], base[0, 1:3])
    # one storage, shared by every view, as in the file
    assert root["t"].untyped_storage().data_ptr() == root["row"].untyped_storage().data_ptr()


def test_tensor_with_python_attributes_rebuilds_via_from_type(tmp_path):
    t = torch.ones(2)
    t.note = "extra"  # saved through torch._tensor._rebuild_from_type_v2
    write_torch(tmp_path / "a.pt", {"t": t})
    assert torch.equal(read_checkpoint_file(tmp_path / "a.pt").root["t"], torch.ones(2))


def test_zip_top_folder_can_have_any_name(tmp_path):
    members = torch_zip_members(sample())
    zip_with(tmp_path / "m.ckpt", members, top="sd-v1-5-pruned-emaonly")
    assert_same(read_checkpoint_file(tmp_path / "m.ckpt").root, sample())


def test_zip_tensors_are_lazy_mmap_views(tmp_path):
    write_torch(tmp_path / "m.ckpt", {"a": torch.arange(1000.0), "b": torch.ones(5)})
    root = read_checkpoint_file(tmp_path / "m.ckpt").root
    ptr_a, ptr_b = root["a"].data_ptr(), root["b"].data_ptr()
    # both tensors live in one mapping of the file: their addresses differ by their offsets in it
    assert abs(ptr_b - ptr_a) < os.path.getsize(tmp_path / "m.ckpt")
    root["a"][0] = 42.0  # private mapping: writes never reach the file
    assert read_checkpoint_file(tmp_path / "m.ckpt").root["a"][0] == 0.0


def test_zip_record_not_aligned_is_copied(tmp_path):
    """A hand-made zip (no torch alignment padding) may put a float32 record at an odd offset."""
    members = torch_zip_members({"a": torch.arange(5, dtype=torch.float32)})
    for top in ("x", "xy", "xyz", "wxyz"):
        zip_with(tmp_path / "m.ckpt", members, top=top)
        with zipfile.ZipFile(tmp_path / "m.ckpt") as z:
            info = z.getinfo(f"{top}/data/0")
        if (info.header_offset + 30 + len(info.filename)) % 4:
            break
    else:
        pytest.fail("could not make a misaligned record")
    root = read_checkpoint_file(tmp_path / "m.ckpt").root
    assert torch.equal(root["a"], torch.arange(5, dtype=torch.float32))
    assert root["a"].data_ptr() % 4 == 0


def test_safetensors_tensors_survive_closing(tmp_path):
    write_safetensors(tmp_path / "m.safetensors", sample(torch.float16))
    tensors, _ = read_safetensors(tmp_path / "m.safetensors")
    assert_same(tensors, sample(torch.float16))


def test_sha256_short(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_short(tmp_path / "f") == "ba7816bf8f"  # sha256("abc") = ba7816bf8f01cfea...
    with pytest.raises(CheckpointError, match="cannot read"):
        sha256_short(tmp_path / "missing")


# ---- what is not a checkpoint ---------------------------------------------------------------

def refused(path, *words):
    with pytest.raises(CheckpointError) as err:
        read_checkpoint_file(path)
    msg = str(err.value)
    assert msg.startswith(str(path)), msg
    for w in words:
        assert w in msg, msg
    return msg


def test_missing_path(tmp_path):
    refused(tmp_path / "nope.safetensors", "no such file")


def test_plain_directory(tmp_path):
    refused(tmp_path, "is a directory")


def test_diffusers_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    refused(tmp_path, "diffusers folder", "single-file")


def test_diffusers_component_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", sample())
    refused(tmp_path, "diffusers component folder")


def test_empty_file(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    refused(tmp_path / "e.safetensors", "empty")


def test_text_file(tmp_path):
    (tmp_path / "notes.ckpt").write_text("these are my favourite prompts\nand more\n")
    refused(tmp_path / "notes.ckpt", "text file", "favourite")


def test_git_lfs_pointer(tmp_path):
    (tmp_path / "v1-5.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:1234\nsize 4265380512\n")
    refused(tmp_path / "v1-5.safetensors", "Git LFS pointer")


def test_html_page(tmp_path):
    (tmp_path / "m.ckpt").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    refused(tmp_path / "m.ckpt", "HTML page")


def test_png_file(tmp_path):
    (tmp_path / "out.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + bytes(40))
    refused(tmp_path / "out.png", "PNG image")


def test_jpeg_file(tmp_path):
    (tmp_path / "a.ckpt").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(64))
    refused(tmp_path / "a.ckpt", "JPEG image")


def test_binary_garbage(tmp_path):
    (tmp_path / "g.bin").write_bytes(bytes(range(256)) * 4)
    refused(tmp_path / "g.bin", "not a checkpoint format")


def test_bare_pickle_is_not_unpickled(tmp_path):
    import pickle
    (tmp_path / "p.ckpt").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    refused(tmp_path / "p.ckpt", "bare Python pickle")


def test_plain_zip(tmp_path):
    with zipfile.ZipFile(tmp_path / "a.ckpt", "w") as z:
        z.writestr("readme.txt", "hi")
    refused(tmp_path / "a.ckpt", "not a torch checkpoint")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    write_safetensors(tmp_path / "m.safetensors", sample())
    os.chmod(tmp_path / "m.safetensors", 0)
    refused(tmp_path / "m.safetensors", "cannot read")


def test_safetensors_header_problems_named(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 10**6) + b'{"a": 1}')
    refused(p, "header length", "past the end")
    p.write_bytes(struct.pack("<Q", 2**60) + b'{"a": 1}')
    refused(p, "header length", "100 MB")
