"""Inpainting through the pipeline and the CLI: what users see (parity with diffusers: test_inpaint_parity.py).

A photo-like test image (drawn here: sky gradient, sun, ground, a house) with a masked square: every pixel
outside the blurred mask stays exactly what it was, the masked area is repainted, and the settings are in
the infotext as A1111 writes them.
"""
import logging

import numpy as np
import pytest
from PIL import Image, ImageDraw

import sd15
import sd15.cli.generate as generate
from sd15.pipeline.masks import Inpaint, gaussian_blur, mask_image
from sd15.pipeline.png import read_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_ckpt_file):
    return sd15.load(tiny_ckpt_file, device="cpu")


def photo(w=64, h=48) -> Image.Image:
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    for y in range(h):                                   # sky: blue to pale
        draw.line([(0, y), (w, y)], fill=(70 + 2 * y, 120 + 2 * y, 230))
    draw.rectangle([0, int(h * 0.65), w, h], fill=(60, 130, 50))            # ground
    draw.ellipse([w - 20, 4, w - 6, 18], fill=(250, 220, 90))              # sun
    draw.rectangle([10, 20, 30, 36], fill=(170, 60, 40))                   # a house
    draw.polygon([(8, 20), (20, 10), (32, 20)], fill=(100, 40, 30))
    return img


def square_mask(w=64, h=48, box=(24, 12, 48, 36)) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m


@pytest.mark.parametrize("blur", [0, 4])
def test_outside_the_mask_nothing_changes_inside_it_is_repainted(pipe, blur):
    image, mask = photo(), square_mask()
    out = pipe.inpaint(image, mask, "a red barn", steps=3, seed=2, sampler="euler_a", mask_blur=blur)[0]
    a, b = np.asarray(out, dtype=int), np.asarray(image, dtype=int)
    overlay = Inpaint(mask, blur=blur).processed(image.size).overlay[0, 0].numpy()
    outside = overlay == 0
    assert outside.sum() > 0.3 * outside.size
    assert np.array_equal(a[outside], b[outside])                           # bit for bit
    assert np.abs(a - b)[12:36, 24:48].mean() > 10                         # the square is repainted
    text = out.info["parameters"]
    assert f"Mask blur: {blur}," in text and "Inpaint area: Whole picture" in text and "Denoising strength: 1.0" in text


def test_inverted_mask_and_alpha_masks():
    rgba = Image.new("RGBA", (16, 16), (255, 255, 255, 255))
    rgba.putalpha(Image.eval(square_mask(16, 16, (4, 4, 12, 12)), lambda v: 200 if v else 0))
    assert np.array_equal(np.asarray(mask_image(rgba)), np.asarray(square_mask(16, 16, (4, 4, 12, 12))))
    plain = Inpaint(square_mask(16, 16, (4, 4, 12, 12)), blur=0).processed((16, 16)).binary
    inverted = Inpaint(square_mask(16, 16, (4, 4, 12, 12)), blur=0, invert=True).processed((16, 16)).binary
    assert np.array_equal(plain.numpy(), 1 - inverted.numpy())


def test_mask_of_another_size_is_resized_to_the_image(pipe):
    masks = Inpaint(square_mask(32, 24, (12, 6, 24, 18)), blur=0).processed((64, 48))
    assert masks.binary.shape == (1, 1, 48, 64) and masks.binary[0, 0, 24, 36] == 1 and masks.binary[0, 0, 2, 2] == 0


def test_blur_is_separable_gaussian_of_a1111s_size():
    m = gaussian_blur(square_mask(40, 40, (10, 10, 30, 30)), 4)
    a = np.asarray(m, dtype=int)
    assert a[20, 20] >= 250 and a[0, 0] == 0 and 0 < a[20, 10] < 255       # soft edge, untouched far away
    assert np.abs(a - a.T).max() <= 1          # the same blur both ways (one rounding per pass, as OpenCV)
    wide = np.asarray(gaussian_blur(square_mask(60, 60, (20, 20, 40, 40)), 4), dtype=int)
    assert wide[30, 9] == 0 and wide[30, 10] > 0                             # kernel radius 10 (size 21)


def test_empty_mask_returns_the_image_unchanged(pipe, caplog):
    image = photo()
    with caplog.at_level(logging.WARNING, "sd15"):
        out = pipe.inpaint(image, Image.new("L", image.size, 0), "x", steps=2, seed=1)[0]
    assert np.array_equal(np.asarray(out), np.asarray(image))
    assert any("mask is empty" in r.getMessage() for r in caplog.records)


def test_full_mask_is_img2img_over_everything(pipe):
    image = photo()
    out = pipe.inpaint(image, Image.new("L", image.size, 255), "x", steps=2, seed=1, mask_blur=0)[0]
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(image, dtype=int)).mean() > 10


def test_masked_content_modes_differ(pipe):
    image, mask = photo(), square_mask()
    results = {fill: np.asarray(pipe.inpaint(image, mask, "x", strength=0.6, steps=4, seed=3, fill=fill,
                                             sampler="euler")[0]) for fill in ("original", "fill", "latent noise",
                                                                               "latent nothing")}
    assert len({r.tobytes() for r in results.values()}) == 4


