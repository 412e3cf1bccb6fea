"""Samplers: pure functions that walk a Plan with an eps_model, yielding the latents after each step.

Every sampler has one signature, `fn(eps_model, x, plan, generator, *, noise_dtype) -> Iterator[Tensor]`, where
`eps_model(x_in, t) -> ε` is the (guided) UNet: x_in is exactly what the UNet sees and t its timestep
as a python float (fractional under Karras sigmas, as diffusers computes them).

Each sampler keeps the state its paper and diffusers use, so every yielded latent equals the
matching diffusers scheduler's `prev_sample` under the SD1.5 config:
  DDIM, DDPM, DPM-Solver++  the VP latent x_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε   (the UNet input as is)
  Euler, Euler a            x_σ = x0 + σ·ε                               (UNet input x_σ / sqrt(σ²+1))
Per-step noise is drawn from `generator` on its device (CPU for a CPU generator) in the shape and
order diffusers draws it, then moved to x's device. The math runs in x's dtype: the pipeline keeps x in
float32 even for a fp16 UNet, and passes `noise_dtype` = the model's dtype so the draws stay the ones
diffusers makes (CPU randn in fp16 is fp32 randn rounded only when the count is a multiple of 16; past
that, the last values differ, e.g. at 520×520).

Usage:
    plan = make_plan(resolve_sampler("DPM++ 2M Karras"), steps=25)            # txt2img
    plan = make_plan(resolve_sampler("euler_a"), steps=25, strength=0.75)    # img2img
    for x in sample(plan, eps_model, noise, x0=None, generator=g): ...       # or denoise(...)
"""
import collections
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .schedule import (ScheduleConfig, dpm_timesteps, karras_sigmas, leading_timesteps,
                       linspace_timesteps, sigma_at, sigma_table, timestep_at)

EpsModel = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # canonical name, e.g. "dpmpp_2m_karras"
    label: str  # A1111 "Sampler" field, e.g. "DPM++ 2M"
    schedule_type: str  # A1111 "Schedule type" field: "Karras" or "Automatic"
    fn: Callable[..., Iterator[torch.Tensor]]  # the sampler
    grid: Callable[[int, ScheduleConfig], tuple]  # (steps, cfg) -> full (timesteps [n], sigmas [n+1])
    vp: bool  # state is the VP latent (True) or x_σ = x0 + σ·ε (False)


@dataclass(frozen=True, eq=False)
class Plan:
    """The part of one sampler's schedule that will run: the last int(steps·strength) steps."""
    sampler: SamplerSpec
    timesteps: torch.Tensor  # [k] float64: the UNet's t at each step to run
    sigmas: torch.Tensor  # [k+1] float64: σ before each step, then σ after the last one
    init_sigma: float  # txt2img start x = noise·init_sigma (diffusers' init_noise_sigma)
    strength: float
    eta: float  # DDIM only: 0 = deterministic, 1 = DDPM-like variance

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


# ---- the schedules each sampler walks (diffusers' set_timesteps under the SD1.5 config) ----

def _vp_grid(t: torch.Tensor, sigma_after_last: float, cfg: ScheduleConfig):
    return t.double(), torch.cat([sigma_table(cfg)[t], torch.tensor([sigma_after_last], dtype=torch.float64)])


def _ddim_grid(steps, cfg):
    # DDIMScheduler: ᾱ_prev = ᾱ[t - N//steps]; below t=0 it is ᾱ_0 (set_alpha_to_one=False) or 1.
    t = leading_timesteps(steps, cfg)
    prev = int(t[-1]) - cfg.num_train_steps // steps
    last = 0.0 if (prev < 0 and cfg.set_alpha_to_one) else float(sigma_table(cfg)[max(prev, 0)])
    return _vp_grid(t, last, cfg)


def _ddpm_grid(steps, cfg):
    return _vp_grid(leading_timesteps(steps, cfg), 0.0, cfg)  # DDPMScheduler ends at ᾱ = 1


def _dpm_grid(steps, cfg):
    return _vp_grid(dpm_timesteps(steps, cfg), 0.0, cfg)  # final_sigmas_type="zero"


def _dpm_karras_grid(steps, cfg):
    table = sigma_table(cfg)  # Karras between the training extremes; timesteps rounded to integers
    sigmas = karras_sigmas(float(table[0]), float(table[-1]), steps)
    return timestep_at(sigmas, cfg).round(), torch.cat([sigmas, sigmas.new_zeros(1)])


def _euler_grid(steps, cfg):
    t = linspace_timesteps(steps, cfg)
    return t, torch.cat([sigma_at(t, cfg), t.new_zeros(1)])


