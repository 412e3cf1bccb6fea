"""The SD 1.x noise schedule and the timestep / sigma grids the samplers walk.

Two views of the same forward process (Ho et al. 2020; Karras et al. 2022):
  variance preserving  x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε
  sigma space          x_σ = x0 + σ·ε,  σ_t = sqrt((1-ᾱ_t)/ᾱ_t),  x_t = x_σ / sqrt(σ²+1)
The tables are computed here from the config; schedule buffers stored in checkpoint files are never
used. ᾱ is accumulated in float32, as diffusers does, then widened to float64 for everything after:
the original LDM code used float64 throughout, but the two tables differ by ~1e-5, enough to move a
Karras timestep across a rounding boundary, and parity with the reference images matters more here. Grids mirror diffusers' `set_timesteps` (numpy's linspace and rounding
included) so timesteps and sigmas come out the same as the reference.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScheduleConfig:
    """SD 1.x training schedule (the `scheduler_config.json` of SD1.5, minus per-sampler choices)."""
    num_train_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # the only one SD 1.x uses
    steps_offset: int = 1  # added to "leading" timesteps: 50 DDIM steps run 981, 961, ..., 1
    set_alpha_to_one: bool = False  # DDIM's last step lands on ᾱ_0, not on ᾱ=1


def alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    """ᾱ_t for t = 0..N-1: betas = linspace(√β_start, √β_end, N)², ᾱ = cumprod(1-β) (float32, returned as float64)."""
    if cfg.beta_schedule != "scaled_linear":
        raise ValueError(f"beta_schedule {cfg.beta_schedule!r} is not supported; SD 1.x uses 'scaled_linear'")
    sqrt_betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_steps, dtype=torch.float32)
    betas = sqrt_betas**2
    return torch.cumprod(1.0 - betas, dim=0).double()


def sigma_table(cfg: ScheduleConfig) -> torch.Tensor:
    """σ_t = sqrt((1-ᾱ_t)/ᾱ_t) for t = 0..N-1 (increasing), float64."""
    abar = alphas_cumprod(cfg)
    return ((1.0 - abar) / abar).sqrt()


def np_linspace(stop: float, num: int) -> torch.Tensor:
    """numpy.linspace(0, stop, num) bit for bit (k·(stop/(num-1)), last = stop), float64.

    diffusers builds its grids with numpy; copying its arithmetic keeps round() ties identical.
    """
    if num == 1:
        return torch.zeros(1, dtype=torch.float64)
    grid = torch.arange(num, dtype=torch.float64) * (stop / (num - 1))
    grid[-1] = stop
    return grid


def np_linspace_between(start: float, stop: float, num: int) -> torch.Tensor:
    """numpy.linspace(start, stop, num) bit for bit (start + k·((stop−start)/(num−1)), last = stop), float64."""
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    grid = torch.arange(num, dtype=torch.float64) * ((stop - start) / (num - 1)) + start
    grid[-1] = stop
    return grid


def leading_timesteps(steps: int, cfg: ScheduleConfig) -> torch.Tensor:
    """The "leading" spacing (DDIM, DDPM): t_i = (steps-1-i)·(N // steps) + steps_offset, int64."""
    ratio = cfg.num_train_steps // steps
    t = torch.arange(steps - 1, -1, -1, dtype=torch.int64) * ratio + cfg.steps_offset
    if t[0] >= cfg.num_train_steps:
        raise ValueError(f"{steps} steps with steps_offset {cfg.steps_offset} run past the "
                         f"{cfg.num_train_steps} training timesteps; use fewer steps")
    return t


def linspace_timesteps(steps: int, cfg: ScheduleConfig) -> torch.Tensor:
    """The "linspace" spacing of EulerDiscreteScheduler: linspace(0, N-1, steps) reversed, float32 values.

    steps=1 gives t=0 (numpy's linspace with one point is its start) -- diffusers' behaviour, kept.
    """
    return np_linspace(cfg.num_train_steps - 1, steps).flip(0).float().double()


def dpm_timesteps(steps: int, cfg: ScheduleConfig) -> torch.Tensor:
    """The "linspace" spacing of DPMSolverMultistepScheduler: round(linspace(0, N-1, steps+1)), reversed,
    last dropped."""
    return np_linspace(cfg.num_train_steps - 1, steps + 1).round().flip(0)[:-1].long()


def sigma_at(t: torch.Tensor, cfg: ScheduleConfig) -> torch.Tensor:
    """σ at (possibly fractional) timesteps t, linear interpolation in t (np.interp), float64."""
    table = sigma_table(cfg)
    t = t.double()
    lo = t.floor().long().clamp(0, len(table) - 2)
    w = t - lo
    return table[lo] + w * (table[lo + 1] - table[lo])


def timestep_at(sigma: torch.Tensor, cfg: ScheduleConfig) -> torch.Tensor:
    """Fractional timestep whose σ is `sigma`: interpolate linearly in log σ, clipped to [0, N-1]."""
    log_table = sigma_table(cfg).log()
    log_sigma = sigma.double().clamp(min=1e-10).log()
    lo = (torch.searchsorted(log_table, log_sigma, right=True) - 1).clamp(0, len(log_table) - 2)
    w = ((log_table[lo] - log_sigma) / (log_table[lo] - log_table[lo + 1])).clamp(0, 1)
    return (1 - w) * lo + w * (lo + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ."""
    ramp = np_linspace(1.0, steps)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho
