"""The sampler table: names people type, A1111's labels, each sampler's grid, state view and options.

    spec = resolve_sampler("DPM++ 2M Karras")          # or "dpmpp_2m_karras", or ("DPM++ 2M", "Karras")
    spec.check_options({"eta": 0.3})                    # ValueError unless the sampler declares eta

A new sampler is one function in `samplers` and one row in `SAMPLERS`; a new option is one `Option` in
its row (the request, the CLI and the infotext pick it up from there).
"""

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from . import grids
from .samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler, sample_euler_ancestral
from .schedule import ScheduleConfig


@dataclass(frozen=True)
class Option:
    """A numeric keyword option of a sampler function."""
    name: str          # the keyword, e.g. "eta"
    default: float
    low: float
    high: float
    infotext: str      # A1111's infotext key, e.g. "Eta DDIM"
    help: str
    legacy_infotext: str | None = None    # a key older sd15 versions wrote, still read


# The value at which an option changes nothing for a sampler that does not have it: eta 0 is no added
# noise, which is what every deterministic sampler does. Such a value is accepted for any sampler (so
# "eta=0 everywhere" works, as the conveniences' default), any other is an error.
NEUTRAL = {"eta": 0.0}


def _neutral(name: str, value) -> bool:
    return name in NEUTRAL and isinstance(value, (int, float)) and not isinstance(value, bool) and value == NEUTRAL[name]


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # canonical name, e.g. "dpmpp_2m_karras"
    label: str  # A1111 "Sampler" field, e.g. "DPM++ 2M"
    schedule_type: str  # A1111 "Schedule type" field: "Karras" or "Automatic"
    fn: Callable[..., Iterator[torch.Tensor]]  # the sampler
    grid: Callable[[int, ScheduleConfig], grids.Grid]  # (steps, cfg) -> full (timesteps [n], sigmas [n+1])
    vp: bool  # state is the VP latent (True) or x_σ = x0 + σ·ε (False)
    options: tuple[Option, ...] = ()

    def check_options(self, options: Mapping[str, float], keep_defaults: bool = True) -> dict[str, float]:
        """This sampler's options, `options` checked; with the defaults filled in, or (keep_defaults=False)
        only those that differ from their default."""
        known = {o.name: o for o in self.options}
        unknown = sorted(k for k, v in options.items() if k not in known and not _neutral(k, v))
        if unknown:
            valid = ", ".join(known) or "none"
            raise ValueError(f"sampler {self.name} has no option {', '.join(unknown)} (its options: {valid})")
        out = {}
        for name, option in known.items():
            value = options.get(name, option.default)
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or not option.low <= value <= option.high):
                raise ValueError(f"{name}={value!r} is not valid for {self.name}: {name} must be a number in "
                                 f"[{option.low:g}, {option.high:g}] ({option.help})")
            if keep_defaults or value != option.default:
                out[name] = float(value)
        return out


ETA_DDIM = Option("eta", 0.0, 0.0, 1.0, "Eta DDIM", "0 deterministic, 1 DDPM-like noise", legacy_infotext="Eta")

SAMPLERS = {s.name: s for s in (
    SamplerSpec("ddim", "DDIM", "Automatic", sample_ddim, grids.ddim_grid, vp=True, options=(ETA_DDIM,)),
    SamplerSpec("ddpm", "DDPM", "Automatic", sample_ddpm, grids.ddpm_grid, vp=True),
    SamplerSpec("euler", "Euler", "Automatic", sample_euler, grids.euler_grid, vp=False),
    SamplerSpec("euler_karras", "Euler", "Karras", sample_euler, grids.euler_karras_grid, vp=False),
    SamplerSpec("euler_a", "Euler a", "Automatic", sample_euler_ancestral, grids.euler_grid, vp=False),
    SamplerSpec("dpmpp_2m", "DPM++ 2M", "Automatic", sample_dpmpp_2m, grids.dpm_grid, vp=True),
    SamplerSpec("dpmpp_2m_karras", "DPM++ 2M", "Karras", sample_dpmpp_2m, grids.dpm_karras_grid, vp=True),
)}
_EXTRA_ALIASES = {"eulerancestral": "euler_a"}  # k-diffusion's sample_euler_ancestral


def _normalize(name: str) -> str:
    # "DPM++ 2M Karras", "dpmpp_2m_karras", "k_dpmpp_2m_karras" -> "dpmpp2mkarras"
    name = name.strip().lower().removeprefix("k_").replace("++", "pp")
    return "".join(c for c in name if c not in " _-")


_BY_KEY = {_normalize(n): s for n, s in SAMPLERS.items()} | {
    _normalize(f"{s.label} {s.schedule_type}"): s for s in SAMPLERS.values()} | {
    k: SAMPLERS[v] for k, v in _EXTRA_ALIASES.items()}


def resolve_sampler(name: str, schedule_type: str | None = None) -> SamplerSpec:
    """A sampler by name: "euler_a", "Euler a", "DPM++ 2M Karras", or A1111's split ("DPM++ 2M", "Karras")."""
    if not isinstance(name, str):
        raise ValueError(f"sampler must be a name such as 'DPM++ 2M Karras', got {name!r}")
    key = _normalize(name)
    if schedule_type is not None and _normalize(schedule_type) not in ("automatic", ""):
        key += _normalize(schedule_type)
    if key not in _BY_KEY:
        shown = name if schedule_type is None else f"{name}, schedule type {schedule_type}"
        raise ValueError(f"unknown sampler {shown!r}; valid names: {', '.join(SAMPLERS)} "
                         "(A1111 spellings such as 'Euler a' or 'DPM++ 2M Karras' also work)")
    return _BY_KEY[key]
