"""`sd15.files.pages`: a cast tensor's mapped file pages are given back, and nothing else ever is.

Real files on disk, the kernel's own page tables (/proc/self/pagemap) as the witness: after a release the
pages under the source tensor are no longer mapped, the tensor still reads exactly its old values, and
anonymous memory or a written (copy-on-write) page of a private file mapping is refused untouched. The
last test loads a mid-size fp16 .safetensors into float32 models in a fresh process and holds its peak
RSS to 2.2x the file (3.0x before the release), weights bit-equal to the file's values read
independently (safetensors' own reader, cast by torch).
"""

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sd15.files.pages import MappedPages, file_mappings
from sd15.files.readers import read_checkpoint_file, read_safetensors

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux" or not os.access("/proc/self/pagemap", os.R_OK),
                                reason="page release needs Linux's /proc/self/pagemap (a no-op elsewhere)")


def present_pages(tensor: torch.Tensor) -> int:
    """How many pages under `tensor` this process has mapped right now, by the kernel's page tables."""
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page)
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(8 * start)
        entries = np.frombuffer(f.read(8 * (end - start)), dtype="<u8")
    return int((entries >> np.uint64(63)).sum())


@pytest.fixture
def fp16_file(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(257, 1031, generator=gen).half() for i in range(4)}   # odd sizes: no tensor
    path = tmp_path / "weights.safetensors"                                                # starts on a page
    save_file(tensors, str(path))
    return path


def test_release_unmaps_the_pages_and_the_tensor_reads_the_same_values(fp16_file):
    tensors, _ = read_safetensors(fp16_file)
    expected = {k: t.clone() for k, t in tensors.items()}           # anonymous copies of the file's values
    with MappedPages() as pages:
        for key, t in tensors.items():
            cast = t.float()
            assert present_pages(t) > 0                              # the cast faulted the fp16 pages in
            released = pages.release(t)
            assert released >= t.numel() * 2 and released % mmap.PAGESIZE == 0
            assert present_pages(t) == 0                             # ... and they are gone from this process
            assert torch.equal(cast, expected[key].float())
        assert pages.released_bytes >= sum(t.numel() * 2 for t in tensors.values())
    for key, t in tensors.items():                                   # read again: faulted back from the file
        assert torch.equal(t.view(torch.int16), expected[key].view(torch.int16))
        assert present_pages(t) > 0


def test_anonymous_memory_is_never_released():
    t = torch.randn(300_000)                                         # a fresh allocation: anonymous pages
    before = t.clone()
    with MappedPages() as pages:
        assert pages.release(t) == 0
    assert present_pages(t) > 0 and torch.equal(t, before)


def test_a_written_page_of_a_private_file_mapping_is_never_released(fp16_file):
    tensors, _ = read_safetensors(fp16_file)
    t = tensors["w1"]
    t[100, 7] = 42.0                                                 # copy-on-write: that page is anonymous now
    with MappedPages() as pages:
        assert pages.release(t) == 0                                 # the whole range is refused
        assert pages.release(tensors["w3"]) > 0                      # an unwritten neighbour still goes
    assert t[100, 7].item() == 42.0 and present_pages(t) > 0


def test_torch_zip_checkpoints_release_and_legacy_ones_are_left_alone(tmp_path):
    gen = torch.Generator().manual_seed(1)
    state = {f"w{i}": torch.randn(300, 509, generator=gen) for i in range(3)}
    zipped, legacy = tmp_path / "zip.ckpt", tmp_path / "legacy.ckpt"
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for path, mapped in ((zipped, True), (legacy, False)):
        raw = read_checkpoint_file(path)
        assert raw.format == ("torch-zip" if mapped else "torch-legacy")
        with MappedPages() as pages:
            for key, t in raw.root.items():
                cast = t.half()
                assert (pages.release(t) > 0) == mapped             # legacy storages are read into fresh memory
                assert torch.equal(cast, state[key].half()) and torch.equal(t, state[key])


