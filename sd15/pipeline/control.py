"""ControlNet in a generation: the loaded file (`ControlNetFile`), its settings (`Control`), and the UNet
wrapper that applies them (`controlled`).

    cn = sd15.load_controlnet("control_v11p_sd15_canny.safetensors", pipe)
    request = Request("a house", control=[Control(cn, "photo.png", preprocess="canny", end=0.6)])

At the denoiser seam (`stages.denoise`) the UNet callable that guidance drives is wrapped: each call
first runs every ControlNet active at this step on the same latents, timestep and text rows, scales its
13 residuals, sums them over the ControlNets and passes the sum to the UNet as `residuals=`. Guidance
tells the wrapper which rows are conditional and which step the call belongs to (`Rows`).

What each setting does, as diffusers' StableDiffusionControlNetPipeline and A1111's ControlNet extension:
- `strength` multiplies the residuals (diffusers' controlnet_conditioning_scale, A1111's Weight);
- `start` / `end`, fractions of the sampler steps: step i of N runs the ControlNet unless i/N < start or
  (i+1)/N > end (diffusers' rule; it runs it with scale 0 there, and skipping it adds the same nothing).
  A1111 compares i/N with both ends, so it may run one more step at the end; ComfyUI counts in σ. In
  img2img N is the steps actually run; a hires pass counts its own steps.
- `mode`, A1111's control modes: "balanced" (the same residuals for both halves of guidance), "prompt"
  ("My prompt is more important": residual k of 13 scaled by 0.825^(12-k), shallow skips the least),
  "controlnet" ("ControlNet is more important": those scales, and no residuals on the unconditional rows,
  so guidance scales the control up with the CFG scale);
- `guess_mode`, diffusers': conditional rows only, residuals scaled by logspace(-1, 0, 13);
- a shuffle ControlNet (`global_pool`) pools every residual to its mean over space and acts on the
  conditional rows only (both A1111's rule and diffusers' global_pool_conditions);
- an inpainting UNet's extra input channels are not the ControlNet's: it sees the 4 latent channels.

The control image (or the request's init image when a Control has none, as in A1111's img2img) is
resized to the generation size per `resize_mode`, then run through the preprocessor (`preprocess`:
"none", "canny", "invert", or "inpaint": the init image with the request's mask as −1, the hint of
`control_v11p_sd15_inpaint`).
"""

from __future__ import annotations

import math
import contextlib
import types
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models.controlnet import ControlNet
from ..models.unet import Residuals
from ..sampling.guidance import Rows, row_aware
from .images import Pixels

MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
         "controlnet": "ControlNet is more important"}
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
SOFT_BASE = 0.825        # the original repository's soft-injection ratio, shared by A1111's modes
INPAINT = "inpaint"      # the preprocessor that needs the request's mask


@dataclass(frozen=True, eq=False)
class ControlNetFile:
    """A loaded ControlNet and what the infotext says about its file."""
    net: ControlNet
    name: str = "controlnet"          # the file's stem, as A1111's model list names it
    hash: str | None = None           # A1111's short model hash of the file (8 hex digits)
    global_pool: bool = False         # a shuffle ControlNet: residuals pooled over space, conditional rows only
    quirks: tuple[str, ...] = ()      # what the loader found and normalised

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name


def load_controlnet(path: str | Path, pipe=None, *, device=None, dtype=None,
                    global_pool: bool | None = None) -> ControlNetFile:
    """Read an SD 1.x ControlNet file (.safetensors or .pth: v1.0 full, v1.1, pruned fp16, "difference").

    pipe: the Pipeline it will control; it gives the device, dtype and UNet (whose shape the ControlNet must
    copy, and whose weights a "difference" file is added to). global_pool: whether it is a shuffle
    ControlNet; by default, when the file name contains "shuffle" (A1111's rule: the file does not say)."""
    from ..files.hashing import legacy_hash
    from ..models.loading import load_controlnet as load_net
    # A "difference" file adds the UNet's own weights: the originals, not a LoRA kept merged in them.
    with pipe.original_weights() if pipe is not None else contextlib.nullcontext():
        net, state = load_net(path, unet=pipe.unet if pipe is not None else None,
                              device=device if device is not None else getattr(pipe, "device", None),
                              dtype=dtype if dtype is not None else getattr(pipe, "dtype", None))
    path = Path(path)
    pool = "shuffle" in path.name.lower() if global_pool is None else bool(global_pool)
    return ControlNetFile(net, path.stem, legacy_hash(path), pool, tuple(state.quirks))


