"""The sampler table: names people type, A1111's labels, each sampler's grid, state view, options and
which schedule types it takes (`schedule_types`).

    spec = resolve_sampler("DPM++ 2M Karras")          # or "dpmpp_2m_karras", or ("DPM++ 2M", "Karras")
    spec.full_name, spec.schedule                      # "dpmpp_2m_karras", "karras"
    spec.check_options({"eta": 0.3})                    # ValueError unless the sampler declares eta

A new sampler is one function in `samplers` and one row in `SAMPLERS`; a new option is one `Option` in
its row (the request, the CLI and the infotext pick it up from there).
"""

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch

from . import grids
from .ode_samplers import (dpm2_exponential_grid, dpm2_karras_grid, sample_dpm2, sample_dpm2_ancestral,
                           sample_dpmpp_2s_ancestral, sample_heun, sample_lms)
from .consistency import lcm_grid, sample_lcm, sample_tcd, tcd_grid
from .multistep import (deis_exponential_grid, deis_karras_grid, plms_nfe, sample_deis, sample_plms,
                        sample_unipc, sample_unipc_bh2, sigma_min_grid)
from .samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler, sample_euler_ancestral
from .sde_samplers import (dpmpp_sde_exponential_grid, dpmpp_sde_grid, dpmpp_sde_karras_grid, dpmpp_sde_nfe,
                           sample_dpmpp_2m_sde, sample_dpmpp_2m_sde_heun, sample_dpmpp_3m_sde, sample_dpmpp_sde)
from .schedule import ScheduleConfig
from .schedule_types import SCHEDULE_TYPES


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
    integer: bool = False                 # a count (a solver order): whole numbers only, written as such


# The value at which an option changes nothing for a sampler that does not have it: eta 0 is no added
# noise, which is what every deterministic sampler does. Such a value is accepted for any sampler (so
# "eta=0 everywhere" works, as the conveniences' default), any other is an error.
NEUTRAL = {"eta": 0.0}


def _neutral(name: str, value) -> bool:
    return name in NEUTRAL and isinstance(value, (int, float)) and not isinstance(value, bool) and value == NEUTRAL[name]


GridFn = Callable[[int, ScheduleConfig], grids.Grid]   # (steps, cfg) -> (timesteps [n], sigmas [n+1])