def test_file_mappings_lists_a_mapped_checkpoint(fp16_file):
    tensors, _ = read_safetensors(fp16_file)
    ptr = tensors["w0"].data_ptr()
    assert any(start <= ptr < end for start, end in file_mappings())
    assert not any(start <= torch.empty(1 << 20).data_ptr() < end for start, end in file_mappings())


# ---- through sd15.load ----------------------------------------------------------------------------------

def engine_to_file_names(pipe) -> dict[str, torch.Tensor]:
    """The loaded weights under the file's names and layouts."""
    from sd15.files.remap import invert_map
    from sd15.models.demo import PREFIX
    from sd15.models.keymap import text_key_map, unet_key_map, vae_key_map, vae_transforms
    out = {}
    for name, model, key_map, transforms in (
            ("unet", pipe.unet, unet_key_map(pipe.unet.cfg), None),
            ("vae", pipe.vae, vae_key_map(pipe.vae.cfg), vae_transforms(pipe.vae.cfg)),
            ("text_encoder", pipe.text_encoder, text_key_map(pipe.text_encoder.cfg), None)):
        out.update({PREFIX[name] + k: t for k, t in invert_map(key_map, model.state_dict(), transforms).items()})
    return out


@pytest.fixture
def released(monkeypatch) -> list[int]:
    """What each MappedPages.release during the test gave back (the real method runs)."""
    sizes, real = [], MappedPages.release
    monkeypatch.setattr(MappedPages, "release", lambda self, t: sizes.append(real(self, t)) or sizes[-1])
    return sizes


def test_fp16_into_fp16_stays_zero_copy_and_releases_nothing(tiny_state_dict, tmp_path, released):
    import sd15
    from sd15.models.demo import tiny_metadata
    path = tmp_path / "tiny-fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in tiny_state_dict.items()}, str(path), metadata=tiny_metadata())
    pipe = sd15.load(path, device="cpu", dtype=torch.float16)
    assert released == []                                            # nothing was cast, nothing given back
    mapped = file_mappings()
    weights = engine_to_file_names(pipe)
    assert all(any(a <= t.data_ptr() < b for a, b in mapped) for t in weights.values())   # still the file's pages
    assert all(torch.equal(t, tiny_state_dict[k].half()) for k, t in weights.items())


def test_zip_ckpt_fp32_into_fp16_releases_and_is_bit_equal(tiny_state_dict, tmp_path, released):
    import sd15
    from sd15.models.demo import TINY
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": tiny_state_dict}, path)
    pipe = sd15.load(path, device="cpu", dtype=torch.float16, configs=TINY)
    weights = engine_to_file_names(pipe)
    assert len(released) == len(weights) and sum(released) >= sum(t.numel() * 4 for t in weights.values())
    want = {k: t.half().view(torch.int16) for k, t in tiny_state_dict.items()}
    assert all(t.dtype == torch.float16 and torch.equal(t.view(torch.int16), want[k]) for k, t in weights.items())


# ---- a whole load, in a fresh process -------------------------------------------------------------------

# Mid-size configs (the SD 1.x structure, narrower): a ~300 MB fp16 file, so that the fp16 pages (1x the
# file) stand well clear of what the process holds besides the weights.
MID = {"unet": {"channels": 128, "context_dim": 384},
       "vae": {"channels": 64},
       "text_encoder": {"width": 384, "num_layers": 6, "num_heads": 6}}

