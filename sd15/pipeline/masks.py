"""Inpainting masks: what the user draws, as the UNet, the latent blend and the paste-back need it.

    Request("a red door", init_image=photo, inpaint=Inpaint(mask="mask.png", blur=4))

White (1) is repainted, black (0) kept. The mask is read once when the request is made, then, at the
init image's size:
  blurred   A1111's mask blur: a separable Gaussian of the 8-bit mask (OpenCV's kernel, sigma = blur,
            size 2·int(2.5·blur + 0.5) + 1, reflected borders), before anything else
  binary    >= 0.5 after a Lanczos resize to the image (diffusers' mask processor): the mask the UNet's
            extra channel, the masked image and the latent blend use
  overlay   min(2·blurred, 1): A1111's paste-back mask, through which the original pixels are put back, so
            nothing outside it ever changes (diffusers leaves the VAE's round trip there)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from .images import ImageError, open_image

FILLS = ("original", "fill", "latent noise", "latent nothing")   # A1111's "Masked content"
BLENDS = ("diffusers", "a1111")


def mask_image(source, what: str = "mask") -> Image.Image:
    """Any image as an 8-bit "L" mask: an RGBA image with transparency gives its alpha (A1111's
    create_binary_mask: > 128 is white); anything else its luminance. A tensor is [H,W] or [1,H,W] in [0, 1]."""
    if isinstance(source, torch.Tensor):
        t = source.detach().float().cpu()
        t = t[0] if t.dim() == 3 else t
        if t.dim() != 2 or not torch.isfinite(t).all():
            raise ImageError(f"{what} tensor must be [H,W] or [1,H,W] of finite values in [0, 1], got "
                             f"{tuple(source.shape)}")
        return Image.fromarray((t.clamp(0, 1).numpy() * 255).round().astype(np.uint8), mode="L")
    img = open_image(source, what=what)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda v: 255 if v > 128 else 0)
    return img.convert("L")


def _fixed_point_kernel(k: int, sigma: float) -> np.ndarray:
    """OpenCV's 8-bit Gaussian kernel: the float taps in units of 1/256, rounded with the error carried on
    to the next tap, the centre taking what makes them sum to exactly 256 (getGaussianKernelFixedPoint_ED)."""
    half = k // 2
    taps = [np.exp(-0.125 * (x * x) / (sigma * sigma)) for x in range(1 - k, 0, 2)]   # x: twice the offset
    norm = 1.0 / (2 * sum(taps) + 1.0)
    out, err = np.zeros(k, dtype=np.int64), 0.0
    for i, t in enumerate(taps):
        v = t * norm * 256 + err
        out[i] = out[k - 1 - i] = int(np.rint(v))          # cvRound: to nearest, ties to even
        err = v - out[i]
    out[half] = 256 - 2 * int(out[:half].sum())
    return out


def gaussian_blur(mask: Image.Image, blur: float) -> Image.Image:
    """A1111's mask blur: cv2.GaussianBlur of the 8-bit mask with a (k, 1) then a (1, k) kernel, sigma = blur,
    bit for bit: for 8-bit images OpenCV filters in fixed point (taps in 1/256, an 8-bit result rounded half
    up after each pass), which a float convolution misses by up to 3 levels."""
    if blur <= 0:
        return mask
    k = 2 * int(2.5 * blur + 0.5) + 1
    kernel = _fixed_point_kernel(k, blur)
    a = np.asarray(mask, dtype=np.int64)
    for axis in (1, 0):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (k // 2, k // 2)
        padded = np.pad(a, pad, mode="reflect")         # OpenCV's default border: reflect-101
        n = a.shape[axis]
        acc = sum(int(w) * padded[(slice(None), slice(i, i + n)) if axis else (slice(i, i + n), slice(None))]
                  for i, w in enumerate(kernel))
        a = (acc + 128) >> 8
    return Image.fromarray(a.astype(np.uint8), mode="L")


def a1111_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content (modules/masking.py): the hole filled from the image around it, by
    alpha-compositing ever less blurred copies of the image with the hole cut out; outside the mask the last
    copy (radius 0) is the image itself."""
    canvas = Image.new("RGBA", image.size)
    cut = Image.new("RGBa", image.size)
    cut.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = cut.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            canvas.alpha_composite(blurred)
    return canvas.convert("RGB")