@dataclass(frozen=True)
class SamplerSpec:
    """One row of the sampler table, bound to one schedule type (`resolve_sampler` binds it).

    The sampler and the schedule type are two axes, as in A1111 1.9+: `grid` is the sampler's own
    ("Uniform") grid, diffusers' spacing for its scheduler; any other schedule type gives σ levels that
    `grids.from_sigmas` turns into a grid, unless the row names a grid of its own for it in `grids_for`.
    """
    name: str  # the sampler's canonical name, e.g. "dpmpp_2m" (see `full_name` for the schedule's)
    label: str  # A1111 "Sampler" field, e.g. "DPM++ 2M"
    fn: Callable[..., Iterator[torch.Tensor]]  # the sampler
    grid: GridFn  # the sampler's own grid: schedule type "uniform"
    vp: bool  # state is the VP latent (True) or x_σ = x0 + σ·ε (False)
    options: tuple[Option, ...] = ()
    default_schedule: str = "uniform"  # what A1111's "Automatic" resolves to for this sampler
    schedules: tuple[str, ...] | None = None  # the schedule types it takes; None: all of SCHEDULE_TYPES
    round_timesteps: bool = False  # diffusers' scheduler rounds t under σ schedules (DPMSolverMultistep)
    grids_for: Mapping[str, GridFn] = field(default_factory=dict)   # schedule type -> diffusers' own grid for it
    nfe: Callable[[int], int] = lambda steps: steps   # UNet calls (per guidance pass) of a run of that many steps
    deterministic: bool = True   # False: draws noise every step (with its default options)
    discard_penultimate_sigma: bool = False   # A1111's DPM2 flag: grid of steps+1, the last σ before 0 dropped
    schedule: str = ""  # the bound schedule type; "" on a table row means its default_schedule

    def __post_init__(self):
        if not self.schedule:
            object.__setattr__(self, "schedule", self.default_schedule)

    @property
    def accepted_schedules(self) -> tuple[str, ...]:
        return tuple(SCHEDULE_TYPES) if self.schedules is None else self.schedules

    def with_schedule(self, schedule: str) -> "SamplerSpec":
        if schedule not in self.accepted_schedules:
            raise ValueError(f"sampler {self.label} has no schedule type {SCHEDULE_TYPES[schedule].label!r} "
                             f"(it takes: {', '.join(SCHEDULE_TYPES[s].label for s in self.accepted_schedules)})")
        return replace(self, schedule=schedule)

    @property
    def full_name(self) -> str:
        """The canonical name of sampler + schedule: "dpmpp_2m_karras", "dpmpp_2m_uniform", "euler" (a sampler's own
        grid is not spelled out where it is also the sampler's default)."""
        return self.name if self.schedule_type == "Automatic" else f"{self.name}_{self.schedule}"

    @property
    def schedule_type(self) -> str:
        """A1111's "Schedule type" field: "Automatic" for a sampler's own grid when that is its default."""
        if self.schedule == "uniform" and self.default_schedule == "uniform":
            return "Automatic"
        return SCHEDULE_TYPES[self.schedule].label

    def make_grid(self, steps: int, cfg: ScheduleConfig) -> grids.Grid:
        if self.discard_penultimate_sigma:   # A1111 (sd_samplers_kdiffusion.get_sigmas), every schedule type:
            timesteps, sigmas = self._grid(steps + 1, cfg)   # one level more, then the last one above 0 dropped
            return timesteps[:-1], torch.cat([sigmas[:-2], sigmas[-1:]])
        return self._grid(steps, cfg)

    def _grid(self, steps: int, cfg: ScheduleConfig) -> grids.Grid:
        if self.schedule in self.grids_for:
            return self.grids_for[self.schedule](steps, cfg)
        kind = SCHEDULE_TYPES[self.schedule]
        if kind.sigmas is None:
            return self.grid(steps, cfg)
        return grids.from_sigmas(kind.sigmas(steps, cfg), cfg, self.round_timesteps)

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
            if option.integer and value != int(value):
                raise ValueError(f"{name}={value!r} is not valid for {self.name}: {name} is a whole number "
                                 f"from {option.low:g} to {option.high:g} ({option.help})")
            if keep_defaults or value != option.default:
                out[name] = int(value) if option.integer else float(value)
        return out


TIMESTEPS_ONLY = ("uniform",)   # samplers that walk their own timesteps (A1111's "timesteps" samplers)

ETA_DDIM = Option("eta", 0.0, 0.0, 1.0, "Eta DDIM", "0 deterministic, 1 DDPM-like noise", legacy_infotext="Eta")
# k-diffusion's ancestral options, as A1111 names them in the infotext (written when not 1)
ETA_ANCESTRAL = Option("eta", 1.0, 0.0, 1.0, "Eta", "ancestral noise: 1 the full amount, 0 none (deterministic)")
S_NOISE = Option("s_noise", 1.0, 0.0, 1.1, "Sigma noise", "scale of the fresh noise an ancestral step adds")

SAMPLERS = {s.name: s for s in (
    SamplerSpec("ddim", "DDIM", sample_ddim, grids.ddim_grid, vp=True, options=(ETA_DDIM,), schedules=TIMESTEPS_ONLY),
    SamplerSpec("ddpm", "DDPM", sample_ddpm, grids.ddpm_grid, vp=True, schedules=TIMESTEPS_ONLY, deterministic=False),
    SamplerSpec("euler", "Euler", sample_euler, grids.euler_grid, vp=False,
                grids_for={"karras": grids.euler_karras_grid, "exponential": grids.euler_exponential_grid}),
    SamplerSpec("euler_a", "Euler a", sample_euler_ancestral, grids.euler_grid, vp=False, deterministic=False,
                options=(ETA_ANCESTRAL, S_NOISE)),
    SamplerSpec("dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m, grids.dpm_grid, vp=True, default_schedule="karras",
                round_timesteps=True, grids_for={"exponential": grids.dpm_exponential_grid}),
    # -- ODE samplers in σ space (ode_samplers.py) --
    SamplerSpec("heun", "Heun", sample_heun, grids.euler_grid, vp=False, nfe=lambda n: 2 * n - 1,
                grids_for={"karras": grids.euler_karras_grid, "exponential": grids.euler_exponential_grid}),
    SamplerSpec("lms", "LMS", sample_lms, grids.euler_grid, vp=False,
                grids_for={"karras": grids.euler_karras_grid, "exponential": grids.euler_exponential_grid}),
    SamplerSpec("dpm_2", "DPM2", sample_dpm2, grids.euler_grid, vp=False, default_schedule="karras",
                discard_penultimate_sigma=True, nfe=lambda n: 2 * n - 1,
                grids_for={"karras": dpm2_karras_grid, "exponential": dpm2_exponential_grid}),
    SamplerSpec("dpm_2_a", "DPM2 a", sample_dpm2_ancestral, grids.euler_grid, vp=False, default_schedule="karras",
                options=(ETA_ANCESTRAL, S_NOISE), discard_penultimate_sigma=True, nfe=lambda n: 2 * n - 1,
                deterministic=False, grids_for={"karras": dpm2_karras_grid, "exponential": dpm2_exponential_grid}),
    SamplerSpec("dpmpp_2s_a", "DPM++ 2S a", sample_dpmpp_2s_ancestral, grids.euler_grid, vp=False,
                default_schedule="karras", options=(ETA_ANCESTRAL, S_NOISE), nfe=lambda n: 2 * n - 1,
                deterministic=False),
    # -- SDE samplers (sde_samplers.py) --
    SamplerSpec("dpmpp_2m_sde", "DPM++ 2M SDE", sample_dpmpp_2m_sde, grids.dpm_grid, vp=True,
                default_schedule="exponential", options=(ETA_ANCESTRAL, S_NOISE), round_timesteps=True,
                deterministic=False, grids_for={"exponential": grids.dpm_exponential_grid}),
    SamplerSpec("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", sample_dpmpp_2m_sde_heun, grids.dpm_grid, vp=True,
                default_schedule="exponential", options=(ETA_ANCESTRAL, S_NOISE), round_timesteps=True,
                deterministic=False, grids_for={"exponential": grids.dpm_exponential_grid}),
    SamplerSpec("dpmpp_3m_sde", "DPM++ 3M SDE", sample_dpmpp_3m_sde, grids.dpm_grid, vp=False,
                default_schedule="exponential", options=(ETA_ANCESTRAL, S_NOISE), discard_penultimate_sigma=True,
                deterministic=False),
    SamplerSpec("dpmpp_sde", "DPM++ SDE", sample_dpmpp_sde, dpmpp_sde_grid, vp=False, default_schedule="karras",
                options=(ETA_ANCESTRAL, S_NOISE), nfe=dpmpp_sde_nfe, deterministic=False,
                grids_for={"karras": dpmpp_sde_karras_grid, "exponential": dpmpp_sde_exponential_grid}),
    # -- multistep VP samplers (multistep.py) --
    SamplerSpec("plms", "PLMS", sample_plms, grids.ddim_grid, vp=True, schedules=TIMESTEPS_ONLY, nfe=plms_nfe),
    SamplerSpec("unipc", "UniPC", sample_unipc, sigma_min_grid, vp=True, schedules=TIMESTEPS_ONLY,
                options=(Option("order", 3, 1, 3, "UniPC order", "UniPC's order: 1, 2 or 3 (A1111's default 3)", integer=True),)),
    SamplerSpec("unipc_bh2", "UniPC bh2", sample_unipc_bh2, grids.dpm_grid, vp=True, round_timesteps=True,
                schedules=("uniform", "karras", "exponential"), grids_for={"exponential": grids.dpm_exponential_grid},
                options=(Option("order", 2, 1, 3, "UniPC order", "UniPC's order: 1, 2 or 3 (diffusers' default 2)", integer=True),)),
    SamplerSpec("deis", "DEIS", sample_deis, sigma_min_grid, vp=True, schedules=("uniform", "karras", "exponential"),
                grids_for={"karras": deis_karras_grid, "exponential": deis_exponential_grid},
                options=(Option("order", 3, 1, 3, "DEIS order", "DEIS's order: 1, 2 or 3", integer=True),)),
    # -- consistency samplers (consistency.py) --
    SamplerSpec("lcm", "LCM", sample_lcm, lcm_grid, vp=True, schedules=TIMESTEPS_ONLY, deterministic=False),
    SamplerSpec("tcd", "TCD", sample_tcd, tcd_grid, vp=True, schedules=TIMESTEPS_ONLY, deterministic=False,
                options=(Option("eta", 0.3, 0.0, 1.0, "Eta TCD", "TCD's gamma: 0 deterministic, 1 re-noises fully "
                                "each step (as LCM)"),)),
)}
_EXTRA_ALIASES = {"eulerancestral": "euler_a"}  # k-diffusion's sample_euler_ancestral
_EXTRA_ALIASES |= {"dpm2ancestral": "dpm_2_a", "dpmpp2sancestral": "dpmpp_2s_a"}  # k-diffusion's / ComfyUI's names


