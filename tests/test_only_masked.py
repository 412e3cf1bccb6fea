"""A1111's "Inpaint area: Only masked" (sd15.pipeline.only_masked) against diffusers' `padding_mask_crop`.

Three layers, each against diffusers' own code, nothing in common but the inputs:
  1. the crop: our crop_region + expand_crop_region == VaeImageProcessor.get_crop_region, exact tuples, on
     random masks (shapes, pads, processing sizes of other aspect ratios, boxes on the borders);
  2. the resizes: resize_fill / resize_crop == VaeImageProcessor.resize(resize_mode="fill" / "crop"), exact
     pixels. A1111's modules/images.py resize_image (modes 2 and 1) is the same arithmetic (same src_w/src_h,
     same centring, same Lanczos edge stretch); it differs only where no pixels do: it has no `fill > 0` guard
     (PIL refuses a 0-high resize, so A1111 raises where diffusers and sd15 skip an empty strip, which its
     multiple-of-8 sizes never reach), and with the non-default setting "Upscaler for img2img" it upscales RGB
     crops with that upscaler instead of Lanczos (default None: Lanczos);
  3. the whole run: `pipe.inpaint(..., only_masked=True)` against StableDiffusionInpaintPipeline(...,
     padding_mask_crop=P, output_type="pil") on the tiny 4- and 9-channel checkpoints (built as
     tests/test_inpaint_parity.py builds them), an image larger than the processing size and of another
     aspect ratio: latents after every step (our progress callback vs callback_on_step_end, at the processing
     size) within 1e-5 relative, the final PIL images (the crop pasted back on the original) within
     tests/test_pipeline_parity.py's pixel bounds. The mask is binary and our blur 0, so diffusers'
     apply_overlay (through the mask as given) and ours (through the blurred mask) composite alike.
Then what only sd15 promises: outside the (blurred) mask every pixel is the original's, the infotext, and
an empty mask.

Measured (torch 2.13 CPU, diffusers 0.42.1, one thread; `pytest -s` prints them): crops and resizes exact
(over 7,000 crop cases); whole runs (100x76 image, 64x48 / 48x64 processing, batch 2, CFG 7.5, 6 steps,
4- and 9-channel, strengths 1 and 0.6) latents <= 6.8e-6 relative at every step, pixels max |diff| 1,
>= 99.98% identical within the crop (half the cases bit-identical); the paste through a grey mask within
1 level of apply_overlay (exact through a binary one).

Known difference, not tested against diffusers: without width/height we paint at the image's size
(rounded down to multiples of 8); diffusers' default is the UNet's sample size, A1111's the UI's 512x512.
"""

import logging

import numpy as np
import pytest
from diffusers import StableDiffusionInpaintPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from reference import diffusers_steps, pixel_stats, rel_err
from sd15.pipeline.infotext import parse_infotext
from sd15.pipeline.masks import Inpaint
from sd15.pipeline.only_masked import Paste, crop_region, expand_crop_region, paste, resize_crop, resize_fill

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore:TF32 acceleration:UserWarning")]

TOL = 1e-5
PIXEL_MAX_DIFF, PIXEL_IDENTICAL = 1, 0.995
PROMPT, NEGATIVE = "a red door in a white wall", "blurry, low quality"


def ours_crop(mask: Image.Image, width: int, height: int, pad: int):
    box = crop_region(mask, pad)
    return None if box is None else expand_crop_region(box, width, height, mask.width, mask.height)


# ---- 1. the crop region -----------------------------------------------------------------------------

MASK_SIZES = [(96, 64), (64, 96), (57, 41), (200, 30), (30, 200), (8, 8), (513, 77), (100, 76)]
PROCESSING = [(512, 512), (64, 48), (48, 64), (768, 512), (512, 768), (1024, 256), (256, 1024), (72, 40),
              (8, 8), (64, 64)]


