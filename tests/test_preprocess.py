"""`sd15.pipeline.preprocess`: our numpy Canny against OpenCV's cv2.Canny pixel for pixel, invert, the table.

The images are drawn here (shapes, text, gradients, noise, a photo-like smooth field with shapes, colours
that differ in one channel only, odd and tiny sizes). cv2.Canny gets what A1111's ControlNet extension
gives it: the uint8 RGB array, 3 channels, default aperture 3 and L1 gradient.
"""

import time

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from sd15.pipeline.preprocess import PREPROCESSORS, canny, describe, invert

THRESHOLDS = [(100, 200), (50, 150), (1, 255), (200, 100)]   # (200, 100): OpenCV swaps them


def shapes(w=512, h=512) -> Image.Image:
    img = Image.new("RGB", (w, h), (40, 70, 110))
    d = ImageDraw.Draw(img)
    d.rectangle((30, 40, 200, 180), fill=(230, 200, 40))
    d.ellipse((220, 60, 470, 260), fill=(180, 30, 60), outline=(255, 255, 255), width=4)
    d.polygon([(60, 470), (250, 300), (330, 490)], fill=(20, 160, 90))
    d.line((0, 0, w, h), fill=(250, 250, 250), width=3)
    d.line((w, 0, 0, h // 2), fill=(0, 0, 0), width=1)
    d.arc((300, 300, 500, 500), 20, 300, fill=(120, 220, 255), width=7)
    d.rounded_rectangle((380, 20, 500, 120), radius=25, outline=(90, 90, 90), width=2)
    return img


def text(w=301, h=177) -> Image.Image:
    img = Image.new("RGB", (w, h), (245, 240, 230))
    d = ImageDraw.Draw(img)
    d.text((8, 10), "ControlNet", fill=(10, 10, 10), font=ImageFont.load_default(size=40))
    d.text((12, 70), "canny edges, 0123456789", fill=(160, 20, 20), font=ImageFont.load_default(size=18))
    d.text((5, 120), "small print: the quick brown fox", fill=(60, 90, 160), font=ImageFont.load_default(size=11))
    return img


def gradients(w=256, h=200) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.hypot(x - w * 0.6, y - h * 0.4)
    a = np.stack([x / (w - 1) * 255, (np.sin(r / 9) * 0.5 + 0.5) * 255, (x + y) % 97 * 255 / 96], -1)
    return Image.fromarray(a.round().astype(np.uint8))


def noise(w=129, h=97, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def photo_like(w=480, h=352, seed=1) -> Image.Image:
    """A smooth random field (bicubic upsampling of coarse noise, blurred), shapes on it, a little grain."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8))
    img = coarse.resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    d = ImageDraw.Draw(img)
    d.ellipse((w // 6, h // 5, w // 2, h * 3 // 4), fill=(205, 170, 140))
    d.rectangle((w * 3 // 5, h // 3, w - 25, h - 30), outline=(30, 30, 35), width=5)
    img = img.filter(ImageFilter.GaussianBlur(1))
    grain = rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).round().astype(np.uint8))


def one_channel(w=203, h=151) -> Image.Image:
    """Regions whose colours differ only in green: a grey conversion would see little, the 3-channel Canny
    finds them through the channel with the largest gradient."""
    img = Image.new("RGB", (w, h), (120, 50, 200))
    d = ImageDraw.Draw(img)
    d.rectangle((20, 20, 90, 70), fill=(120, 105, 200))
    d.ellipse((110, 60, 190, 140), fill=(120, 160, 200))
    d.polygon([(5, 145), (60, 100), (100, 148)], fill=(120, 52, 200))
    return img


IMAGES = {"shapes 512x512": shapes(), "text 301x177": text(), "gradients 256x200": gradients(),
          "noise 129x97": noise(), "photo-like 480x352": photo_like(), "photo-like 333x211": photo_like(333, 211, 2),
          "one channel 203x151": one_channel()}


def agreement(image: Image.Image, low, high) -> float:
    """Percent of pixels where ours equals cv2.Canny on the RGB uint8 array."""
    ours = np.asarray(canny(image, low, high))
    reference = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    assert ours.shape == reference.shape + (3,)
    return float((ours[:, :, 0] == reference).mean() * 100)


@pytest.mark.parametrize("low,high", THRESHOLDS)
@pytest.mark.parametrize("name", IMAGES)
def test_canny_is_opencvs_pixel_for_pixel(name, low, high):
    image = IMAGES[name]
    assert agreement(image, low, high) == 100.0
    assert cv2.Canny(np.asarray(image), low, high).any()        # the comparison is not between two blanks


def test_the_one_channel_regions_are_found():
    """A green step of 55 (|grad| 220 > 200) is an edge of the RGB image; in grey (0.587 · 55 = 32, |grad|
    at most 6 · 32 < 200) it is not: the rectangle's top side is found through the green channel only."""
    image = one_channel()
    edges = np.asarray(canny(image))[:, :, 0] > 0
    grey_edges = cv2.Canny(np.asarray(image.convert("L")), 100, 200) > 0
    assert edges[19, 30:80].all()                  # the rectangle's top (row 20) is marked on its dark side
    assert not grey_edges[15:25, 25:85].any()


@pytest.mark.parametrize("low,high", [(100.7, 150.2), (0, 0), (1100, 1200), (0.5, 3000)])
def test_thresholds_are_floored_as_opencv_does(low, high):
    assert agreement(photo_like(), low, high) == 100.0
    assert agreement(noise(64, 48, seed=3), low, high) == 100.0


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1), (2, 3), (3, 2), (5, 4), (31, 17)])
def test_tiny_and_odd_sizes(size):
    image = noise(*size, seed=sum(size))
    for low, high in [(0, 10), *THRESHOLDS]:
        assert agreement(image, low, high) == 100.0
    assert canny(image).size == size