@dataclass(frozen=True, eq=False)
class Control:
    """One ControlNet applied to a generation (equal only to itself: it holds a model)."""
    model: ControlNetFile                 # sd15.load_controlnet(...); a bare ControlNet module is wrapped
    image: object = None                  # PIL, path or tensor [3,H,W] / [1,3,H,W] RGB in [0, 1]; None: init image
    strength: float = 1.0                 # scale of its residuals (A1111's Weight)
    start: float = 0.0                    # fraction of the steps before it starts
    end: float = 1.0                      # fraction of the steps after which it stops
    mode: str = "balanced"                # A1111's control mode: "balanced", "prompt", "controlnet"
    guess_mode: bool = False              # diffusers' guess mode (conditional rows, logspace scales)
    preprocess: str = "none"              # "none", "canny", "invert", "inpaint"
    params: Mapping[str, float] = field(default_factory=dict)   # the preprocessor's, e.g. {"low": 100, "high": 200}
    resize_mode: str = "Crop and Resize"  # A1111's default; "Just Resize" stretches (diffusers); "Resize and Fill"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        if isinstance(self.model, ControlNet):
            set_("model", ControlNetFile(self.model))
        if not isinstance(self.model, ControlNetFile):
            raise ValueError(f"Control.model must be a loaded ControlNet (sd15.load_controlnet), got "
                             f"{type(self.model).__name__}")
        for name, value in check_settings({f.name: getattr(self, f.name) for f in fields(self)
                                           if f.name != "model"}).items():
            set_(name, value)

    @property
    def scales(self) -> list[float] | torch.Tensor:
        """The factor of each of the 13 residuals, shallow to deep (the middle block's last)."""
        n = self.model.net.num_skips + 1
        if self.guess_mode and not self.model.global_pool:     # float32, as diffusers multiplies
            return torch.logspace(-1, 0, n) * self.strength
        if self.mode in ("prompt", "controlnet"):
            return [self.strength * SOFT_BASE ** float(n - 1 - k) for k in range(n)]
        return [self.strength] * n

    @property
    def conditional_only(self) -> bool:
        return self.guess_mode or self.mode == "controlnet" or self.model.global_pool

    def active(self, step: int, steps: int) -> bool:
        """Whether it runs at 0-based step `step` of `steps` (diffusers' controlnet_keep)."""
        return not (step / steps < self.start or (step + 1) / steps > self.end)

    def hint(self, width: int, height: int, init_image: Pixels | None = None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """The hint at the generation size: [1, 3, height, width] float32, RGB in [0, 1] (the inpaint hint:
        −1 where `mask`, the request's binary mask [1, 1, height, width], is 1)."""
        image = self.image
        if image is None:
            if init_image is None:
                raise ValueError("a Control without an image takes the request's init image; this request has "
                                 "none: give the control image")
            image = init_image
        if isinstance(image, Pixels) and image.source is None:        # a tensor given as an init image
            image = (image.tensor[:1] + 1) / 2
        if isinstance(image, torch.Tensor):
            t = _resized_tensor(image, width, height, self.resize_mode)
            if self.preprocess not in ("none", INPAINT):
                t = _to_tensor(_preprocessed(self.preprocess, _to_pil(t), self.params))
        else:
            pil = _resized_pil(image.source, width, height, self.resize_mode)
            if self.preprocess not in ("none", INPAINT):
                pil = _preprocessed(self.preprocess, pil, self.params)
            t = _to_tensor(pil)
        if self.preprocess == INPAINT:
            if mask is None:
                raise ValueError("the inpaint ControlNet preprocessor needs an inpainting request (a mask)")
            m = (mask.to(t) > 0.5).to(t)
            t = t * (1 - m) - m
        return t

    def describe(self) -> str:
        """The infotext value A1111's ControlNet extension writes for a unit (`ControlNet 0: "..."`)."""
        parts = {"Module": self.preprocess, "Model": self.model.title, "Weight": _num(self.strength), "Resize Mode": self.resize_mode,
                 **_described(self.preprocess, self.params),
                 "Guidance Start": _num(self.start), "Guidance End": _num(self.end),
                 # the hint is made at the generation size: A1111's "Pixel Perfect"
                 "Pixel Perfect": "True", "Control Mode": MODES[self.mode]}
        if self.guess_mode:
            parts["Guess Mode"] = "True"
        return ", ".join(f"{k}: {v}" for k, v in parts.items())


def check_settings(settings: Mapping[str, object]) -> dict[str, object]:
    """A Control's settings (every field but the model) checked and normalised, the defaults filled in.
    Front ends check a unit with this before its ControlNet loads."""
    names = [f.name for f in fields(Control) if f.name != "model"]
    unknown = set(settings) - set(names)
    if unknown:
        raise ValueError(f"unknown ControlNet settings: {', '.join(sorted(unknown))}; known: {', '.join(names)}")
    v = {f.name: f.default if f.default is not MISSING else f.default_factory()
         for f in fields(Control) if f.name != "model"} | dict(settings)
    v["image"] = _control_image(v["image"])
    for name in ("strength", "start", "end"):
        if not isinstance(v[name], (int, float)) or isinstance(v[name], bool) or not math.isfinite(v[name]):
            raise ValueError(f"Control.{name} must be a finite number, got {v[name]!r}")
        v[name] = float(v[name])
    if v["strength"] < 0:
        raise ValueError(f"Control.strength must be >= 0, got {v['strength']}")
    if not 0 <= v["start"] < v["end"] <= 1:
        raise ValueError(f"Control needs 0 <= start < end <= 1, got start {v['start']}, end {v['end']}")
    if v["mode"] not in MODES:
        raise ValueError(f"Control.mode must be one of {', '.join(MODES)} (A1111's {', '.join(MODES.values())}), "
                         f"got {v['mode']!r}")
    if not isinstance(v["guess_mode"], bool):
        raise ValueError(f"Control.guess_mode must be True or False, got {v['guess_mode']!r}")
    if v["guess_mode"] and v["mode"] != "balanced":
        raise ValueError("guess_mode is diffusers' version of A1111's mode 'controlnet': give one of them")
    if v["resize_mode"] not in RESIZE_MODES:
        raise ValueError(f"Control.resize_mode must be one of {', '.join(RESIZE_MODES)}, got {v['resize_mode']!r}")
    if v["preprocess"] in ("none", INPAINT):
        if v["params"]:
            raise ValueError(f"the {v['preprocess']!r} preprocessor takes no parameters, got {dict(v['params'])}")
        v["params"] = {}
    else:
        v["params"] = _checked_params(v["preprocess"], v["params"])
    v["params"] = types.MappingProxyType(dict(v["params"]))
    return v


def _table():
    from . import preprocess      # numpy image code, loaded when a Control uses it
    return preprocess.PREPROCESSORS


def _checked_params(name: str, params) -> dict[str, float]:
    table = _table()
    if name not in table and name != INPAINT:
        raise ValueError(f"unknown ControlNet preprocessor {name!r}; known: {', '.join([*table, INPAINT])}")
    if not isinstance(params, Mapping):
        raise ValueError(f"Control.params must be a mapping such as {{'low': 100, 'high': 200}}, got {params!r}")
    defaults = dict(table[name][1])
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"preprocessor {name!r} takes {', '.join(defaults) or 'no parameters'}; "
                         f"not {', '.join(sorted(map(str, unknown)))}")
    values = defaults | dict(params)
    _described(name, values)          # the values checked now, not when the hint is made
    return values