def random_masks(rng, w, h, n):
    """n masks: rectangles anywhere (often on a border or a corner), scattered pixels, faint values (1..),
    several blobs, a single pixel, all ones."""
    out = []
    for k in range(n):
        m = np.zeros((h, w), dtype=np.uint8)
        kind = k % 6
        if kind in (0, 1):
            x1, y1 = rng.integers(0, w), rng.integers(0, h)
            x2, y2 = rng.integers(x1 + 1, w + 1), rng.integers(y1 + 1, h + 1)
            if kind == 1:            # pushed onto a border / corner
                if rng.random() < 0.5:
                    x1, x2 = (0, x2) if rng.random() < 0.5 else (x1, w)
                if rng.random() < 0.5:
                    y1, y2 = (0, y2) if rng.random() < 0.5 else (y1, h)
            m[y1:y2, x1:x2] = 255
        elif kind == 2:
            m[rng.random((h, w)) < 0.01] = rng.integers(1, 256)
        elif kind == 3:
            m[rng.integers(0, h), rng.integers(0, w)] = rng.integers(1, 4)     # one faint pixel
        elif kind == 4:
            for _ in range(3):
                x, y = rng.integers(0, w), rng.integers(0, h)
                m[y:y + rng.integers(1, 9), x:x + rng.integers(1, 9)] = rng.integers(1, 256)
        else:
            m[:] = 255 if k % 12 == 5 else 0
            m[0, -1] = 255                                                    # the top-right corner
        out.append(Image.fromarray(m, mode="L"))
    return out


def test_crop_region_is_diffusers_get_crop_region():
    rng = np.random.default_rng(0)
    n = 0
    for w, h in MASK_SIZES:
        for mask in random_masks(rng, w, h, 24):
            if mask.getbbox() is None:      # diffusers: a degenerate box such as (8, 8, 0, 0); we: None
                assert ours_crop(mask, 64, 48, 8) is None
                continue
            for pad in (0, 8, 32, int(rng.integers(1, 100))):
                for pw, ph in PROCESSING:
                    ref = VaeImageProcessor.get_crop_region(mask, pw, ph, pad=pad)
                    assert ours_crop(mask, pw, ph, pad) == ref, (w, h, pad, pw, ph, mask.getbbox())
                    n += 1
    assert n > 7000
    # An RGB mask (diffusers converts to L; we crop the blurred "L" mask, Inpaint's own): the same.
    mask = random_masks(rng, 96, 64, 1)[0]
    assert ours_crop(mask.convert("L"), 64, 48, 8) == VaeImageProcessor.get_crop_region(mask.convert("RGB"), 64, 48, 8)


def test_crop_region_cases_by_hand():
    """What the algorithm does, on numbers worked out by hand (so the test fails if both sides change)."""
    m = np.zeros((76, 100), dtype=np.uint8)
    m[30:40, 40:50] = 255                      # a 10x10 square
    mask = Image.fromarray(m)
    assert crop_region(mask, 8) == (32, 22, 58, 48)                     # 26x26
    assert ours_crop(mask, 64, 48, 8) == (28, 22, 62, 48)                # widened to 34x26 (int(34.67 - 26) = 8)
    assert ours_crop(mask, 48, 64, 8) == (32, 18, 58, 52)                # taller: 26x34 (int(34.67 - 26) = 8)
    m[:] = 0
    m[70:76, 0:100] = 255                      # a full-width strip on the bottom border
    mask = Image.fromarray(m)
    # 100 wide needs 133 high at 3:4; shifted up, clipped to the image: the whole picture.
    assert ours_crop(Image.fromarray(m), 48, 64, 0) == (0, 0, 100, 76)
    assert crop_region(Image.new("L", (10, 10), 0), 4) is None


# ---- 2. the resizes ---------------------------------------------------------------------------------

RESIZE_CASES = [((100, 76), (64, 48)), ((40, 30), (64, 48)), ((34, 26), (64, 48)), ((100, 76), (48, 64)),
                ((26, 34), (64, 48)), ((64, 48), (64, 48)), ((17, 93), (40, 72)), ((300, 20), (64, 64)),
                ((20, 300), (64, 64)), ((64, 48), (34, 26)), ((48, 64), (100, 76)), ((37, 41), (53, 47)),
                ((2, 9), (16, 8)), ((9, 2), (8, 16)), ((128, 128), (512, 512)), ((97, 33), (31, 95))]


