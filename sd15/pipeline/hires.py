"""A1111's hires fix: txt2img at the requested size, then an img2img pass over the result, upscaled.

    request = Request("a castle", width=512, height=512, hires=Hires(scale=2, upscaler="Latent", steps=15))

  first pass   txt2img at width x height (the infotext's `Size`)
  upscale      to int(w·scale) x int(h·scale), or `resize` (one side 0 keeps the aspect ratio; both given
               cover the box and crop the overhang in latent space, centred), by
                 a latent upscaler: torch's interpolate on the first pass's latents, no decode, or
                 a pixel upscaler: decode, resize the image (PIL), encode again
  second pass  img2img over those latents with `denoising_strength`, exactly `steps` steps (A1111's
               arithmetic: the last `steps` of an int(steps / min(d, 0.999))-step schedule; 0 = the first
               pass's steps), optionally another sampler and other prompts; its noise comes from a fresh
               source seeded as the first pass's (A1111 re-seeds; diffusers' img2img with a generator
               seeded again draws the same)

Everything the second pass needs is a txt2img request at the final size (`second_pass_request`), so the
stages run it as they run the first (`stages.hires_pass`): its own conditioning (prompt editing counts the
hires steps), its own noise source, its own plan. This module holds the settings and the pure parts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..sampling import hires_schedule, resolve_sampler
from . import validation
from .images import pil_to_tensor

if TYPE_CHECKING:
    from .request import Request

# A1111's latent upscale modes (modules/shared.py): name -> (torch interpolate mode, antialias)
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Pixel upscalers without a model: A1111's built-in Lanczos and Nearest (a learned upscaler is later work)
PIXEL_UPSCALERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
UPSCALERS = tuple(LATENT_UPSCALERS) + tuple(PIXEL_UPSCALERS)


def _upscaler_name(name: str) -> str:
    for known in UPSCALERS:
        if name.strip().lower() == known.lower():
            return known
    raise ValueError(f"unknown hires upscaler {name!r}; sd15 has: {', '.join(UPSCALERS)}")


@dataclass(frozen=True)
class Hires:
    """The hires fix of a txt2img request (A1111's enable_hr and its hr_* fields)."""
    scale: float = 2.0                         # hr_scale, used when resize is None
    resize: tuple[int, int] | None = None      # (hr_resize_x, hr_resize_y); a 0 keeps the aspect ratio
    upscaler: str = "Latent"                   # a name of LATENT_UPSCALERS or PIXEL_UPSCALERS
    steps: int = 0                             # hr_second_pass_steps; 0: the first pass's steps
    denoising_strength: float = 0.7
    sampler: str | None = None                 # hr_sampler_name (+ schedule); None: the first pass's
    prompt: str | None = None                  # hr_prompt; None: the first pass's prompts
    negative_prompt: str | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not 1 <= self.scale <= 8:
            raise ValueError(f"hires scale must be a number from 1 to 8, got {self.scale!r}")
        set_("scale", float(self.scale))
        if self.resize is not None:
            r = tuple(self.resize) if isinstance(self.resize, (tuple, list)) else self.resize
            if (not isinstance(r, tuple) or len(r) != 2 or not all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 16384 for v in r) or r == (0, 0)):
                raise ValueError(f"hires resize must be (width, height) in pixels, one of them may be 0 (keep the "
                                 f"aspect ratio), got {r!r}")
            set_("resize", (int(r[0]), int(r[1])))
            if self.scale != 2.0:
                raise ValueError(f"hires: give a scale ({self.scale:g}) or a resize ({r[0]}x{r[1]}), not both")
        if not isinstance(self.upscaler, str):
            raise ValueError(f"hires upscaler must be a name such as 'Latent', got {self.upscaler!r}")
        set_("upscaler", _upscaler_name(self.upscaler))
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 0 <= self.steps <= 150:
            raise ValueError(f"hires steps must be an integer from 0 (the first pass's) to 150, got {self.steps!r}")
        d = self.denoising_strength
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0 < d <= 1:
            raise ValueError(f"hires denoising_strength must be in (0, 1], got {d!r}")
        set_("denoising_strength", float(d))
        if self.sampler is not None:
            set_("sampler", resolve_sampler(self.sampler).full_name)
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"hires {name} must be a string (or None: the first pass's), got {value!r}")
            if value == "":
                set_(name, None)          # A1111: an empty hires prompt means the first pass's

    @classmethod
    def of(cls, value) -> "Hires | None":
        if value is None or isinstance(value, Hires):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"hires has no setting {', '.join(unknown)} (its settings: "
                                 f"{', '.join(f.name for f in dataclasses.fields(cls))})")
            return cls(**value)
        raise ValueError(f"hires must be a Hires(...) or a dict of its fields, got {value!r}")


