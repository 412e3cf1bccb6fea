"""Image conversions at the edges of the pipeline: user images in, decoded tensors out."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An init image that is missing, unreadable, truncated or of an unusable shape."""


def open_image(source, what: str = "init image") -> Image.Image:
    """A PIL image from a path (fully decoded now, so a truncated file fails here, not mid-run).
    `what` names the image in errors ("init image", "--from-png image", ...)."""
    if isinstance(source, Image.Image):
        return source
    path = Path(source)
    if not path.exists():
        raise ImageError(f"{what} {path} does not exist")
    if path.is_dir():
        raise ImageError(f"{what} {path} is a directory, not an image file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{what} {path} could not be read as an image ({e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    16/32-bit greyscale is rescaled from its own range (PIL's convert would clip it to white); palette
    and alpha modes drop alpha the way diffusers does (the colours under transparent pixels are kept).
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("RGB") if img.mode != "RGB" else img


def snap_to_multiple_of_8(img: Image.Image) -> Image.Image:
    """Round each side down to a multiple of 8 with a Lanczos resize (what diffusers' img2img does)."""
    w, h = img.size
    w8, h8 = w - w % 8, h - h % 8
    if w8 == 0 or h8 == 0:
        raise ImageError(f"init image is {w}x{h}; it must be at least 8x8 pixels")
    return img.resize((w8, h8), resample=Image.LANCZOS)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> [1,3,H,W] float32 in [-1, 1]."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2.0 - 1.0


def init_image_tensor(source, size: tuple[int, int] | None = None) -> torch.Tensor:
    """img2img input (PIL image, path, or tensor) -> [B,3,H,W] float32 in [-1, 1], sides multiples of 8.

    Tensors are taken as [3,H,W] or [B,3,H,W] in [0, 1] (torchvision's convention); a tensor with
    negative values is assumed to be in [-1, 1] already. size=(width, height): a PIL image or file is
    resized to it with Lanczos (A1111's "Just resize"); a tensor must have it already.
    """
    return Pixels.of(source, size).tensor


@dataclass(frozen=True, eq=False)
class Pixels:
    """Images as the pipeline takes them: [B,3,H,W] float32 in [-1, 1], sides multiples of 8.

    A request holds its init image as Pixels, converted once when the request is made (so a broken file
    fails then, before any model work); equal when the tensors are. `source` keeps the RGB PIL image it
    came from (None for tensors), so asking for another size resizes the original, not a resized copy.
    """
    tensor: torch.Tensor
    source: Image.Image | None = None

    @classmethod
    def of(cls, source, size: tuple[int, int] | None = None) -> "Pixels":
        """From a PIL image, a path, a tensor, or Pixels (at another `size`: from its source image)."""
        if isinstance(source, Pixels):
            if size is None or tuple(size) == source.size:
                return source
            if source.source is None:
                return cls(_checked_tensor(source.tensor, size))
            source = source.source
        if isinstance(source, torch.Tensor):
            return cls(_checked_tensor(source, size))
        img = to_rgb(open_image(source))
        resized = img if size is None or img.size == tuple(size) else img.resize(tuple(size), resample=Image.LANCZOS)
        return cls(pil_to_tensor(snap_to_multiple_of_8(resized)), img)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)"""
        return self.tensor.shape[-1], self.tensor.shape[-2]

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __eq__(self, other) -> bool:
        return isinstance(other, Pixels) and torch.equal(self.tensor, other.tensor)

    def __repr__(self) -> str:
        return f"Pixels({len(self)} x {self.size[0]}x{self.size[1]})"


def _checked_tensor(source: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """A user's tensor as Pixels' tensor: a private float32 copy, in [-1, 1]."""
    t = source.detach().to("cpu", torch.float32, copy=True)
    t = t[None] if t.dim() == 3 else t
    if t.dim() != 4 or t.shape[1] != 3:
        raise ImageError(f"init image tensor must be [3,H,W] or [B,3,H,W], got {tuple(source.shape)}")
    if t.shape[-1] % 8 or t.shape[-2] % 8:
        raise ImageError(f"init image tensor sides must be multiples of 8, got {tuple(t.shape[-2:])}")
    if not torch.isfinite(t).all():
        raise ImageError("init image tensor contains NaN or infinite values")
    if size is not None and tuple(size) != (t.shape[-1], t.shape[-2]):
        raise ImageError(f"init image tensor is {t.shape[-1]}x{t.shape[-2]}, but {size[0]}x{size[1]} was asked "
                         "for; resize the tensor or leave width and height unset")
    return t if t.min() < 0 else t * 2.0 - 1.0


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Decoded [B,3,H,W] in about [-1, 1] -> PIL images: (x/2+0.5).clamp(0,1)·255, rounded."""
    a = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(x) for x in (a * 255).round().astype(np.uint8)]