def test_random_blocky_images_with_many_ties():
    """Few grey levels make equal magnitudes everywhere: the strict / non-strict comparisons and the
    channel picked among equals all matter here."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        h, w = rng.integers(2, 20, 2)
        levels = int(rng.integers(2, 5))
        a = (rng.integers(0, levels, (h, w, 3)) * (255 // (levels - 1))).astype(np.uint8)
        if rng.random() < 0.3:
            a[:] = a[:, :, :1]
        low, high = (int(t) for t in rng.integers(0, 1100, 2))
        ours = np.asarray(canny(Image.fromarray(a), low, high))[:, :, 0]
        assert np.array_equal(ours, cv2.Canny(a, low, high)), (a.shape, low, high)


def test_long_weak_chain_is_reached_from_one_strong_pixel():
    """A spiral of weak edges (|grad| 400) with one slightly stronger stretch: hysteresis follows all of it."""
    n = 256
    a = np.zeros((n, n), np.uint8)
    x0, y0, x1, y1 = 4, 4, n - 5, n - 5
    while x1 - x0 > 6:
        a[y0:y0 + 2, x0:x1] = 100
        a[y0:y1, x1 - 2:x1] = 100
        a[y1 - 2:y1, x0:x1] = 100
        a[y0 + 6:y1, x0:x0 + 2] = 100
        x0, y0, x1, y1 = x0 + 6, y0 + 6, x1 - 6, y1 - 6
    a[4:6, 10:14] = 110
    image = Image.fromarray(a).convert("RGB")
    ours = np.asarray(canny(image, 50, 420))[:, :, 0]
    assert np.array_equal(ours, cv2.Canny(np.asarray(image), 50, 420))
    assert (ours > 0).sum() > 10000                              # the whole spiral, not the stretch


def test_a_step_edge_is_marked_on_its_dark_side():
    """A vertical step between columns 4 and 5: both have |dx| = 4·255; the horizontal test is m > left and
    m >= right, so column 4 keeps its edge and column 5 (not > its left) loses it. Transposed for rows."""
    a = np.zeros((10, 10, 3), np.uint8)
    a[:, 5:] = 255
    edges = np.asarray(canny(Image.fromarray(a)))[:, :, 0]
    expected = np.zeros((10, 10), np.uint8)
    expected[:, 4] = 255
    assert np.array_equal(edges, expected)
    rows = np.asarray(canny(Image.fromarray(np.ascontiguousarray(a.transpose(1, 0, 2)))))[:, :, 0]
    assert np.array_equal(rows, expected.T)


def test_output_is_white_on_black_rgb_of_the_same_size():
    image = photo_like()
    out = canny(image)
    a = np.asarray(out)
    assert out.mode == "RGB" and out.size == image.size
    assert set(np.unique(a)) == {0, 255}
    assert (a[:, :, 0] == a[:, :, 1]).all() and (a[:, :, 1] == a[:, :, 2]).all()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_are_taken_as_their_rgb(mode):
    """A grey image is Canny of its grey values (as A1111's HWC3 makes 3 equal channels of it)."""
    image = photo_like(160, 120).convert(mode)
    ours = np.asarray(canny(image))[:, :, 0]
    assert np.array_equal(ours, cv2.Canny(np.asarray(image.convert("RGB")), 100, 200))
    if mode == "L":
        assert np.array_equal(ours, cv2.Canny(np.asarray(image), 100, 200))


def test_512_square_is_fast():
    image = photo_like(512, 512)
    best = min(_timed(canny, image) for _ in range(3))
    assert best < 0.5, f"canny of 512x512 took {best:.3f} s"


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


# ---- invert, the table, describe -----------------------------------------------------------------------

def test_invert_is_255_minus_x():
    for image in (photo_like(), text(), one_channel()):
        out = invert(image)
        assert out.mode == "RGB" and out.size == image.size
        assert np.array_equal(np.asarray(out), 255 - np.asarray(image, dtype=np.int16))
    grey = text().convert("L")
    assert np.array_equal(np.asarray(invert(grey))[:, :, 1], 255 - np.asarray(grey, dtype=np.int16))


def test_table_names_functions_and_a1111_defaults():
    assert set(PREPROCESSORS) == {"none", "canny", "invert"}
    fn, defaults = PREPROCESSORS["canny"]
    assert fn is canny and defaults == {"low": 100, "high": 200}
    image = photo_like(96, 64)
    assert np.array_equal(np.asarray(fn(image, **defaults)), cv2.Canny(np.asarray(image), 100, 200)[:, :, None]
                          .repeat(3, axis=2))
    assert PREPROCESSORS["none"].function(image) is image and PREPROCESSORS["none"].defaults == {}
    assert PREPROCESSORS["invert"].function is invert and PREPROCESSORS["invert"].defaults == {}


def test_describe_gives_a1111s_unit_entries():
    assert describe("canny", {"low": 100, "high": 200}) == {"Module": "canny", "Threshold A": "100",
                                                           "Threshold B": "200"}
    assert list(describe("canny", {"high": 180})) == ["Module", "Threshold A", "Threshold B"]
    assert describe("canny", {"high": 180})["Threshold A"] == "100"             # the default low
    assert describe("canny", {"low": 50.9, "high": 150})["Threshold A"] == "50"  # what OpenCV uses
    assert describe("none", {}) == {"Module": "none"}
    assert describe("invert") == {"Module": "invert"}
    unit = ", ".join(f"{k}: {v}" for k, v in describe("canny", {"low": 100, "high": 200}).items())
    assert unit == "Module: canny, Threshold A: 100, Threshold B: 200"


# ---- bad arguments ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("low,high,words", [(-1, 200, "low threshold must be >= 0"),
                                            (100, -5, "high threshold must be >= 0"),
                                            (float("nan"), 200, "finite number"),
                                            (100, float("inf"), "finite number"),
                                            ("100", 200, "finite number"), (True, 200, "finite number")])
def test_bad_thresholds_are_refused(low, high, words):
    with pytest.raises(ValueError, match=words):
        canny(noise(8, 8), low, high)


@pytest.mark.parametrize("fn", [canny, invert])
@pytest.mark.parametrize("thing", [np.zeros((8, 8, 3), np.uint8), "photo.png", None])
def test_non_images_are_refused(fn, thing):
    with pytest.raises(ValueError, match="takes a PIL image"):
        fn(thing)


def test_describe_refuses_unknown_names_and_parameters():
    with pytest.raises(ValueError, match="unknown ControlNet preprocessor 'sobel'; known: none, canny, invert"):
        describe("sobel", {})
    with pytest.raises(ValueError, match="'canny' takes low, high; not sigma"):
        describe("canny", {"sigma": 2})
    with pytest.raises(ValueError, match="'invert' takes no parameters; not low"):
        describe("invert", {"low": 1})
    with pytest.raises(ValueError, match="low threshold must be >= 0"):
        describe("canny", {"low": -3})