@dataclass(frozen=True, eq=False)
class Inpaint:
    """The inpainting settings of an img2img request (A1111's inpaint tab, diffusers' mask_image)."""
    mask: Image.Image                    # the "L" mask as given (any source is converted when made)
    blur: float = 4.0                    # A1111's "Mask blur" (0: none, as diffusers)
    invert: bool = False                 # A1111's "Inpaint not masked"
    fill: str = "original"               # "Masked content": the start of the masked area
    blend: str = "diffusers"             # 4-channel UNets: diffusers' latent blend, or A1111's x0 blend
    mask_weight: float = 1.0             # A1111's "Conditional mask weight" (inpainting UNets)
    only_masked: bool = False            # A1111's "Inpaint area: Only masked": crop, generate, paste back
    padding: int = 32                    # "Only masked padding, pixels" around the mask's bounding box
    paste_back: bool = True              # False: diffusers' whole-picture result, the VAE's round trip kept

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("mask", mask_image(self.mask))
        if not isinstance(self.blur, (int, float)) or isinstance(self.blur, bool) or not 0 <= self.blur <= 64:
            raise ValueError(f"mask blur must be a number from 0 to 64 pixels, got {self.blur!r}")
        set_("blur", float(self.blur))
        if not isinstance(self.invert, bool):
            raise ValueError(f"invert must be True or False, got {self.invert!r}")
        if self.fill not in FILLS:
            raise ValueError(f"masked content (fill) must be one of {', '.join(FILLS)}, got {self.fill!r}")
        if self.blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        w = self.mask_weight
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w <= 1:
            raise ValueError(f"mask_weight must be a number in [0, 1], got {w!r}")
        set_("mask_weight", float(w))
        for name in ("only_masked", "paste_back"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.padding, int) or isinstance(self.padding, bool) or not 0 <= self.padding <= 1024:
            raise ValueError(f"padding must be a whole number of pixels from 0 to 1024, got {self.padding!r}")

    @classmethod
    def of(cls, value) -> "Inpaint | None":
        if value is None or isinstance(value, Inpaint):
            return value
        if isinstance(value, dict):
            return cls(**value)
        return cls(mask=value)            # just a mask: the defaults for the rest

    def __eq__(self, other) -> bool:
        return isinstance(other, Inpaint) and np.array_equal(np.asarray(self.mask), np.asarray(other.mask)) and \
            self._settings() == other._settings()

    def _settings(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "mask")

    __hash__ = None

    def blurred(self, size: tuple[int, int]) -> Image.Image:
        """The mask inverted if asked, blurred, at (width, height): the "L" image every other mask comes from."""
        m = ImageOps.invert(self.mask) if self.invert else self.mask
        m = gaussian_blur(m, self.blur)
        return m if m.size == tuple(size) else m.resize(tuple(size), resample=Image.LANCZOS)

    def processed(self, size: tuple[int, int]) -> "Masks":
        """The masks at the image's (width, height)."""
        soft = torch.from_numpy(np.asarray(self.blurred(size), dtype=np.float32) / 255.0)[None, None]
        return Masks(binary=(soft >= 0.5).float(), overlay=(2 * soft).clamp(max=1.0))


@dataclass(frozen=True)
class Masks:
    binary: torch.Tensor     # [1,1,H,W] 0/1: repaint where 1
    overlay: torch.Tensor    # [1,1,H,W] in [0, 1]: how much of the generated image the paste-back keeps

    @property
    def empty(self) -> bool:
        return not bool(self.binary.any())

    def latent(self, factor: int) -> torch.Tensor:
        """The binary mask at latent size (nearest, as diffusers' prepare_mask_latents)."""
        h, w = self.binary.shape[-2:]
        return torch.nn.functional.interpolate(self.binary, size=(h // factor, w // factor))


def paste_back(generated: torch.Tensor, original: torch.Tensor, masks: Masks) -> torch.Tensor:
    """Images in [-1, 1]: the original wherever the overlay mask is 0, the generated image where it is 1,
    mixed in between (A1111's apply_overlay)."""
    a = masks.overlay.to(generated.device, generated.dtype)
    return original.to(generated.device, generated.dtype) * (1 - a) + generated * a


def outpaint_canvas(image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                    multiple: int = 8) -> tuple[Image.Image, Image.Image]:
    """The image on a larger canvas and the mask of what is new (white), for outpainting by inpainting.

    The new margins repeat the image's edge pixels (their content matters only below strength 1); the right and
    bottom margins grow by what the canvas needs to reach a multiple of 8 on each side."""
    for name, value in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 4096:
            raise ValueError(f"outpaint {name} must be a whole number of pixels from 0 to 4096, got {value!r}")
    if not (left or right or top or bottom):
        raise ValueError("outpainting needs at least one side to extend (left, right, top, bottom)")
    from .images import to_rgb
    img = to_rgb(open_image(image))
    w, h = img.width + left + right, img.height + top + bottom
    right, bottom = right + (-w) % multiple, bottom + (-h) % multiple
    a = np.pad(np.asarray(img), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(a.shape[:2], 255, dtype=np.uint8)
    mask[top:top + img.height, left:left + img.width] = 0
    return Image.fromarray(a), Image.fromarray(mask, mode="L")