def _euler_karras_grid(steps, cfg):
    # Karras between the σ of its own linspace grid: with steps=1 that grid is {t=0}, so
    # σ_min = σ_max = σ_0 (diffusers' behaviour, kept). Timesteps stay fractional (float32).
    linear = sigma_at(linspace_timesteps(steps, cfg), cfg)
    sigmas = karras_sigmas(float(linear[-1]), float(linear[0]), steps)
    return timestep_at(sigmas, cfg).float().double(), torch.cat([sigmas, sigmas.new_zeros(1)])


# ---- the samplers ----

def _steps(plan: Plan):
    return zip(plan.timesteps.tolist(), plan.sigmas[:-1].tolist(), plan.sigmas[1:].tolist())


def _abar(sigma: float) -> float:
    return 1.0 / (1.0 + sigma * sigma)  # ᾱ from σ = sqrt((1-ᾱ)/ᾱ)


def _randn(x: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=dtype or x.dtype)
    if noise.device.type == "cpu" and x.device.type == "cuda":  # pinned: the copy need not stall the GPU queue
        return noise.pin_memory().to(x.device, x.dtype, non_blocking=True)
    return noise.to(x.device, x.dtype)


def sample_ddim(eps_model: EpsModel, x, plan: Plan, generator=None, *, noise_dtype=None) -> Iterator[torch.Tensor]:
    """DDIM, Song et al. 2021 eq. 12, with σ_t(η) from eq. 16."""
    for t, s, s_next in _steps(plan):
        a, a_next = _abar(s), _abar(s_next)
        eps = eps_model(x, t)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)  # "predicted x0"
        std = plan.eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next - std**2) * eps  # "direction pointing to x_t"
        if plan.eta > 0:
            x = x + std * _randn(x, generator, noise_dtype)  # "random noise"
        yield x


def sample_ddpm(eps_model: EpsModel, x, plan: Plan, generator=None, *, noise_dtype=None) -> Iterator[torch.Tensor]:
    """DDPM ancestral sampling, Ho et al. 2020: x0 from eq. 15, posterior mean/variance eq. 6-7 (β̃_t)."""
    for t, s, s_prev in _steps(plan):
        a, a_prev = _abar(s), _abar(s_prev)
        beta = 1 - a / a_prev  # β from this timestep to the next one in the schedule
        eps = eps_model(x, t)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * x
        if t > 0:  # diffusers draws at every t > 0, even where β̃ is ~0 (clamped to 1e-20)
            variance = max((1 - a_prev) / (1 - a) * beta, 1e-20)
            x = x + math.sqrt(variance) * _randn(x, generator, noise_dtype)
        yield x


def sample_euler(eps_model: EpsModel, x, plan: Plan, generator=None, *, noise_dtype=None) -> Iterator[torch.Tensor]:
    """Euler on dx/dσ = (x − D(x;σ))/σ = ε: Karras et al. 2022 alg. 2, S_churn = 0, no Heun step."""
    for t, s, s_next in _steps(plan):
        eps = eps_model(x / math.sqrt(s * s + 1), t)  # c_in = 1/sqrt(σ²+1)
        x = x + (s_next - s) * eps
        yield x


def sample_euler_ancestral(eps_model: EpsModel, x, plan: Plan, generator=None, *, noise_dtype=None) -> Iterator[torch.Tensor]:
    """Euler ancestral (k-diffusion): Euler down to σ_down, then fresh noise of std σ_up up to σ_next."""
    for t, s, s_next in _steps(plan):
        eps = eps_model(x / math.sqrt(s * s + 1), t)
        s_up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        s_down = math.sqrt(s_next**2 - s_up**2)
        x = x + (s_down - s) * eps + s_up * _randn(x, generator, noise_dtype)
        yield x


def sample_dpmpp_2m(eps_model: EpsModel, x, plan: Plan, generator=None, *, noise_dtype=None) -> Iterator[torch.Tensor]:
    """DPM-Solver++(2M), Lu et al. 2022 alg. 2, on the VP latent with λ = log(α/σ_vp) = −log σ.

    First order on the first step and on the last (σ_next = 0: it returns the x0 prediction),
    as diffusers' DPMSolverMultistepScheduler does with final_sigmas_type="zero".
    """
    prev = None  # (x0 prediction, h) of the previous step
    for t, s, s_next in _steps(plan):
        alpha = 1 / math.sqrt(1 + s * s)  # α_t; σ_vp = s·α
        eps = eps_model(x, t)
        denoised = (x - s * alpha * eps) / alpha  # data prediction x_θ
        if s_next == 0:
            x = denoised  # the update's limit as λ_next → ∞
        else:
            alpha_next = 1 / math.sqrt(1 + s_next * s_next)
            h = math.log(s / s_next)  # λ_next − λ
            d = denoised
            if prev is not None:  # D = (1 + 1/2r)·x_θ(t) − 1/2r·x_θ(t−1), r = h_last/h
                r = prev[1] / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * prev[0]
            x = (s_next * alpha_next) / (s * alpha) * x - alpha_next * math.expm1(-h) * d
            prev = (denoised, h)
        yield x


