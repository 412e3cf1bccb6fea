"""`sd15.pipeline.images`: user images in (any PIL mode, paths, tensors), decoded tensors out."""

import numpy as np
import pytest
import torch
from PIL import Image

from sd15.pipeline.images import (ImageError, init_image_tensor, open_image, pil_to_tensor, snap_to_multiple_of_8,
                         tensor_to_pil, to_rgb)


def rgb_array(width=24, height=16) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x * 7 + y * 13) % 256], -1).astype(np.uint8)


# ---- to_rgb --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "CMYK", "YCbCr", "1"])
def test_to_rgb_is_pils_conversion(mode):
    image = Image.fromarray(rgb_array()).convert(mode)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    assert np.array_equal(np.asarray(out), np.asarray(image.convert("RGB")))


def test_rgba_drops_alpha_and_keeps_the_colours_under_it():
    rgb = rgb_array()
    rgba = np.concatenate([rgb, np.zeros(rgb.shape[:2] + (1,), np.uint8)], -1)   # fully transparent
    out = to_rgb(Image.fromarray(rgba, mode="RGBA"))
    assert np.array_equal(np.asarray(out), rgb)        # what diffusers users get from .convert("RGB")


def test_palette_with_transparency():
    image = Image.fromarray(rgb_array()).convert("P")
    image.info["transparency"] = 0
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(image.convert("RGBA").convert("RGB")))


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_grey_is_rescaled_not_clipped(mode):
    grey8 = rgb_array()[..., 2]
    grey16 = grey8.astype(np.uint16) * 257                                # 255 -> 65535
    byte_order = "<u2" if mode == "I;16" else ">u2"     # (PIL's convert("I;16B") itself clips to 255)
    image = Image.frombytes(mode, grey8.shape[::-1], grey16.astype(byte_order).tobytes())
    out = np.asarray(to_rgb(image))
    assert np.array_equal(out, np.repeat(grey8[..., None], 3, -1))
    assert np.asarray(image.convert("RGB")).mean() > out.mean()        # PIL's own convert clips to white


def test_16_bit_png_from_disk(tmp_path):
    grey8 = rgb_array()[..., 0]
    path = tmp_path / "sixteen.png"
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path)
    image = open_image(path)
    assert image.mode in ("I;16", "I")                   # Pillow's choice depends on its version
    assert np.array_equal(np.asarray(to_rgb(image))[..., 1], grey8)


def test_32_bit_integer_grey():
    values = (rgb_array()[..., 1].astype(np.int32) * 257)    # 0..65535 in a 32-bit image
    out = np.asarray(to_rgb(Image.fromarray(values, mode="I")))
    assert np.array_equal(out[..., 0], rgb_array()[..., 1])


# ---- sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,expected", [((64, 48), (64, 48)), ((70, 53), (64, 48)), ((8, 15), (8, 8)),
                                           ((519, 513), (512, 512))])
def test_snap_to_multiple_of_8(size, expected):
    image = Image.fromarray(rgb_array(*size))
    out = snap_to_multiple_of_8(image)
    assert out.size == expected
    if size != expected:                               # diffusers' VaeImageProcessor.resize: Lanczos
        assert np.array_equal(np.asarray(out), np.asarray(image.resize(expected, resample=Image.LANCZOS)))
    else:
        assert np.array_equal(np.asarray(out), np.asarray(image))


@pytest.mark.parametrize("size", [(7, 64), (64, 7), (1, 1)])
def test_too_small_image(size):
    with pytest.raises(ImageError, match="at least 8x8"):
        snap_to_multiple_of_8(Image.new("RGB", size))


# ---- to tensors and back -------------------------------------------------------------------------

def test_pil_to_tensor_range_and_layout():
    array = rgb_array()
    t = pil_to_tensor(Image.fromarray(array))
    assert t.shape == (1, 3, 16, 24) and t.dtype == torch.float32
    assert torch.equal(t[0, :, 3, 5], torch.tensor(array[3, 5], dtype=torch.float32) / 255 * 2 - 1)
    assert t.min() == -1 and t.max() == 1


def test_init_image_tensor_from_pil_path_and_tensor(tmp_path):
    array = rgb_array()
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    expected = init_image_tensor(Image.fromarray(array))
    assert torch.equal(init_image_tensor(path), expected)
    unit = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    assert torch.allclose(init_image_tensor(unit), expected, atol=1e-6)
    assert torch.allclose(init_image_tensor(unit[None] * 2 - 1), expected, atol=1e-6)   # [-1, 1] passes as is
    assert init_image_tensor(torch.stack([unit, unit])).shape == (2, 3, 16, 24)


@pytest.mark.parametrize("tensor,message", [
    (torch.zeros(16, 16), "must be"), (torch.zeros(1, 1, 16, 16), "must be"), (torch.zeros(3, 12, 16), "multiples"),
    (torch.full((3, 8, 8), float("inf")), "NaN or infinite")])
def test_bad_tensors(tensor, message):
    with pytest.raises(ImageError, match=message):
        init_image_tensor(tensor)


def test_open_image_errors(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="directory"):
        open_image(tmp_path)
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError, match="could not be read"):
        open_image(tmp_path / "a.png")
    whole = tmp_path / "whole.jpg"
    Image.fromarray(rgb_array(64, 64)).save(whole, quality=95)
    (tmp_path / "cut.jpg").write_bytes(whole.read_bytes()[:300])
    with pytest.raises(ImageError, match="could not be read"):
        open_image(tmp_path / "cut.jpg")


def test_open_image_closes_the_file(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(rgb_array()).save(path)
    image = open_image(path)
    path.unlink()                                          # the pixels are already in memory
    assert np.array_equal(np.asarray(image), rgb_array())


def test_tensor_to_pil_rounds_and_clamps():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0, 2 * (100.4 / 255) - 1, 2 * (100.6 / 255) - 1, float("-inf")])
    images = tensor_to_pil(x.view(1, 1, 1, 8).expand(2, 3, 1, 8).contiguous())
    assert len(images) == 2 and images[0].mode == "RGB" and images[0].size == (8, 1)
    assert np.asarray(images[1])[0, :, 0].tolist() == [0, 0, 128, 255, 255, 100, 101, 0]


def test_tensor_to_pil_accepts_half_precision():
    out = tensor_to_pil(torch.zeros(1, 3, 8, 8, dtype=torch.float16))
    assert np.asarray(out[0]).max() == 128