def _preprocessed(name: str, image: Image.Image, params) -> Image.Image:
    return _table()[name][0](image, **params)


def _described(name: str, params) -> dict[str, str]:
    if name == INPAINT:
        return {"Module": INPAINT}
    from . import preprocess
    return preprocess.describe(name, dict(params))


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) else repr(v)


def _control_image(image):
    if image is None or isinstance(image, Pixels):
        return image
    if isinstance(image, torch.Tensor):      # kept in [0, 1] at any size; resized when it is used
        t = image.detach().to("cpu", torch.float32, copy=True)
        t = t[None] if t.dim() == 3 else t
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != 3:
            raise ValueError(f"control image tensor must be [3,H,W] or [1,3,H,W], got {tuple(image.shape)}")
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise ValueError("control image tensor must be RGB in [0, 1]")
        return t
    pixels = Pixels.of(image)
    if len(pixels) != 1:
        raise ValueError("a Control takes one control image")
    return pixels


def _fitted_size(w: int, h: int, width: int, height: int, cover: bool) -> tuple[int, int]:
    """(w, h) scaled by one factor to cover (A1111's Crop and Resize) or fit inside (Resize and Fill) the
    target, rounded as A1111's ControlNet extension rounds."""
    k = (max if cover else min)(height / h, width / w)
    return int(np.round(w * k)), int(np.round(h * k))