def every_combination() -> list[SamplerSpec]:
    """Every sampler bound to each schedule type it takes, in table order."""
    return [row.with_schedule(s) for row in SAMPLERS.values() for s in row.accepted_schedules]


def _normalize(name: str) -> str:
    # "DPM++ 2M Karras", "dpmpp_2m_karras", "k_dpmpp_2m_karras" -> "dpmpp2mkarras"
    name = name.strip().lower().removeprefix("k_").replace("++", "pp")
    return "".join(c for c in name if c not in " _-")


def _names() -> dict[str, SamplerSpec]:
    """Every spelling -> the bound spec: the sampler alone (its default schedule), and with each schedule
    type it takes, by canonical names and by A1111's labels (pre-1.9 names such as "DPM++ 2M Karras")."""
    out: dict[str, SamplerSpec] = {}
    for row in SAMPLERS.values():
        for sampler in (row.name, row.label):
            out[_normalize(sampler)] = row
            for schedule in row.accepted_schedules:
                for spelled in (schedule, SCHEDULE_TYPES[schedule].label):
                    out.setdefault(_normalize(f"{sampler} {spelled}"), row.with_schedule(schedule))
    for alias, name in _EXTRA_ALIASES.items():
        out[alias] = SAMPLERS[name]
    return out


_BY_KEY = _names()
_SCHEDULE_KEYS = {_normalize(k): k for k in SCHEDULE_TYPES} | {_normalize(s.label): k for k, s in SCHEDULE_TYPES.items()}


def resolve_schedule_type(schedule_type: str) -> str | None:
    """A schedule type's canonical name ("karras"), None for "Automatic" (the sampler's default)."""
    key = _normalize(schedule_type)
    if key in ("automatic", ""):
        return None
    if key not in _SCHEDULE_KEYS:
        raise ValueError(f"unknown schedule type {schedule_type!r}; valid: Automatic, "
                         f"{', '.join(s.label for s in SCHEDULE_TYPES.values())}")
    return _SCHEDULE_KEYS[key]


def resolve_sampler(name: str, schedule_type: str | None = None) -> SamplerSpec:
    """A sampler bound to a schedule type, by name: "euler_a", "Euler a", "DPM++ 2M Karras", or A1111's
    split ("DPM++ 2M", "Karras"). A name that carries a schedule and a different `schedule_type` is an error."""
    if not isinstance(name, str):
        raise ValueError(f"sampler must be a name such as 'DPM++ 2M Karras', got {name!r}")
    key = _normalize(name)
    if key not in _BY_KEY:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}, each optionally "
                         f"followed by a schedule type ({', '.join(SCHEDULE_TYPES)}); A1111 spellings such as "
                         "'Euler a' or 'DPM++ 2M Karras' also work")
    spec = _BY_KEY[key]
    schedule = None if schedule_type is None else resolve_schedule_type(schedule_type)
    if schedule is None:
        return spec
    bare = key in {_normalize(spec.name), _normalize(spec.label)} or key in _EXTRA_ALIASES   # names no schedule
    named = None if bare else spec.schedule
    if named is not None and named != schedule:
        raise ValueError(f"sampler {name!r} already names the schedule type {SCHEDULE_TYPES[named].label}; "
                         f"it cannot also be {SCHEDULE_TYPES[schedule].label}")
    return spec.with_schedule(schedule)
