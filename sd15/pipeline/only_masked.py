"""A1111's "Inpaint area: Only masked" (diffusers' `padding_mask_crop`): inpaint a crop around the mask at
the full processing size, then paste it back.

  crop      the (blurred) mask's bounding box, `padding` pixels more on each side, grown to the processing
            aspect ratio and shifted to stay inside the image (A1111's get_crop_region + expand_crop_region,
            the same algorithm as diffusers' get_crop_region)
  generate  image and mask cropped and resized to the processing size ("resize and fill"); the inner
            generation pastes nothing back
  paste     the result resized back to the crop ("crop and resize"), put on the original at the crop's
            corner, and the original composited over it through the blurred mask (A1111's apply_overlay)

The generation itself is an ordinary inpainting request (`inner_request`); this module holds the geometry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .images import tensor_to_pil

if TYPE_CHECKING:
    from .request import Request


def crop_region(mask: Image.Image, pad: int) -> tuple[int, int, int, int] | None:
    """The bounding box (x1, y1, x2, y2) of the mask's non-zero pixels, padded and clipped; None if empty."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def expand_crop_region(box: tuple[int, int, int, int], width: int, height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:
    """Grow the box to the processing aspect ratio width/height, shifted back inside the image."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        grow = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = _shifted(y1 - grow // 2, y2 + grow - grow // 2, image_height)
    else:
        grow = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = _shifted(x1 - grow // 2, x2 + grow - grow // 2, image_width)
    return x1, y1, x2, y2


def _shifted(lo: int, hi: int, size: int) -> tuple[int, int]:
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's resize mode 2 ("resize and fill"): fit inside, centred, the edges stretched into the rest."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return out


def resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's resize mode 1 ("crop and resize"): cover, centred, the overhang cut."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


@dataclass(frozen=True)
class Paste:
    """Where the inner result goes back."""
    original: Image.Image          # the whole init image
    overlay: Image.Image           # the whole blurred mask ("L")
    box: tuple[int, int, int, int]


def inner_request(request: Request) -> tuple[Request, Paste]:
    """The crop's inpainting request and where its result goes. An empty mask: the whole image, whose inner
    run warns and paints nothing, pasted back through the empty mask: the original, at its own size."""
    inpaint, pixels = request.inpaint, request.init_image
    original = pixels.source.convert("RGB") if pixels.source is not None else tensor_to_pil(pixels.tensor[:1])[0]
    if len(pixels) > 1:
        raise ValueError("only_masked inpaints one init image (a batch of init images: use the whole picture)")
    blurred = inpaint.blurred(original.size)
    box = crop_region(blurred, inpaint.padding)
    width, height = request.size
    box = (0, 0, *original.size) if box is None else expand_crop_region(box, width, height, *original.size)
    inner = dataclasses.replace(
        request, init_image=resize_fill(original.crop(box), width, height), width=width, height=height,
        inpaint=dataclasses.replace(inpaint, mask=resize_fill(blurred.crop(box), width, height), blur=0.0,
                                    invert=False, only_masked=False, paste_back=False),
        control=tuple(_cropped_control(c, box, original.size, width, height) for c in request.control))
    return inner, Paste(original, blurred, box)


def _cropped_control(control, box, size, width: int, height: int):
    """A control image drawn for the whole picture, cut to the crop as the init image is (one without its own
    image follows the init image already)."""
    image = control.image
    if image is None:
        return control
    if isinstance(image, torch.Tensor):
        image = tensor_to_pil(image * 2 - 1)[0]
    else:
        image = image.source if image.source is not None else tensor_to_pil(image.tensor[:1])[0]
    image = image.convert("RGB").resize(size, Image.LANCZOS) if image.size != size else image.convert("RGB")
    return dataclasses.replace(control, image=resize_fill(image.crop(box), width, height))


def paste(images: list[Image.Image], where: Paste, paste_back: bool = True) -> list[Image.Image]:
    """The inner results back on the original, composited through the blurred mask."""
    x1, y1, x2, y2 = where.box
    alpha = np.asarray(where.overlay, dtype=np.float32)[..., None] / 255.0
    source = np.asarray(where.original, dtype=np.float32)
    out = []
    for image in images:
        base = where.original.copy()
        base.paste(resize_crop(image, x2 - x1, y2 - y1), (x1, y1))
        if paste_back:
            mixed = source * (1 - alpha) + np.asarray(base, dtype=np.float32) * alpha
            base = Image.fromarray(np.clip(np.round(mixed), 0, 255).astype(np.uint8))
        base.info.update(image.info)
        out.append(base)
    return out