def _resized_pil(source: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """The control image at the generation size, as A1111's extension places it (its geometry: scale to
    cover and crop the centre, or scale to fit and fill the rest with the median colour of the image's
    border pixels); resampled with Lanczos, diffusers' filter, where A1111 picks OpenCV's by content."""
    source = source.convert("RGB")
    if source.size == (width, height):
        return source
    if mode == "Just Resize":
        return source.resize((width, height), resample=Image.LANCZOS)
    fitted = source.resize(_fitted_size(*source.size, width, height, mode == "Crop and Resize"),
                           resample=Image.LANCZOS)
    fw, fh = fitted.size
    if mode == "Crop and Resize":
        left, top = (fw - width) // 2, (fh - height) // 2
        return fitted.crop((left, top, left + width, top + height))
    a = np.asarray(source)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    canvas = Image.new("RGB", (width, height), tuple(int(c) for c in np.median(border, axis=0).astype(np.uint8)))
    canvas.paste(fitted, ((width - fw) // 2, (height - fh) // 2))
    return canvas


def _resized_tensor(t: torch.Tensor, width: int, height: int, mode: str) -> torch.Tensor:
    def resized(x, size):
        if tuple(x.shape[-2:]) == (size[1], size[0]):
            return x
        return F.interpolate(x, size=(size[1], size[0]), mode="bilinear", antialias=True,
                             align_corners=False).clamp(0, 1)
    if mode == "Just Resize" or tuple(t.shape[-2:]) == (height, width):
        return resized(t, (width, height))
    fitted = resized(t, _fitted_size(t.shape[-1], t.shape[-2], width, height, mode == "Crop and Resize"))
    fh, fw = fitted.shape[-2:]
    if mode == "Crop and Resize":
        top, left = (fh - height) // 2, (fw - width) // 2
        return fitted[..., top:top + height, left:left + width]
    border = torch.cat([t[0, :, 0], t[0, :, -1], t[0, :, :, 0], t[0, :, :, -1]], dim=1)
    canvas = border.median(dim=1).values[None, :, None, None].expand(1, 3, height, width).clone()
    top, left = (height - fh) // 2, (width - fw) // 2
    canvas[..., top:top + fh, left:left + fw] = fitted
    return canvas


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def _to_pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray((t[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy())


def check_controls(controls) -> tuple[Control, ...]:
    if isinstance(controls, Control):
        return (controls,)
    if not isinstance(controls, (list, tuple)) or not all(isinstance(c, Control) for c in controls):
        raise ValueError(f"control must be a list of Control, got {controls!r}")
    return tuple(controls)


def residuals(control: Control, hint: torch.Tensor, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
              conditional: torch.Tensor) -> list[torch.Tensor] | None:
    """One ControlNet's 13 scaled residuals for a UNet call's rows (zero on the rows it does not act on);
    None when it acts on none of them."""
    rows = conditional.to(x.device) if control.conditional_only else None
    if rows is not None and not bool(rows.any()):
        return None
    net = control.model.net
    param = next(net.parameters())
    xc, tc, cc = (x, t, context) if rows is None else (x[rows], t[rows], context[rows])
    h = hint.to(param.device, param.dtype).expand(len(xc), -1, -1, -1)
    res = net(xc.to(param.dtype), tc, cc.to(param.dtype), h)
    parts = [*res.skips, res.mid]
    if control.model.global_pool:
        parts = [p.mean(dim=(2, 3), keepdim=True).expand_as(p) for p in parts]
    parts = [p * s for p, s in zip(parts, control.scales)]
    if rows is not None:
        full = []
        for p in parts:
            z = torch.zeros((len(x), *p.shape[1:]), dtype=p.dtype, device=p.device)
            z[rows] = p
            full.append(z)
        parts = full
    return parts


def controlled(unet, controls: tuple[Control, ...], hints: list[torch.Tensor], latent_channels: int):
    """`unet(x, t, context)` with the ControlNets' residuals added: a row-aware UNet callable for guidance."""
    def unet_with_control(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, rows: Rows) -> torch.Tensor:
        total = None
        for control, hint in zip(controls, hints):
            if not control.active(rows.call.step, rows.call.steps):
                continue
            parts = residuals(control, hint, x[:, :latent_channels], t, context, rows.conditional)
            if parts is not None:
                total = parts if total is None else [a + b for a, b in zip(total, parts)]
        if total is None:
            return unet(x, t, context)
        return unet(x, t, context, residuals=Residuals(tuple(total[:-1]), total[-1]))

    return row_aware(unet_with_control)