LOAD = r"""
import json, sys
import sd15.process
sd15.process.use_huge_pages()
import torch
import sd15, sd15.pipeline                    # code imported before the baseline: we measure the weights
from safetensors.torch import load_file
from sd15.files.remap import invert_map
from sd15.models.keymap import text_key_map, unet_key_map, vae_key_map, vae_transforms
from sd15.models.demo import PREFIX
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
path = sys.argv[1]
if sys.argv[2] == "keep":                    # the load as it was: no page given back
    from sd15.files.pages import MappedPages
    MappedPages.release = lambda self, tensor: 0
base = vm("VmRSS:")
pipe = sd15.load(path, device="cpu", dtype=torch.float32)
peak = vm("VmHWM:") - base
# Independently: safetensors' own reader (bytes copied out of the file) and torch's cast.
expected = {k: t.float() for k, t in load_file(path).items()}
unequal, seen = [], 0
for name, model, key_map, transforms in (
        ("unet", pipe.unet, unet_key_map(pipe.unet.cfg), None),
        ("vae", pipe.vae, vae_key_map(pipe.vae.cfg), vae_transforms(pipe.vae.cfg)),
        ("text_encoder", pipe.text_encoder, text_key_map(pipe.text_encoder.cfg), None)):
    for key, t in invert_map(key_map, model.state_dict(), transforms).items():
        want = expected[PREFIX[name] + key]
        seen += 1
        same = t.dtype == torch.float32 and t.shape == want.shape
        if not (same and torch.equal(t.view(torch.int32), want.view(torch.int32))):   # bit patterns
            unequal.append(key)
print(json.dumps({"peak": peak, "tensors": seen, "unequal": unequal[:5]}))
"""


def mid_size_fp16_file(path: Path) -> Path:
    from sd15.models.config import TextEncoderConfig, UNetConfig, VAEConfig
    from sd15.models.demo import PREFIX
    from sd15.models.keymap import text_key_map, unet_key_map, vae_key_map, vae_transforms
    from sd15.models.loading import Configs, configs_to_metadata
    from sd15.models.text_encoder import TextEncoder
    from sd15.models.unet import UNet
    from sd15.models.vae import VAE
    from sd15.files.remap import invert_map
    configs = Configs(UNetConfig(**MID["unet"]), VAEConfig(**MID["vae"]), TextEncoderConfig(**MID["text_encoder"]))
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for name, cls, cfg, key_map, transforms in (
            ("unet", UNet, configs.unet, unet_key_map(configs.unet), None),
            ("vae", VAE, configs.vae, vae_key_map(configs.vae), vae_transforms(configs.vae)),
            ("text_encoder", TextEncoder, configs.text_encoder, text_key_map(configs.text_encoder), None)):
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in cls(cfg).state_dict().items()}
        engine = {k: (torch.randn(s, generator=gen) * 0.05).half() for k, s in shapes.items()}
        tensors.update({PREFIX[name] + k: t.contiguous() for k, t in invert_map(key_map, engine, transforms).items()})
    save_file(tensors, str(path), metadata=configs_to_metadata(configs))
    return path


@pytest.fixture(scope="module")
def mid_file(tmp_path_factory) -> Path:
    return mid_size_fp16_file(tmp_path_factory.mktemp("mid") / "mid-fp16.safetensors")


def load_in_fresh_process(path: Path, mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD, str(path), mode], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fp16_file_into_float32_models_peaks_near_twice_the_file(mid_file):
    size = mid_file.stat().st_size
    assert 200 << 20 < size < 400 << 20
    ours = load_in_fresh_process(mid_file, "release")
    assert ours["tensors"] > 500 and ours["unequal"] == []          # bit-equal to the file's values, cast
    print(f"\nfile {size / 2**20:.0f} MiB: peak {ours['peak'] / size:.2f}x the file")
    assert ours["peak"] <= 2.2 * size                               # the fp32 weights (2x) and a little
    assert ours["peak"] >= 1.9 * size                               # the fp32 copies really were made


def test_without_the_release_the_same_load_holds_the_fp16_pages_too(mid_file):
    """The contrast that shows what the test above measures: the old peak, 3x the file."""
    size = mid_file.stat().st_size
    kept = load_in_fresh_process(mid_file, "keep")
    print(f"\nfile {size / 2**20:.0f} MiB: peak without release {kept['peak'] / size:.2f}x the file")
    assert kept["unequal"] == [] and kept["peak"] >= 2.8 * size
