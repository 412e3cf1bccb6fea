"""`sd15.Pipeline` behaviour that is not parity with diffusers (that is test_pipeline_parity.py):
seeds, progress, prompt truncation, argument validation before any model work, init images of every
kind, and the fp16 VAE NaN retry. Everything runs on the tiny random-weight checkpoint, from a file.
"""

import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

import sd15
from reference import rel_err
from sd15.models.demo import tiny_metadata
from sd15.pipeline import vae_io
from sd15.pipeline.images import ImageError
from sd15.sampling import SAMPLERS
from tools.make_checkpoint import save

SMALL = dict(steps=3, width=32, height=32, sampler="euler")   # the cheapest real run


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt_file):
    return tiny_ckpt_file


@pytest.fixture(scope="module")
def pipe(ckpt):
    return sd15.load(ckpt, device="cpu")


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def gradient(width=40, height=24) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], axis=-1).astype(np.uint8)


# ---- seeds ---------------------------------------------------------------------------------------

def test_same_seed_same_image_different_seed_different_image(pipe):
    a = pipe.txt2img("a cat", seed=7, **SMALL)
    b = pipe.txt2img("a cat", seed=7, **SMALL)
    c = pipe.txt2img("a cat", seed=8, **SMALL)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))
    assert a[0].info["seed"] == 7 and "Seed: 7," in a[0].info["parameters"]