def test_a1111_fill_fills_the_hole_from_around_it_and_keeps_the_rest():
    from sd15.pipeline.masks import a1111_fill
    image, mask = photo(), square_mask()
    filled = np.asarray(a1111_fill(image, mask), dtype=int)
    original = np.asarray(image, dtype=int)
    keep = np.asarray(mask) == 0
    assert np.array_equal(filled[keep], original[keep])
    hole = filled[12:36, 24:48]
    assert not np.array_equal(hole, original[12:36, 24:48])                 # the hole is replaced ...
    around = original[keep]                                                    # ... by colours from around it
    assert (hole.reshape(-1, 3).min(0) >= around.min(0) - 1).all() and (hole.reshape(-1, 3).max(0) <= around.max(0) + 1).all()


def test_cli_mask(tiny_ckpt_file, tmp_path, capsys):
    photo().save(tmp_path / "photo.png")
    square_mask().save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    code = generate.main(["--ckpt", str(tiny_ckpt_file), "--prompt", "a barn", "--init-image", str(tmp_path / "photo.png"),
                          "--mask", str(tmp_path / "mask.png"), "--mask-blur", "2", "--strength", "1", "--steps", "2",
                          "--device", "cpu", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "Mask blur: 2," in read_parameters(out)
    code = generate.main(["--ckpt", str(tiny_ckpt_file), "--prompt", "x", "--mask", str(tmp_path / "mask.png"),
                          "--device", "cpu", "--quiet", "--out", str(tmp_path / "o2.png")])
    assert code == 2 and "give the image (init_image; CLI --init-image)" in capsys.readouterr().err
    code = generate.main(["--ckpt", str(tiny_ckpt_file), "--prompt", "x", "--mask-blur", "3",
                          "--device", "cpu", "--quiet", "--out", str(tmp_path / "o3.png")])
    assert code == 2 and "give the mask (--mask FILE)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def inpainting_pipe(tmp_path_factory):
    """The tiny demo checkpoint with a 9-channel first conv: what an inpainting fine-tune's file looks like."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from sd15.models.demo import write_demo_checkpoint
    base = write_demo_checkpoint(tmp_path_factory.mktemp("inp") / "base.safetensors")
    with safe_open(str(base), "pt") as f:
        metadata = f.metadata()
    state, key = load_file(str(base)), "model.diffusion_model.input_blocks.0.0.weight"
    extra = torch.randn(state[key].shape[0], 5, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    state[key] = torch.cat([state[key], extra], dim=1)
    path = base.with_name("inpainting.safetensors")
    save_file(state, str(path), metadata=metadata)
    return sd15.load(path, device="cpu")


def test_an_inpainting_checkpoint_runs_every_path(inpainting_pipe):
    pipe = inpainting_pipe
    assert pipe.unet.cfg.in_channels == 9
    image, mask = photo(), square_mask()
    kw = dict(steps=2, seed=1)
    outputs = [pipe.txt2img("x", width=64, height=48, **kw)[0], pipe.img2img(image, "x", **kw)[0],
               pipe.inpaint(image, mask, "x", **kw)[0], pipe.inpaint(image, mask, "x", strength=0.6, **kw)[0],
               pipe.txt2img("x", width=32, height=24, hires=dict(steps=2), **kw)[0]]
    assert [o.size for o in outputs] == [(64, 48)] * 5
    weak = pipe.inpaint(image, mask, "x", mask_weight=0.5, **kw)[0]          # the model sees the real hole
    assert not np.array_equal(np.asarray(weak), np.asarray(outputs[2]))
    assert "Conditional mask weight: 0.5" in weak.info["parameters"]


def test_outpaint_extends_the_canvas_and_keeps_the_image(pipe):
    image = photo(64, 48)
    out = pipe.outpaint(image, "more sky", right=20, top=8, steps=2, seed=4, mask_blur=0)[0]
    assert out.size == (88, 56)                               # 64+20 -> 88 (a multiple of 8), 48+8 = 56
    a, b = np.asarray(out, dtype=int), np.asarray(image, dtype=int)
    assert np.array_equal(a[8:56, 0:64], b)                   # the old image, untouched, where it was
    assert np.abs(a[8:56, 64:] - b[:, -1:]).mean() > 5       # the new margin is painted, not the edge copy
    from sd15.pipeline.masks import outpaint_canvas
    canvas, mask = outpaint_canvas(image, left=4)
    assert canvas.size == (72, 48) and np.asarray(mask)[:, :4].min() == 255 and np.asarray(mask)[:, 4:68].max() == 0
    with pytest.raises(ValueError, match="at least one side"):
        outpaint_canvas(image)


def test_cli_only_masked_and_outpaint(tiny_ckpt_file, tmp_path, capsys):
    photo().save(tmp_path / "photo.png")
    square_mask().save(tmp_path / "mask.png")
    common = ["--ckpt", str(tiny_ckpt_file), "--prompt", "a barn", "--init-image", str(tmp_path / "photo.png"),
              "--steps", "2", "--device", "cpu", "--quiet"]
    out = tmp_path / "crop.png"
    assert generate.main(common + ["--mask", str(tmp_path / "mask.png"), "--inpaint-only-masked", "--mask-padding",
                                   "8", "--width", "32", "--height", "32", "--out", str(out)]) == 0
    text = read_parameters(out)
    assert Image.open(out).size == (64, 48) and "Inpaint area: Only masked" in text and "Masked area padding: 8" in text
    out = tmp_path / "wide.png"
    assert generate.main(common + ["--outpaint", "0,16,0,0", "--out", str(out)]) == 0
    assert Image.open(out).size == (80, 48) and "Denoising strength: 1.0" in read_parameters(out)
    assert generate.main(common + ["--outpaint", "0,16", "--out", str(tmp_path / "bad.png")]) == 2
    assert "--outpaint takes LEFT,RIGHT,TOP,BOTTOM" in capsys.readouterr().err
