"""Samplers: pure functions that walk a plan, yielding the latents after each step.

Every sampler has one signature, `fn(model, x, plan, noise, **options) -> Generator[Tensor]`:
  model    a `Denoiser`: model(x, step) -> ε for the state x at that step (input scaling and σ -> t
           happen there, once for all samplers)
  x        the start state (`plan.start_latents`), in the sampler's view (`SamplerSpec.vp`)
  noise    a `NoiseSource`: noise.step(x, σ, σ_next) for stochastic steps, drawn in the order diffusers draws
  options  the sampler's declared options (registry), e.g. DDIM's eta

Each sampler keeps the state its paper and diffusers use, so every yielded latent equals the matching
diffusers scheduler's `prev_sample` under the SD1.5 config:
  DDIM, DDPM, DPM-Solver++  the VP latent x_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε   (the UNet input as is)
  Euler, Euler a            x_σ = x0 + σ·ε                               (UNet input x_σ / sqrt(σ²+1))
The math runs in x's dtype: the pipeline keeps x in float32 even for a fp16 UNet.

Each step ends with `x = yield x`: the sampler hands out its state and carries on from the state it is
sent back, which `plan.sample` sends unchanged or as a caller's `after_step` replaced it (diffusers'
latent blending for inpainting masks rewrites the state between steps). Drive samplers through
`plan.sample`: iterating one directly sends None.

A new sampler is one function here and one row in `registry.SAMPLERS`.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .denoiser import Denoiser
    from .noise import NoiseSource
    from .plan import Plan


Steps = Generator[torch.Tensor, torch.Tensor, None]   # yields the state after each step, is sent it back


def _abar(sigma: float) -> float:
    return 1.0 / (1.0 + sigma * sigma)  # ᾱ from σ = sqrt((1-ᾱ)/ᾱ)


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up) of k-diffusion's get_ancestral_step: the ODE goes down to σ_down, fresh noise of
    std σ_up brings the marginal back up to σ_next (σ_down² + σ_up² = σ_next²). eta = 1 is the DDPM
    posterior's noise, eta = 0 none (σ_down = σ_next)."""
    if eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def sample_ddim(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource, *,
                eta: float = 0.0) -> Steps:
    """DDIM, Song et al. 2021 eq. 12, with σ_t(η) from eq. 16."""
    for i, _t, s, s_next in plan.steps():
        a, a_next = _abar(s), _abar(s_next)
        eps = model(x, i)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)  # "predicted x0"
        std = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next - std**2) * eps  # "direction pointing to x_t"
        if eta > 0:
            x = x + std * noise.step(x, s, s_next)  # "random noise"
        x = yield x


def sample_ddpm(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource) -> Steps:
    """DDPM ancestral sampling, Ho et al. 2020: x0 from eq. 15, posterior mean/variance eq. 6-7 (β̃_t)."""
    for i, t, s, s_prev in plan.steps():
        a, a_prev = _abar(s), _abar(s_prev)
        beta = 1 - a / a_prev  # β from this timestep to the next one in the schedule
        eps = model(x, i)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = (math.sqrt(a_prev) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * x
        if t > 0:  # diffusers draws at every t > 0, even where β̃ is ~0 (clamped to 1e-20)
            variance = max((1 - a_prev) / (1 - a) * beta, 1e-20)
            x = x + math.sqrt(variance) * noise.step(x, s, s_prev)
        x = yield x


def sample_euler(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource) -> Steps:
    """Euler on dx/dσ = (x − D(x;σ))/σ = ε: Karras et al. 2022 alg. 2, S_churn = 0, no Heun step."""
    for i, _t, s, s_next in plan.steps():
        x = x + (s_next - s) * model(x, i)
        x = yield x


def sample_euler_ancestral(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource, *,
                           eta: float = 1.0, s_noise: float = 1.0) -> Steps:
    """Euler ancestral (k-diffusion): Euler down to σ_down, then fresh noise of std σ_up up to σ_next.

    eta = 1 is diffusers' EulerAncestralDiscreteScheduler (which draws on every step, the last included);
    eta = 0 draws nothing and is Euler."""
    for i, _t, s, s_next in plan.steps():
        eps = model(x, i)
        s_down, s_up = ancestral_step(s, s_next, eta)
        x = x + (s_down - s) * eps
        if eta > 0 and s_noise > 0:
            x = x + (s_noise * s_up) * noise.step(x, s, s_next)
        x = yield x


def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource) -> Steps:
    """DPM-Solver++(2M), Lu et al. 2022 alg. 2, on the VP latent with λ = log(α/σ_vp) = −log σ.

    First order on the first step and on the last (σ_next = 0: it returns the x0 prediction),
    as diffusers' DPMSolverMultistepScheduler does with final_sigmas_type="zero".
    """
    prev = None  # (x0 prediction, h) of the previous step
    for i, _t, s, s_next in plan.steps():
        alpha = 1 / math.sqrt(1 + s * s)  # α_t; σ_vp = s·α
        eps = model(x, i)
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
        x = yield x