def noise_image(rng, size, mode="RGB"):
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.mark.parametrize("mode", ["fill", "crop"])
def test_resizes_are_diffusers_resize_modes(mode):
    """RGB images: the same pixels. "L" masks: diffusers returns RGB (its canvas is always RGB, as A1111's),
    we keep "L"; the grey values are the same (and L -> RGB -> L is exact: PIL's weights sum to 1)."""
    rng = np.random.default_rng(1)
    processor = VaeImageProcessor()            # resample "lanczos", as the inpaint pipeline's processors
    ours_fn = resize_fill if mode == "fill" else resize_crop
    for src, (w, h) in RESIZE_CASES:
        for image_mode in ("RGB", "L"):
            image = noise_image(rng, src, image_mode)
            ref = processor.resize(image, h, w, resize_mode=mode)
            ours = ours_fn(image, w, h)
            assert ours.size == ref.size == (w, h) and ours.mode == image_mode
            a, b = np.asarray(ours.convert("RGB")), np.asarray(ref)
            assert np.array_equal(a, b), f"{src} -> {(w, h)} {image_mode}: {np.mean(a != b):.4f} differ, " \
                                         f"max {np.abs(a.astype(int) - b).max()}"
            if image_mode == "L":
                assert np.array_equal(np.asarray(ours), np.asarray(ref.convert("L")))
            assert len(np.unique(a)) > 2          # a picture, not the black canvas


def test_fill_stretches_the_edges_and_crop_cuts_the_overhang():
    """By hand: a 40x20 image filled into 40x40 is itself at rows 10..29, and rows 0..9 / 30..39 its first /
    last row stretched (its first and last 5 rows equal here, so the Lanczos strip is that row exactly);
    cropped into 20x20 it is the same 40x20 (already the height) with its middle 20 columns kept."""
    rng = np.random.default_rng(2)
    src = np.repeat(rng.integers(0, 256, (1, 40, 3), dtype=np.uint8), 20, axis=0)
    src[5:15] = rng.integers(0, 256, (10, 40, 3))
    image = Image.fromarray(src)
    a = np.asarray(resize_fill(image, 40, 40))
    assert np.array_equal(a[10:30], src)
    assert np.array_equal(a[:10], np.broadcast_to(src[0], (10, 40, 3)))
    assert np.array_equal(a[30:], np.broadcast_to(src[-1], (10, 40, 3)))
    assert np.array_equal(np.asarray(resize_crop(image, 20, 20)), src[:, 10:30])


def test_paste_is_apply_overlay():
    """The paste back against diffusers' apply_overlay (A1111's: the original pasted over the result through
    the inverted mask, PIL's premultiplied RGBa and alpha_composite, 8-bit): exact through a binary mask;
    through a grey one (a blurred mask) our float mix, rounded, is within 1 level (measured: max 1, 69% of
    the grey-masked values identical), PIL rounding twice in 8 bits."""
    rng = np.random.default_rng(3)
    original, generated = noise_image(rng, (100, 76)), noise_image(rng, (64, 48))
    grey = np.zeros((76, 100), dtype=np.uint8)
    grey[10:60, 20:80] = rng.integers(0, 256, (50, 60))
    processor = VaeImageProcessor()
    for m in (np.where(grey >= 128, 255, 0).astype(np.uint8), grey):
        mask = Image.fromarray(m)
        box = ours_crop(mask, 64, 48, 8)
        ours = np.asarray(paste([generated], Paste(original, mask, box))[0]).astype(int)
        ref = np.asarray(processor.apply_overlay(mask, original, generated, box)).astype(int)
        diff = np.abs(ours - ref)
        assert diff.max() <= (0 if m is not grey else 1) and np.array_equal(ours[m == 0], np.asarray(original)[m == 0])
        assert np.array_equal(ours[m == 255], ref[m == 255])
        if m is grey:
            assert 0.5 < np.mean(diff[m > 0] == 0) < 1


# ---- 3. the whole run against StableDiffusionInpaintPipeline(padding_mask_crop=...) ----------------

IMAGE_SIZE = (100, 76)          # larger than the processing sizes, another aspect ratio, not a multiple of 8


def picture(width=IMAGE_SIZE[0], height=IMAGE_SIZE[1]) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin(x / 3) * np.cos(y / 4)], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), mode="RGB")


def binary_mask(name: str) -> Image.Image:
    m = np.zeros(IMAGE_SIZE[::-1], dtype=np.uint8)
    if name == "square":        # inside: a small crop, upscaled (34x26 -> 64x48)
        m[30:40, 40:50] = 255
    elif name == "strip":       # a full-width strip on the bottom border: at 3:4 the crop is the whole image
        m[66:, :] = 255
    elif name == "block":       # large enough to stay 255 inside under a blur of 4
        m[20:50, 30:66] = 255
    elif name == "corner":      # the top-right corner, 32 pixels of padding: shifted back inside, downscaled
        m[0:20, 70:100] = 255
        m[8:12, 60:70] = 255
    return Image.fromarray(m, mode="L")


