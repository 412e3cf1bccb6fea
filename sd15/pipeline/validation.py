"""Checks of a request's fields that are not the sampler's (those live in `sampling.plan`/`registry`).

They run when a `Request` is made, before any heavy work: no model is loaded for a bad argument.
"""

import math

MAX_SIDE = 8192          # pixels; 8192² is already ~1 M latent pixels, far beyond SD1.5's 512² training size
MAX_BATCH = 64           # images in one batch (prompts × batch size)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_size(width: int, height: int, multiple: int = 8) -> None:
    """Positive whole pixels, at most MAX_SIDE, multiples of the VAE's downscale factor (8 for SD 1.x)."""
    for name, value in (("width", width), ("height", height)):
        if not _is_int(value):
            raise ValueError(f"{name} must be an integer number of pixels, got {value!r}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
        if value % multiple:
            lower, upper = value - value % multiple, value - value % multiple + multiple
            raise ValueError(f"{name} must be a multiple of {multiple} (the VAE works on {multiple}x{multiple} "
                             f"pixel cells), got {value}; try {lower or upper} or {upper}")
        if value > MAX_SIDE:
            raise ValueError(f"{name} {value} is too large (at most {MAX_SIDE} pixels)")


def check_guidance(scale: float) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"guidance scale must be a finite number, got {scale!r}")


def check_batch(batch_size: int, what: str = "batch size") -> None:
    if not _is_int(batch_size) or not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"{what} must be an integer from 1 to {MAX_BATCH}, got {batch_size!r}")


def check_clip_skip(clip_skip) -> None:
    if not _is_int(clip_skip) or not 1 <= clip_skip <= 12:
        raise ValueError(f"clip_skip must be an integer from 1 (the last layer, the default) to 12, got {clip_skip!r}"
                         " (A1111's numbering: 2 is diffusers' clip_skip=1)")


def check_seed(seed, name: str = "seed") -> None:
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {seed!r}")


def texts(value, name: str) -> str | tuple[str, ...]:
    """A prompt field: one string, or a non-empty sequence of strings (kept as a tuple)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


def check_device(name: str | None) -> None:
    """A device name front ends accept (--device): one torch knows, and present here."""
    if name is None:
        return
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a device torch knows (cpu, cuda, cuda:1, mps, ...)") from None
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None)}.get(device.type)
    if backend is not None and not backend.is_available():
        raise ValueError(f"--device {name}: {device.type.upper()} is not available here (no such device, or torch "
                         f"{torch.__version__} was built without it); use --device cpu")
