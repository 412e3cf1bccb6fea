"""Schedule types as A1111 (1.9+) names them: the σ levels a sampler walks, chosen apart from the sampler.

    SCHEDULE_TYPES["karras"].sigmas(25, ScheduleConfig())     # [25] float64, descending, no final 0

"Uniform" has no σ formula here: it is each sampler's own grid, the spacing diffusers' scheduler for that
sampler uses (`grids`). Every other type gives σ levels from the model's σ table, between its extremes
σ_min = σ(t=0) ≈ 0.0292 and σ_max = σ(t=999) ≈ 14.61; `grids.from_sigmas` then finds each level's timestep
and appends σ = 0. A new schedule type is one function and one row.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .schedule import ScheduleConfig, karras_sigmas, np_linspace, np_linspace_between, sigma_table


def _extremes(cfg: ScheduleConfig) -> tuple[float, float]:
    table = sigma_table(cfg)
    return float(table[0]), float(table[-1])


def karras(steps: int, cfg: ScheduleConfig) -> torch.Tensor:
    """Karras et al. 2022, eq. 5, ρ = 7 (k-diffusion's get_sigmas_karras)."""
    sigma_min, sigma_max = _extremes(cfg)
    return karras_sigmas(sigma_min, sigma_max, steps)


def exponential(steps: int, cfg: ScheduleConfig) -> torch.Tensor:
    """Evenly spaced in log σ (k-diffusion's get_sigmas_exponential)."""
    sigma_min, sigma_max = _extremes(cfg)
    return np_linspace_between(math.log(sigma_max), math.log(sigma_min), steps).exp()


def _sigma_at_log(t: torch.Tensor, cfg: ScheduleConfig) -> torch.Tensor:
    """σ at fractional t, interpolating log σ between integer timesteps (k-diffusion's t_to_sigma)."""
    log_table = sigma_table(cfg).log()
    lo = t.double().floor().long().clamp(0, len(log_table) - 2)
    w = t.double() - lo
    return ((1 - w) * log_table[lo] + w * log_table[lo + 1]).exp()


def sgm_uniform(steps: int, cfg: ScheduleConfig) -> torch.Tensor:
    """Timesteps evenly spaced from t(σ_max) down to t(σ_min), the last point dropped ("trailing"); A1111's
    sgm_uniform: linspace(t_max, t_min, steps + 1)[:-1] through k-diffusion's t_to_sigma."""
    return _sigma_at_log(np_linspace_between(cfg.num_train_steps - 1, 0.0, steps + 1)[:-1], cfg)


# NVIDIA's published 10-step Align Your Steps levels for SD 1.5 (11 values, the last before σ = 0).
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def align_your_steps(steps: int, cfg: ScheduleConfig) -> torch.Tensor:
    """The AYS table, log-linearly interpolated to `steps` levels unless steps is its own length (A1111's
    rule: the table has 11 entries, so 10 steps interpolate too). float32 values, as A1111 builds them."""
    table = torch.tensor(AYS_SD15, dtype=torch.float64)
    if steps != len(table):
        xs = np_linspace(1.0, len(table))
        ys = table.flip(0).log()
        new_xs = np_linspace(1.0, steps)
        idx = torch.searchsorted(xs, new_xs, right=True).clamp(1, len(xs) - 1)
        w = (new_xs - xs[idx - 1]) / (xs[idx] - xs[idx - 1])
        table = (ys[idx - 1] + w * (ys[idx] - ys[idx - 1])).exp().flip(0)
    return table.float().double()


@dataclass(frozen=True)
class ScheduleType:
    name: str            # canonical, as in sampler names: "karras"
    label: str           # A1111's "Schedule type" field: "Karras"
    sigmas: Callable[[int, ScheduleConfig], torch.Tensor] | None   # None: the sampler's own grid (Uniform)


SCHEDULE_TYPES = {s.name: s for s in (
    ScheduleType("uniform", "Uniform", None),
    ScheduleType("karras", "Karras", karras),
    ScheduleType("exponential", "Exponential", exponential),
    ScheduleType("sgm_uniform", "SGM Uniform", sgm_uniform),
    ScheduleType("align_your_steps", "Align Your Steps", align_your_steps),
)}