# ---- names, plans, entry points ----

SAMPLERS = {s.name: s for s in (
    SamplerSpec("ddim", "DDIM", "Automatic", sample_ddim, _ddim_grid, vp=True),
    SamplerSpec("ddpm", "DDPM", "Automatic", sample_ddpm, _ddpm_grid, vp=True),
    SamplerSpec("euler", "Euler", "Automatic", sample_euler, _euler_grid, vp=False),
    SamplerSpec("euler_karras", "Euler", "Karras", sample_euler, _euler_karras_grid, vp=False),
    SamplerSpec("euler_a", "Euler a", "Automatic", sample_euler_ancestral, _euler_grid, vp=False),
    SamplerSpec("dpmpp_2m", "DPM++ 2M", "Automatic", sample_dpmpp_2m, _dpm_grid, vp=True),
    SamplerSpec("dpmpp_2m_karras", "DPM++ 2M", "Karras", sample_dpmpp_2m, _dpm_karras_grid, vp=True),
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
    key = _normalize(name)
    if schedule_type is not None and _normalize(schedule_type) not in ("automatic", ""):
        key += _normalize(schedule_type)
    if key not in _BY_KEY:
        shown = name if schedule_type is None else f"{name}, schedule type {schedule_type}"
        raise ValueError(f"unknown sampler {shown!r}; valid names: {', '.join(SAMPLERS)} "
                         "(A1111 spellings such as 'Euler a' or 'DPM++ 2M Karras' also work)")
    return _BY_KEY[key]


def make_plan(sampler: SamplerSpec, steps: int, strength: float = 1.0, eta: float = 0.0,
              schedule: ScheduleConfig = ScheduleConfig()) -> Plan:
    """The schedule of `steps` steps, of which the last int(steps·strength) run (img2img keeps a tail,
    exactly as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps does)."""
    if not isinstance(steps, int) or not 1 <= steps <= schedule.num_train_steps:
        raise ValueError(f"steps must be an integer from 1 to {schedule.num_train_steps}, got {steps!r}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if not 0 <= eta <= 1 or (eta != 0 and sampler.name != "ddim"):
        raise ValueError(f"eta={eta} is not valid for {sampler.name}: eta in [0, 1] applies to ddim only")
    kept = min(int(steps * strength), steps)
    if kept == 0:
        raise ValueError(f"strength {strength} of {steps} steps leaves no step to run; "
                         f"raise strength to at least {1 / steps:.3g} or use more steps")
    timesteps, sigmas = sampler.grid(steps, schedule)
    init_sigma = 1.0 if sampler.vp else float(sigmas.max())
    start = steps - kept
    return Plan(sampler, timesteps[start:], sigmas[start:], init_sigma, strength, eta)


def start_latents(plan: Plan, noise: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
    """txt2img: noise·init_sigma. img2img: x0 noised to the first kept step (diffusers' add_noise)."""
    if x0 is None:
        if plan.strength < 1:
            raise ValueError(f"strength {plan.strength} needs an init image (x0); txt2img uses strength 1")
        return noise * plan.init_sigma
    s = float(plan.sigmas[0])
    x = x0 + s * noise  # x_σ = x0 + σ·ε
    return x / math.sqrt(s * s + 1) if plan.sampler.vp else x  # VP: sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε


def sample(plan: Plan, eps_model: EpsModel, noise: torch.Tensor, x0: torch.Tensor | None = None,
           generator: torch.Generator | None = None, *, noise_dtype: torch.dtype | None = None,
           ) -> Iterator[torch.Tensor]:
    """Iterate the latents after each step; the last one is the result.

    noise: randn((B,4,h,w)) from `generator` (on CPU for a CPU generator), moved by the caller to the
    device of x0 / the model. x0: clean latents (already ×0.18215) for img2img, None for txt2img.
    The sampler runs in the dtype of noise (and x0); noise_dtype: the dtype per-step noise is drawn in.
    """
    return plan.sampler.fn(eps_model, start_latents(plan, noise, x0), plan, generator, noise_dtype=noise_dtype)


def denoise(plan: Plan, eps_model: EpsModel, noise: torch.Tensor, x0: torch.Tensor | None = None,
            generator: torch.Generator | None = None, *, noise_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run `sample` to the end and return the final latents."""
    steps = sample(plan, eps_model, noise, x0, generator, noise_dtype=noise_dtype)
    return collections.deque(steps, maxlen=1)[0]