@dataclass(frozen=True)
class Target:
    upscale_to: tuple[int, int]     # (w, h) the first pass is upscaled to, in pixels
    crop: tuple[int, int]           # (x, y) latent columns / rows cut off (both sides together)
    factor: int

    @property
    def latent_size(self) -> tuple[int, int]:
        """(w, h) of the second pass's latents, after the crop."""
        return (self.upscale_to[0] // self.factor - self.crop[0], self.upscale_to[1] // self.factor - self.crop[1])

    @property
    def size(self) -> tuple[int, int]:
        w, h = self.latent_size
        return w * self.factor, h * self.factor


def target(width: int, height: int, hires: Hires, factor: int = 8) -> Target:
    """Where the first pass goes (A1111's processing.py, StableDiffusionProcessingTxt2Img.init)."""
    if hires.resize is None:
        return Target((int(width * hires.scale), int(height * hires.scale)), (0, 0), factor)
    rx, ry = hires.resize
    if ry == 0:
        return Target((rx, rx * height // width), (0, 0), factor)
    if rx == 0:
        return Target((ry * width // height, ry), (0, 0), factor)
    if width / height < rx / ry:      # cover the box, then crop what overhangs
        to = (rx, rx * height // width)
    else:
        to = (ry * width // height, ry)
    return Target(to, ((to[0] - rx) // factor, (to[1] - ry) // factor), factor)


def check(request: Request) -> None:
    """What the request alone can tell: the final size is valid (before any model work)."""
    t = target(*request.size, request.hires)
    validation.check_size(*t.size, t.factor)
    second_steps = request.hires.steps or request.steps
    hires_schedule(second_steps, request.hires.denoising_strength)


def second_pass_request(request: Request, factor: int = 8) -> Request:
    """The second pass as a txt2img request at the final size: its prompts, sampler, steps and seeds."""
    h = request.hires
    size = target(*request.size, h, factor).size
    changes = dict(width=size[0], height=size[1], hires=None, latents=None, steps=h.steps or request.steps,
                   sampler=h.sampler or request.sampler)
    if h.prompt is not None:
        changes["prompt"] = h.prompt if isinstance(request.prompt, str) else (h.prompt,) * len(request.prompts)
    if h.negative_prompt is not None:
        changes["negative_prompt"] = h.negative_prompt
    if request.control:
        changes["control"] = tuple(soft_in_hires(c) for c in request.control)
    if h.sampler is not None and h.sampler != request.sampler:   # keep the options the hires sampler has too
        declared = {o.name for o in resolve_sampler(h.sampler).options}
        changes["sampler_options"] = {k: v for k, v in request.sampler_options.items() if k in declared}
    return dataclasses.replace(request, **changes)


# A1111's ControlNet extension: edge maps this thin would draw artefacts into the larger image at full
# strength, so the second pass of a hires fix runs these with the soft (prompt-first) scales.
SOFT_IN_HIRES = ("canny", "mlsd")


def soft_in_hires(control):
    if control.mode == "balanced" and not control.guess_mode and control.preprocess in SOFT_IN_HIRES:
        return dataclasses.replace(control, mode="prompt")
    return control


def upscale_latents(latents: torch.Tensor, t: Target, upscaler: str) -> torch.Tensor:
    mode, antialias = LATENT_UPSCALERS[upscaler]
    w, h = t.upscale_to
    return torch.nn.functional.interpolate(latents, size=(h // t.factor, w // t.factor), mode=mode,
                                           antialias=antialias)


def upscale_pixels(images: list[Image.Image], t: Target, upscaler: str) -> torch.Tensor:
    """A1111's resize_image (mode "Just resize") with a model-free upscaler: the upscaler's own resize by the
    scale, Lanczos to that size rounded down to a multiple of 8 (Upscaler.upscale), Lanczos to the target.
    The VAE takes multiples of 8: a last ragged row or column is cut (A1111's encoder drops it too)."""
    w, h = t.upscale_to
    out = []
    for image in images:
        scale = max(w / image.width, h / image.height)
        if scale > 1:
            dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
            image = image.resize((int(image.width * scale), int(image.height * scale)),
                                 resample=PIXEL_UPSCALERS[upscaler])
            if image.size != dest:
                image = image.resize(dest, resample=Image.LANCZOS)
        if image.size != (w, h):
            image = image.resize((w, h), resample=Image.LANCZOS)
        out.append(pil_to_tensor(image.crop((0, 0, w // t.factor * t.factor, h // t.factor * t.factor))))
    return torch.cat(out)


def crop(latents: torch.Tensor, t: Target) -> torch.Tensor:
    """Cut the overhang of a covering resize, centred (A1111's truncate_x/y)."""
    cx, cy = t.crop
    if not cx and not cy:
        return latents
    return latents[:, :, cy // 2:latents.shape[2] - (cy + 1) // 2, cx // 2:latents.shape[3] - (cx + 1) // 2]


def describe(hires: Hires) -> dict[str, object]:
    """The infotext fields A1111 writes for a hires fix (besides Denoising strength)."""
    fields: dict[str, object] = {}
    if hires.resize is None:
        fields["Hires upscale"] = int(hires.scale) if hires.scale == math.floor(hires.scale) else hires.scale
    else:
        fields["Hires resize"] = "{}x{}".format(*hires.resize)
    fields["Hires steps"] = hires.steps or None
    fields["Hires upscaler"] = hires.upscaler
    return fields
