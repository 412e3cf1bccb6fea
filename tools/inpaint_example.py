"""The README's inpainting example: before / mask / after, side by side, made with the tiny demo model.

    python -m tools.inpaint_example docs/images/inpainting-demo.png

The demo model has random weights, so what it paints inside the mask is noise; the point of the picture is
what stays: every pixel outside the (blurred) mask is the original's.
"""

import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

import sd15
from sd15.models.demo import write_demo_checkpoint


def scene(w: int = 192, h: int = 144) -> Image.Image:
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    for y in range(h):
        draw.line([(0, y), (w, y)], fill=(70 + y // 2, 120 + y // 2, 230))
    draw.rectangle([0, int(h * 0.65), w, h], fill=(60, 130, 50))
    draw.ellipse([w - 50, 10, w - 14, 46], fill=(250, 220, 90))
    draw.rectangle([24, 60, 84, 108], fill=(170, 60, 40))
    draw.polygon([(18, 60), (54, 30), (90, 60)], fill=(100, 40, 30))
    return img


def main(out: str) -> None:
    image = scene()
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).ellipse([96, 40, 176, 120], fill=255)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = sd15.load(write_demo_checkpoint(Path(tmp) / "demo.safetensors"), device="cpu")
        after = pipe.inpaint(image, mask, "a tree", steps=8, seed=7, sampler="euler_a")[0]
    w, h = image.size
    sheet = Image.new("RGB", (3 * w + 20, h + 24), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (panel, label) in enumerate(((image, "before"), (mask.convert("RGB"), "mask (white: repaint)"),
                                         (after, "after (demo model: noise inside)"))):
        sheet.paste(panel, (i * (w + 10), 24))
        draw.text((i * (w + 10) + 4, 6), label, fill=(0, 0, 0))
    sheet.save(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/images/inpainting-demo.png")