def test_seed_none_picks_a_seed_and_reports_it(pipe):
    first = pipe.txt2img("a cat", **SMALL)[0]
    seed = first.info["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    assert f"Seed: {seed}," in first.info["parameters"]
    again = pipe.txt2img("a cat", seed=seed, **SMALL)[0]
    assert np.array_equal(np.asarray(first), np.asarray(again))     # the reported seed reproduces it
    assert pipe.txt2img("a cat", **SMALL)[0].info["seed"] != seed    # 1 in 2**32 to collide


def test_parameters_text(pipe, ckpt):
    images = pipe.txt2img("a cat", negative_prompt="dog", steps=3, width=32, height=48, sampler="DPM++ 2M Karras",
                          guidance_scale=5.5, seed=3, batch_size=2)
    lines = images[1].info["parameters"].splitlines()
    assert lines[:2] == ["a cat", "Negative prompt: dog"]
    assert lines[2].startswith("Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 3, "
                               "Size: 32x48, Model hash: ")
    assert f"Model: {ckpt.stem}" in lines[2] and "Batch size: 2, Batch pos: 1" in lines[2]
    assert [im.size for im in images] == [(32, 48)] * 2


# ---- progress ------------------------------------------------------------------------------------

def test_progress_called_once_per_step(pipe):
    calls = []
    pipe.txt2img("a cat", seed=1, progress=lambda i, n, x: calls.append((i, n, tuple(x.shape))), **SMALL)
    assert calls == [(i, 3, (1, 4, 4, 4)) for i in (1, 2, 3)]


def test_progress_img2img_counts_only_the_steps_that_run(pipe):
    calls = []
    pipe.img2img(Image.fromarray(gradient()), "a cat", strength=0.5, steps=8, seed=1, sampler="ddim",
                 progress=lambda i, n, x: calls.append((i, n)))
    assert calls == [(i, 4) for i in (1, 2, 3, 4)]                   # int(8 · 0.5) steps


# ---- long prompts: chunked, never cut ------------------------------------------------------------

def test_long_prompt_is_chunked_not_cut(pipe, caplog):
    """77 prompt tokens: two 77-token chunks, nothing dropped and nothing to warn about; the words past the
    first 75 change the picture (they used to be cut)."""
    long = " ".join(["cat"] * 75 + ["purple", "elephant"])
    with caplog.at_level(logging.WARNING, logger="sd15"):
        images = pipe.txt2img(long, seed=1, **SMALL)
    assert not [r for r in caplog.records if r.name == "sd15"]
    states = pipe.conditioning([long]).cond[0][0][1].at(0)
    assert states.shape[0] == 154
    cut = pipe.txt2img(" ".join(["cat"] * 75), seed=1, **SMALL)
    assert not np.array_equal(pixels(images), pixels(cut))


def test_extra_network_tags_are_removed_and_named(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="sd15"):
        tagged = pipe.txt2img("a cat <hypernet:style:0.8>", seed=1, **SMALL)[0]
    assert any("<hypernet:style:0.8>" in r.getMessage() for r in caplog.records if r.name == "sd15")
    assert np.array_equal(np.asarray(tagged), np.asarray(pipe.txt2img("a cat ", seed=1, **SMALL)[0]))
    assert tagged.info["parameters"].startswith("a cat <hypernet:style:0.8>\n")     # the prompt keeps its tag


# ---- validation before any model work ------------------------------------------------------------

class ModelCalls:
    """Counts forward calls of every module of the pipeline's three models (real hooks, no mocks)."""

    def __init__(self, pipe):
        self.count = 0
        self.handles = [m.register_forward_pre_hook(self._hook)
                        for model in (pipe.unet, pipe.text_encoder, pipe.vae) for m in model.modules()]

    def _hook(self, *_):
        self.count += 1

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture
def model_calls(pipe):
    calls = ModelCalls(pipe)
    yield calls
    calls.remove()


def test_model_calls_are_counted(pipe, model_calls):
    pipe.txt2img("a cat", seed=1, **SMALL)
    assert model_calls.count > 0


TXT2IMG_ERRORS = [
    (dict(width=513), "multiple of 8"), (dict(height=0), "positive"), (dict(width=64.0), "integer"),
    (dict(steps=0), "steps"), (dict(steps=1001), "steps"), (dict(steps=2.5), "steps"),
    (dict(guidance_scale=float("nan")), "guidance"), (dict(guidance_scale=float("inf")), "guidance"),
    (dict(batch_size=0), "batch"), (dict(batch_size=65), "batch"),
    (dict(sampler="nope"), "unknown sampler"), (dict(sampler="euler", eta=0.5), "eta"),
    (dict(sampler="euler_a", eta=1.5), "eta"), (dict(sampler="DDIM", eta=0.5, hires=dict(scale=9)), "hires scale"),
    (dict(eta=-1.0, sampler="ddim"), "eta"), (dict(seed=-1), "seed"), (dict(seed="42"), "seed"),
    (dict(negative_prompt=["a", "b"]), "negative prompts"), (dict(latents=torch.zeros(1, 4, 5, 5)), "shape"),
]


@pytest.mark.parametrize("kwargs,message", TXT2IMG_ERRORS, ids=[str(k) for k, _ in TXT2IMG_ERRORS])
def test_txt2img_rejects_bad_arguments_before_any_model_call(pipe, model_calls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.txt2img("a cat", **(dict(width=32, height=32, steps=3, seed=1, sampler="ddim") | kwargs))
    assert model_calls.count == 0


def test_unknown_sampler_lists_the_valid_names(pipe):
    with pytest.raises(ValueError) as err:
        pipe.txt2img("a cat", sampler="nope")
    assert all(name in str(err.value) for name in SAMPLERS)


IMG2IMG_ERRORS = [(dict(strength=0), "strength"), (dict(strength=1.5), "strength"), (dict(strength=-0.1), "strength"),
                  (dict(strength=0.1, steps=5), "no step to run"), (dict(steps=0), "steps"),
                  (dict(guidance_scale=float("nan")), "guidance"), (dict(sampler="nope"), "unknown sampler"),
                  (dict(batch_size=0), "batch")]


@pytest.mark.parametrize("kwargs,message", IMG2IMG_ERRORS, ids=[str(k) for k, _ in IMG2IMG_ERRORS])
def test_img2img_rejects_bad_arguments_before_any_model_call(pipe, model_calls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.img2img(Image.fromarray(gradient()), "a cat", **(dict(steps=4, seed=1, sampler="ddim") | kwargs))
    assert model_calls.count == 0


# ---- init images ---------------------------------------------------------------------------------

def truncated_png(tmp_path):
    path = tmp_path / "whole.png"
    Image.fromarray(gradient(64, 64)).save(path)
    data = path.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.png"


@pytest.mark.parametrize("case", ["missing", "folder", "text file", "truncated png", "too small", "bad tensor",
                                  "tensor not multiple of 8", "tensor nan"])
def test_bad_init_image_raises_image_error_before_any_model_call(pipe, model_calls, tmp_path, case):
    (tmp_path / "notes.txt").write_text("not an image\n")
    source = {"missing": lambda: tmp_path / "nope.png", "folder": lambda: tmp_path,
              "text file": lambda: tmp_path / "notes.txt", "truncated png": lambda: truncated_png(tmp_path),
              "too small": lambda: Image.new("RGB", (7, 30)),
              "bad tensor": lambda: torch.zeros(1, 4, 16, 16),
              "tensor not multiple of 8": lambda: torch.zeros(3, 20, 16),
              "tensor nan": lambda: torch.full((3, 16, 16), float("nan"))}[case]()
    with pytest.raises(ImageError):
        pipe.img2img(source, "a cat", steps=4, seed=1)
    assert model_calls.count == 0
    assert issubclass(ImageError, ValueError)


def img2img(pipe, image, **kwargs):
    return pixels(pipe.img2img(image, "a cat", **(dict(steps=4, strength=0.75, seed=5, sampler="ddim") | kwargs)))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA"])
def test_init_image_modes_match_their_rgb_conversion(pipe, mode):
    """Every PIL mode works and means what PIL's own RGB conversion of it shows."""
    image = Image.fromarray(gradient()).convert(mode)
    out = img2img(pipe, image)
    assert out.shape == (1, 24, 40, 3)
    assert np.array_equal(out, img2img(pipe, image.convert("RGB")))


def test_16_bit_init_image_is_scaled_not_clipped(pipe):
    """I;16 PNGs (0..65535) must come out as the same grey levels as their 8-bit version, not white."""
    grey8 = gradient()[..., 0]
    image = Image.fromarray(grey8.astype(np.uint16) * 257)          # 255 -> 65535
    assert image.mode.startswith("I;16")
    out = img2img(pipe, image)
    assert np.array_equal(out, img2img(pipe, Image.fromarray(grey8, mode="L")))
    assert not np.array_equal(out, img2img(pipe, Image.new("L", image.size, 255)))


def test_init_image_from_path_and_tensor(pipe, tmp_path):
    array = gradient()
    path = tmp_path / "init.png"
    Image.fromarray(array).save(path)
    expected = img2img(pipe, Image.fromarray(array))
    assert np.array_equal(img2img(pipe, path), expected)
    assert np.array_equal(img2img(pipe, str(path)), expected)
    unit = torch.from_numpy(array).permute(2, 0, 1).float() / 255       # torchvision convention, [0, 1]
    assert np.array_equal(img2img(pipe, unit), expected)
    assert np.array_equal(img2img(pipe, unit[None] * 2 - 1), expected)  # already in [-1, 1]


def test_tensor_batch_of_init_images(pipe):
    a = torch.from_numpy(gradient()).permute(2, 0, 1).float() / 255
    b = a.flip(-1)
    out = pixels(pipe.img2img(torch.stack([a, b]), ["a cat", "a cat"], steps=4, seed=5, sampler="ddim"))
    assert out.shape == (2, 24, 40, 3) and not np.array_equal(out[0], out[1])
    with pytest.raises(ValueError, match="cannot be spread"):
        img2img(pipe, torch.stack([a, b]))                            # 2 images for 1 prompt x 1 image
    with pytest.raises(ValueError, match="cannot be spread"):
        img2img(pipe, torch.stack([a, b, a]), batch_size=2)           # 3 images for 2


def test_odd_sized_init_image_is_rounded_down(pipe):
    out = pipe.img2img(Image.fromarray(gradient(45, 31)), "a cat", steps=4, seed=1)[0]
    assert out.size == (40, 24) and "Size: 40x24" in out.info["parameters"]
    assert "Denoising strength: 0.75" in out.info["parameters"]


# ---- fp16 VAE NaN retry --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def overflowing_fp16_pipe(tiny_state_dict, tmp_path_factory):
    """A real fp16 pipeline whose VAE overflows in float16 but not in float32: post_quant_conv's bias of
    6e4 is representable in fp16, yet the decoder's first conv then sums past fp16's 65504 -> inf -> NaN
    in the next GroupNorm. In float32 the GroupNorm brings it back to O(1)."""
    sd = dict(tiny_state_dict)
    sd["first_stage_model.post_quant_conv.bias"] = torch.full((4,), 6.0e4)
    path = tmp_path_factory.mktemp("fp16") / "overflow.safetensors"
    save(sd, path, metadata=tiny_metadata())
    return sd15.load(path, device="cpu", dtype=torch.float16)


def test_fp16_vae_nan_is_retried_in_float32(overflowing_fp16_pipe, caplog):
    pipe = overflowing_fp16_pipe
    z = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert not torch.isfinite(vae_io.decode_raw(pipe.vae, (z / 0.18215).half())).all()   # the failure is real
        with caplog.at_level(logging.WARNING, logger="sd15"):
            images = pipe.decode(z)
    assert torch.isfinite(images).all()
    assert any(re.search("NaN.*float16.*float32", r.getMessage()) for r in caplog.records if r.name == "sd15")
    assert next(pipe.vae.parameters()).dtype == torch.float16                    # the shared VAE is untouched


def test_fp16_pipeline_end_to_end(overflowing_fp16_pipe, ckpt, caplog):
    with caplog.at_level(logging.WARNING, logger="sd15"):
        image = overflowing_fp16_pipe.txt2img("a cat", seed=1, **SMALL)[0]
    assert any("NaN" in r.getMessage() for r in caplog.records)
    assert np.asarray(image).std() > 5                                           # not a black image
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sd15"):
        image = sd15.load(ckpt, device="cpu", dtype=torch.float16).txt2img("a cat", seed=1, **SMALL)[0]
    assert not caplog.records and np.asarray(image).std() > 5                    # no retry without NaNs


# ---- fp16 / bf16 models drive a float32 sampler -------------------------------------------------

def run_recording(pipe, seed, **kwargs):
    """(latents after each step, uint8 pixels)."""
    steps = []
    images = pipe.txt2img("a cat", seed=seed, progress=lambda i, n, x: steps.append(x), **kwargs)
    return steps, pixels(images).astype(int)


# Final latents vs the float32 pipeline's for the same seed, rel err max|Δ|/max|ref|, measured on the
# tiny checkpoint at 64x64, 10 steps, txt2img with 4 samplers x 3 seeds and img2img (strength 0.6) with
# 3 samplers x 4 seeds: bf16 <= 0.045, fp16 <= 0.0055; txt2img mean pixel |Δ| <= 2.3 and 0.26.
# Another seed: >= 0.89 (mean pixel |Δ| >= 55). Bounds: latents 0.1 and 0.015, mean pixel |Δ| 6 and 1.
HALF = {torch.bfloat16: (0.1, 6.0), torch.float16: (0.015, 1.0)}


@pytest.mark.parametrize("sampler", ["euler_a", "DPM++ 2M Karras"])
@pytest.mark.parametrize("dtype", list(HALF), ids=["bf16", "fp16"])
def test_half_precision_pipeline_samples_in_float32(pipe, ckpt, dtype, sampler):
    half = sd15.load(ckpt, device="cpu", dtype=dtype)
    assert half.dtype == dtype and next(half.unet.parameters()).dtype == dtype
    run = dict(steps=10, width=64, height=64, sampler=sampler)
    ref, ref_pixels = run_recording(pipe, 7, **run)
    other, other_pixels = run_recording(pipe, 8, **run)
    got, got_pixels = run_recording(half, 7, **run)
    latent_tol, pixel_tol = HALF[dtype]
    assert [x.dtype for x in got] == [torch.float32] * 10                # the sampler state, every step
    err, seed_err = rel_err(got[-1], ref[-1]), rel_err(other[-1], ref[-1])
    assert 0 < err <= latent_tol < seed_err / 5                          # 0 <: the model did run in half
    assert np.abs(got_pixels - ref_pixels).mean() <= pixel_tol < np.abs(other_pixels - ref_pixels).mean() / 5


@pytest.mark.parametrize("dtype", list(HALF), ids=["bf16", "fp16"])
def test_half_precision_img2img_samples_in_float32(pipe, ckpt, dtype):
    half = sd15.load(ckpt, device="cpu", dtype=dtype)
    got, ref, other = [], [], []
    for p, seed, steps in ((half, 3, got), (pipe, 3, ref), (pipe, 4, other)):
        p.img2img(Image.fromarray(gradient(64, 64)), "a cat", strength=0.6, steps=10, seed=seed, sampler="euler_a",
                  progress=lambda i, n, x, steps=steps: steps.append(x))
    assert [x.dtype for x in got] == [torch.float32] * 6                 # int(10 · 0.6) steps
    assert 0 < rel_err(got[-1], ref[-1]) <= HALF[dtype][0] < rel_err(other[-1], ref[-1]) / 5
