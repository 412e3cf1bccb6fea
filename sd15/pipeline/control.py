"""ControlNet in a generation: the settings (`Control`) and the UNet wrapper that applies them.

    net, _ = sd15.models.loading.load_controlnet("control_v11p_sd15_canny.safetensors", unet=pipe.unet.cfg)
    request = Request("a house", control=(Control(net, "edges.png", strength=0.8, end=0.6),))

At the denoiser seam (`stages.denoise`) the UNet callable that guidance drives, `unet(x, t, context)`, is
wrapped (`controlled`): each call first runs every ControlNet active at this step on the same latents,
timestep and text rows, scales its residuals, sums them over the ControlNets and passes the sum to the
UNet as `residuals=`. As diffusers' StableDiffusionControlNetPipeline:

- `strength` is `controlnet_conditioning_scale`;
- `start` / `end` are `control_guidance_start` / `_end`: step i of N runs the ControlNet unless
  i/N < start or (i+1)/N > end (diffusers runs it with scale 0 there; skipping it adds the same nothing);
- `guess_mode`: the ControlNet sees only the conditional rows (the unconditional ones get no residuals)
  and its 13 residuals are scaled by logspace(-1, 0, 13), shallow to deep;
- an inpainting UNet's extra input channels are not the ControlNet's: it sees the first 4 only.

Not here: A1111's control modes, preprocessors, infotext.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models.unet import Residuals
from .images import Pixels

if TYPE_CHECKING:
    from ..models.controlnet import ControlNet


@dataclass(frozen=True, eq=False)
class Control:
    """One ControlNet applied to a generation (equal only to itself: it holds a model)."""
    model: "ControlNet"          # a loaded ControlNet (sd15.models.loading.load_controlnet)
    image: object                # control image: PIL, path or tensor [3,H,W] / [1,3,H,W] in [0, 1] RGB
    strength: float = 1.0        # scale of its residuals (diffusers' controlnet_conditioning_scale)
    start: float = 0.0           # fraction of the steps before it starts (control_guidance_start)
    end: float = 1.0             # fraction of the steps after which it stops (control_guidance_end)
    guess_mode: bool = False     # conditional rows only, residuals scaled by logspace(-1, 0, 13)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        from ..models.controlnet import ControlNet
        if not isinstance(self.model, ControlNet):
            raise ValueError(f"Control.model must be a loaded ControlNet (load_controlnet), got "
                             f"{type(self.model).__name__}")
        image = self.image
        if isinstance(image, torch.Tensor):      # kept in [0, 1] at any size; resized when it is used
            t = image.detach().to("cpu", torch.float32, copy=True)
            t = t[None] if t.dim() == 3 else t
            if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != 3:
                raise ValueError(f"control image tensor must be [3,H,W] or [1,3,H,W], got {tuple(image.shape)}")
            if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
                raise ValueError("control image tensor must be RGB in [0, 1]")
            set_("image", t)
        elif not isinstance(image, Pixels):
            set_("image", Pixels.of(image))
            if len(self.image) != 1:
                raise ValueError("a Control takes one control image")
        for name in ("strength", "start", "end"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
                raise ValueError(f"Control.{name} must be a number, got {v!r}")
            set_(name, float(v))
        if self.strength < 0:
            raise ValueError(f"Control.strength must be >= 0, got {self.strength}")
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(f"Control needs 0 <= start < end <= 1, got start {self.start}, end {self.end}")
        if not isinstance(self.guess_mode, bool):
            raise ValueError(f"Control.guess_mode must be True or False, got {self.guess_mode!r}")

    def active(self, step: int, steps: int) -> bool:
        """Whether it runs at 0-based step `step` of `steps` (diffusers' controlnet_keep)."""
        return not (step / steps < self.start or (step + 1) / steps > self.end)

    def hint(self, width: int, height: int) -> torch.Tensor:
        """The control image at the generation size: [1, 3, height, width] float32 RGB in [0, 1]."""
        if isinstance(self.image, torch.Tensor):
            t = self.image
            if tuple(t.shape[-2:]) != (height, width):
                t = F.interpolate(t, size=(height, width), mode="bilinear", antialias=True,
                                  align_corners=False).clamp(0, 1)
            return t
        # the original image, resized with Lanczos (as diffusers' control image processor), /255 exactly
        source = self.image.source
        if source is None:
            return (Pixels.of(self.image, (width, height)).tensor + 1) / 2
        if source.size != (width, height):
            source = source.resize((width, height), resample=Image.LANCZOS)
        return torch.from_numpy(np.asarray(source, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def check_controls(controls) -> tuple[Control, ...]:
    if isinstance(controls, Control):
        return (controls,)
    if not isinstance(controls, (list, tuple)) or not all(isinstance(c, Control) for c in controls):
        raise ValueError(f"control must be a list of Control, got {controls!r}")
    return tuple(controls)


def controlled(unet, controls: tuple[Control, ...], size: tuple[int, int], latent_channels: int,
               conditional=None):
    """`unet(x, t, context)` with the ControlNets' residuals added. Returns (wrapped unet, set_step):
    `set_step(step, steps)` tells the wrapper which sampler step the next calls belong to.

    `conditional(context, rows) -> slice | None`: which rows of a call are conditional (guess mode);
    None when the rows cannot be told apart, and guess mode is refused."""
    width, height = size
    hints = [c.hint(width, height) for c in controls]
    where = {"step": 0, "steps": 1}

    def set_step(step: int, steps: int) -> None:
        where["step"], where["steps"] = step, steps

    def unet_with_control(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
        total = None
        for control, hint in zip(controls, hints):
            if not control.active(where["step"], where["steps"]):
                continue
            net = control.model
            rows = slice(None)
            if control.guess_mode:
                rows = conditional(context, len(x)) if conditional is not None else None
                if rows is None:
                    raise ValueError("ControlNet guess mode needs a plain prompt (one text per image, no prompt "
                                     "editing or AND)")
            xc, tc, cc = x[rows, :latent_channels], t[rows], context[rows]
            if len(xc) == 0:
                continue
            param = next(net.parameters())
            h = hint.to(param.device, param.dtype).expand(len(xc), -1, -1, -1)
            res = net(xc.to(param.dtype), tc, cc.to(param.dtype), h)
            parts = [*res.skips, res.mid]
            if control.guess_mode:      # one float32 factor per residual, as diffusers multiplies
                scales = torch.logspace(-1, 0, len(parts), device=xc.device) * control.strength
                parts = [p * s for p, s in zip(parts, scales)]
            else:
                parts = [p * control.strength for p in parts]
            if rows != slice(None):
                full = []
                for p in parts:
                    z = torch.zeros((len(x), *p.shape[1:]), dtype=p.dtype, device=p.device)
                    z[rows] = p
                    full.append(z)
                parts = full
            total = parts if total is None else [a + b for a, b in zip(total, parts)]
        if total is None:
            return unet(x, t, context, **kwargs)
        return unet(x, t, context, residuals=Residuals(tuple(total[:-1]), total[-1]), **kwargs)

    return unet_with_control, set_step
