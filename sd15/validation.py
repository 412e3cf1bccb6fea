"""Argument checks that run before any heavy work (no model is loaded for a bad argument)."""

import math

from .samplers import Plan, SamplerSpec, make_plan, resolve_sampler

MAX_SIDE = 8192          # pixels; 8192² is already ~1 M latent pixels, far beyond SD1.5's 512² training size
MAX_STEPS = 1000         # the schedule has 1000 training timesteps; more steps cannot be distinct
MAX_BATCH = 64


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer number of pixels, got {value!r}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
        if value % 8:
            lower, upper = value - value % 8, value - value % 8 + 8
            raise ValueError(f"{name} must be a multiple of 8 (the VAE works on 8x8 pixel cells), got {value}; "
                             f"try {lower or upper} or {upper}")
        if value > MAX_SIDE:
            raise ValueError(f"{name} {value} is too large (at most {MAX_SIDE} pixels)")


def check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")


def check_guidance(scale: float) -> None:
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"guidance scale must be a finite number, got {scale!r}")


def check_batch(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch size must be an integer from 1 to {MAX_BATCH}, got {batch_size!r}")


def check_strength(strength: float) -> None:
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1] (the fraction of the schedule to re-run), got {strength!r}")


def check_eta(eta: float) -> None:
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")


def check_seed(seed) -> None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")


def check_sampling(steps: int, guidance_scale: float, batch_size: int, eta: float, seed, sampler: str,
                   strength: float = 1.0) -> tuple[SamplerSpec, Plan]:
    """Every cheap check of a generation request that the CLI and the pipeline share; returns the
    sampler and its plan (whose own checks cover eta on non-DDIM samplers and strengths that leave no step)."""
    check_steps(steps)
    check_guidance(guidance_scale)
    check_batch(batch_size)
    check_eta(eta)
    check_seed(seed)
    check_strength(strength)
    spec = resolve_sampler(sampler)
    return spec, make_plan(spec, steps, strength=strength, eta=eta)
