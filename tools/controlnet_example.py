"""The README's ControlNet example: control image -> Canny map -> without / with the ControlNet, made with
the tiny demo model and a tiny random ControlNet.

    python -m tools.controlnet_example docs/images/controlnet-demo.png

Both models have random weights, so the pictures are noise; the point is the path: the Canny map is what
the ControlNet sees, and the same seed gives a different picture once it is applied.
"""

import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

import sd15
from sd15.models.demo import write_demo_checkpoint, write_demo_controlnet
from sd15.pipeline.preprocess import canny
from tools.inpaint_example import scene


def main(out: str) -> None:
    image = scene(160, 160)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = sd15.load(write_demo_checkpoint(Path(tmp) / "demo.safetensors"), device="cpu")
        cn = sd15.load_controlnet(write_demo_controlnet(Path(tmp) / "control_demo_canny.safetensors"), pipe)
        settings = dict(steps=8, seed=7, sampler="euler_a", width=160, height=160)
        plain = pipe.txt2img("a house on a hill", **settings)[0]
        controlled = pipe.txt2img("a house on a hill", **settings,
                                  control=[sd15.Control(cn, image, preprocess="canny")])[0]
    panels = ((image, "control image"), (canny(image), "canny (what the ControlNet sees)"),
              (plain, "seed 7, no ControlNet"), (controlled, "seed 7, ControlNet (demo: noise)"))
    w, h = image.size
    sheet = Image.new("RGB", (4 * w + 30, h + 24), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (panel, label) in enumerate(panels):
        sheet.paste(panel, (i * (w + 10), 24))
        draw.text((i * (w + 10) + 2, 6), label, fill=(0, 0, 0))
    sheet.save(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/images/controlnet-demo.png")
