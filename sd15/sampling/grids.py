"""The timestep and σ grids each sampler walks: diffusers' `set_timesteps` under the SD1.5 config.

A grid function takes (steps, schedule config) and returns (timesteps [n] float64, sigmas [n+1] float64):
the UNet's t at each step, and σ before each step followed by σ after the last one.
"""

import math

import torch

from .schedule import (ScheduleConfig, dpm_timesteps, karras_sigmas, leading_timesteps, linspace_timesteps,
                       np_linspace_between, sigma_at, sigma_table, timestep_at)
from .schedule_types import exponential as exponential_sigmas

Grid = tuple[torch.Tensor, torch.Tensor]


def _vp_grid(t: torch.Tensor, sigma_after_last: float, cfg: ScheduleConfig) -> Grid:
    return t.double(), torch.cat([sigma_table(cfg)[t], torch.tensor([sigma_after_last], dtype=torch.float64)])


def ddim_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    # DDIMScheduler: ᾱ_prev = ᾱ[t - N//steps]; below t=0 it is ᾱ_0 (set_alpha_to_one=False) or 1.
    t = leading_timesteps(steps, cfg)
    prev = int(t[-1]) - cfg.num_train_steps // steps
    last = 0.0 if (prev < 0 and cfg.set_alpha_to_one) else float(sigma_table(cfg)[max(prev, 0)])
    return _vp_grid(t, last, cfg)


def ddpm_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    return _vp_grid(leading_timesteps(steps, cfg), 0.0, cfg)  # DDPMScheduler ends at ᾱ = 1


def dpm_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    return _vp_grid(dpm_timesteps(steps, cfg), 0.0, cfg)  # final_sigmas_type="zero"


def euler_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    t = linspace_timesteps(steps, cfg)
    return t, torch.cat([sigma_at(t, cfg), t.new_zeros(1)])


def euler_karras_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    # Karras between the σ of its own linspace grid: with steps=1 that grid is {t=0}, so
    # σ_min = σ_max = σ_0 (diffusers' behaviour, kept). Timesteps stay fractional (float32).
    linear = sigma_at(linspace_timesteps(steps, cfg), cfg)
    sigmas = karras_sigmas(float(linear[-1]), float(linear[0]), steps)
    return timestep_at(sigmas, cfg).float().double(), torch.cat([sigmas, sigmas.new_zeros(1)])


def from_sigmas(sigmas: torch.Tensor, cfg: ScheduleConfig, round_timesteps: bool = False) -> Grid:
    """The grid of a schedule type's σ levels: each level's timestep by log-σ interpolation (k-diffusion's
    sigma_to_t; diffusers' `_sigma_to_t`), rounded where the sampler's diffusers scheduler rounds it, and σ = 0
    after the last step."""
    sigmas = sigmas.double()
    t = timestep_at(sigmas, cfg)
    t = t.round() if round_timesteps else t.float().double()   # diffusers keeps fractional t in float32
    return t, torch.cat([sigmas, sigmas.new_zeros(1)])


def euler_exponential_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    # As euler_karras_grid: between the σ of Euler's own linspace grid (one step: σ_0 alone, diffusers' quirk).
    linear = sigma_at(linspace_timesteps(steps, cfg), cfg)
    sigmas = np_linspace_between(math.log(float(linear[0])), math.log(float(linear[-1])), steps).exp()
    return timestep_at(sigmas, cfg).float().double(), torch.cat([sigmas, sigmas.new_zeros(1)])


def dpm_exponential_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    # DPMSolverMultistepScheduler rounds the timesteps of its Karras grid but not those of its exponential one,
    # which it casts to int64: truncated. Its σ_max comes back a hair below the table's (exp of log), so the
    # first step runs at t = 998, not 999; the 1e-9 reproduces that without moving any other timestep.
    sigmas = exponential_sigmas(steps, cfg)
    return (timestep_at(sigmas, cfg) - 1e-9).trunc().clamp(min=0), torch.cat([sigmas, sigmas.new_zeros(1)])