GEOMETRY = {"square": (8, 64, 48), "strip": (0, 48, 64), "corner": (32, 64, 48)}   # padding, width, height


def run_reference(components, sampler, seed, **kwargs):
    out, steps = diffusers_steps(StableDiffusionInpaintPipeline, components, sampler, seed, output_type="pil", **kwargs)
    return out.images, steps


RUNS = [(4, "euler_a", 1.0, "square"), (4, "dpmpp_2m_karras", 0.6, "strip"), (4, "euler_a", 0.6, "corner"),
        (4, "ddim", 1.0, "corner"), (9, "euler_a", 1.0, "strip"), (9, "dpmpp_2m_karras", 0.6, "square"),
        (9, "euler_a", 0.6, "corner"), (9, "ddim", 1.0, "square")]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("channels,sampler,strength,geometry", RUNS, ids=["-".join(map(str, r)) for r in RUNS])
def test_only_masked_matches_diffusers_padding_mask_crop(inpaint_models, channels, sampler, strength, geometry):
    pipe, components = inpaint_models[channels]
    (pad, width, height), image, mask = GEOMETRY[geometry], picture(), binary_mask(geometry)
    steps, seed = 6, 2000 + channels
    ours_steps = []
    ours = pipe.inpaint(image, mask, PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, strength=strength,
                        mask_blur=0, only_masked=True, padding=pad, width=width, height=height, steps=steps,
                        sampler=sampler, seed=seed, batch_size=2,
                        progress=lambda i, n, x: ours_steps.append(x.clone()))
    ref, ref_steps = run_reference(components, sampler, seed, prompt=PROMPT, negative_prompt=NEGATIVE,
                                   guidance_scale=7.5, image=image, mask_image=mask, padding_mask_crop=pad,
                                   height=height, width=width, strength=strength, num_inference_steps=steps,
                                   num_images_per_prompt=2)
    # The latents, step by step, at the processing size.
    assert len(ours_steps) == len(ref_steps) == int(steps * strength)
    errs = []
    for i, (a, b) in enumerate(zip(ours_steps, ref_steps)):
        assert a.shape == b.shape == (2, 4, height // 8, width // 8)
        errs.append(rel_err(a, b))
        assert errs[-1] <= TOL, f"latents differ after step {i + 1}: {errs[-1]:.2e}"
    # The images: the original's size, the crop pasted back.
    box = VaeImageProcessor.get_crop_region(mask, width, height, pad=pad)
    assert [im.size for im in ours] == [im.size for im in ref] == [IMAGE_SIZE] * 2
    assert all(im.mode == "RGB" for im in ours)
    identical, max_diff, _ = pixel_stats(ours, ref)
    identical_box, _, _ = pixel_stats([im.crop(box) for im in ours], [im.crop(box) for im in ref])
    assert max_diff <= PIXEL_MAX_DIFF and identical_box >= PIXEL_IDENTICAL, \
        f"identical {identical:.5f} (in the crop {identical_box:.5f}), max diff {max_diff}"
    # Outside the mask: the original, exactly (diffusers' too); inside: repainted, two different images.
    outside = np.asarray(mask) == 0
    for im in ours + ref:
        assert np.array_equal(np.asarray(im)[outside], np.asarray(image)[outside])
    inside = [np.asarray(im)[~outside].astype(int) for im in ours]
    assert np.abs(inside[0] - np.asarray(image)[~outside]).mean() > 10 and not np.array_equal(*inside)
    print(f"{channels}ch {sampler} {strength} {geometry} (crop {box}, at {width}x{height}): latents "
          f"{max(errs):.1e}, identical {identical:.5f} (in the crop {identical_box:.5f}), max diff {max_diff}")


@pytest.mark.usefixtures("one_thread")
def test_the_default_processing_size_is_the_image_s(inpaint_models):
    """Without width/height we paint the crop at the init image's size rounded down to multiples of 8
    (96x72 here); diffusers' default is the UNet's sample size (512 for SD1.5; A1111's, the UI's 512x512),
    so diffusers is given 96x72."""
    pipe, components = inpaint_models[9]
    image, mask = picture(), binary_mask("corner")
    ours_steps = []
    ours = pipe.inpaint(image, mask, PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, mask_blur=0,
                        only_masked=True, steps=4, sampler="euler", seed=7,
                        progress=lambda i, n, x: ours_steps.append(x.clone()))
    ref, ref_steps = run_reference(components, "euler", 7, prompt=PROMPT, negative_prompt=NEGATIVE,
                                   guidance_scale=7.5, image=image, mask_image=mask, padding_mask_crop=32,
                                   height=72, width=96, num_inference_steps=4)
    assert ours_steps[0].shape == (1, 4, 9, 12)
    lat = max(rel_err(a, b) for a, b in zip(ours_steps, ref_steps))
    identical, max_diff, _ = pixel_stats(ours, ref)
    assert lat <= TOL and max_diff <= PIXEL_MAX_DIFF and identical >= PIXEL_IDENTICAL
    assert parse_infotext(ours[0].info["parameters"]).fields["Size"] == "96x72"
    print(f"default size: latents {lat:.1e}, identical {identical:.5f}, max diff {max_diff}")


# ---- 4. what sd15 promises besides ----------------------------------------------------------------

@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("channels,blur", [(4, 4), (9, 0), (9, 2.5)])
def test_outside_the_mask_every_pixel_is_the_original_s(inpaint_models, channels, blur):
    """With A1111's mask blur too: wherever the blurred mask is 0 (all of the picture outside the crop
    among it) the pixels are the input's, exactly; where it is 255, the generation's; the infotext is the
    whole request's, A1111's keys."""
    pipe, _ = inpaint_models[channels]
    image, mask, (pad, width, height) = picture(), binary_mask("block"), GEOMETRY["square"]
    out = pipe.inpaint(image, mask, PROMPT, strength=0.8, mask_blur=blur, only_masked=True, padding=pad,
                       width=width, height=height, steps=4, sampler="euler_a", seed=11, batch_size=2)
    blurred = np.asarray(Inpaint(mask, blur=blur).blurred(IMAGE_SIZE))
    outside, full = blurred == 0, blurred == 255
    x1, y1, x2, y2 = ours_crop(Image.fromarray(blurred), width, height, pad)
    in_crop = np.zeros_like(outside)
    in_crop[y1:y2, x1:x2] = True
    assert outside[~in_crop].all() and outside[in_crop].any() and full.any()
    if blur:
        assert ((blurred > 0) & (blurred < 255)).any()
    original = np.asarray(image)
    for im in out:
        a = np.asarray(im)
        assert im.size == IMAGE_SIZE and np.array_equal(a[outside], original[outside])
        assert np.abs(a[full].astype(int) - original[full]).mean() > 10
        fields = parse_infotext(im.info["parameters"]).fields
        assert fields["Inpaint area"] == "Only masked" and fields["Masked area padding"] == str(pad)
        assert fields["Mask blur"] == (str(int(blur)) if blur == int(blur) else str(blur))
        assert fields["Size"] == f"{width}x{height}" and fields["Seed"] == "11"
        assert im.info["seed"] == 11
    # The whole-picture infotext has no padding.
    whole = pipe.inpaint(image, mask, PROMPT, strength=0.5, mask_blur=blur, steps=2, sampler="euler", seed=1)
    fields = parse_infotext(whole[0].info["parameters"]).fields
    assert fields["Inpaint area"] == "Whole picture" and "Masked area padding" not in fields


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("size", [None, (64, 48)], ids=["image-size", "processing-size"])
def test_an_empty_mask_returns_the_image_unchanged_with_a_warning(inpaint_models, size, caplog):
    pipe, _ = inpaint_models[4]
    image = picture()
    calls = []
    width, height = size or (None, None)
    with caplog.at_level(logging.WARNING, "sd15"):
        out = pipe.inpaint(image, Image.new("L", IMAGE_SIZE, 0), PROMPT, only_masked=True, padding=16, steps=3,
                           seed=3, batch_size=2, width=width, height=height, progress=lambda *a: calls.append(a))
    assert len(out) == 2 and not calls
    assert any("mask is empty" in r.getMessage() for r in caplog.records if r.name == "sd15")
    for im in out:
        assert im.size == IMAGE_SIZE and np.array_equal(np.asarray(im), np.asarray(image))
        assert parse_infotext(im.info["parameters"]).fields["Inpaint area"] == "Only masked"
    # Blurred to nothing below 1/255 is empty too: a faint mask the blur spreads below 1 level.
    assert crop_region(Inpaint(Image.new("L", IMAGE_SIZE, 0), blur=4).blurred(IMAGE_SIZE), 0) is None
