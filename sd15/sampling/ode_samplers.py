"""The σ-space ODE family of k-diffusion: Heun, LMS, DPM2, DPM2 a and DPM++ 2S a.

All of them keep the state x_σ = x0 + σ·ε and integrate the probability-flow ODE dx/dσ = ε(x; σ)
(Karras et al. 2022, eq. 3 with σ(t) = t), as k-diffusion's samplers do; the model's ε is Karras'
derivative d = (x − D(x; σ))/σ. Each yielded state is the state after one whole step (a second-order
step's inner evaluation is never yielded), and equals the `prev_sample` of the matching diffusers
scheduler after the step's last substep:

  sampler        A1111       diffusers                           UNet calls   noise
  heun           Heun        HeunDiscreteScheduler               2N − 1       —
  lms            LMS         LMSDiscreteScheduler (order 4)      N            —
  dpm_2          DPM2        KDPM2DiscreteScheduler              2N − 1       —
  dpm_2_a        DPM2 a      KDPM2AncestralDiscreteScheduler     2N − 1       N − 1 draws
  dpmpp_2s_a     DPM++ 2S a  none (k-diffusion's formula)        2N − 1       N − 1 draws

The second-order samplers make their last step (to σ = 0) an Euler step: the corrector would evaluate
the model at σ = 0, and DPM2's midpoint in log σ does not exist there. Ancestral samplers draw one noise
per step that does not end at σ = 0 (diffusers' count; the noise would be scaled by σ_up = 0 there),
and none at all when they add none (eta = 0 or s_noise = 0), so a run with eta = 0 is deterministic.

Where each sampler evaluates the model:
  Heun's corrector runs at grid point i+1 (`model(x, i + 1)`): σ and t exactly as the start of step
  i+1 sees them, which is what diffusers does (its timesteps repeat t_{i+1}). A σ -> t lookup there
  would move t on the Uniform grid, whose σ is interpolated linearly in t. Its ModelCall.step is i+1
  too, so a prompt schedule sees the corrector at the point of the schedule where it is evaluated.
  DPM2's and DPM++ 2S's inner evaluations are between grid points (`model(x, i, sigma=σ_mid)`): t from
  the log-σ interpolation, which is diffusers' `_sigma_to_t` and k-diffusion's `sigma_to_t`.

LMS img2img: A1111 (k-diffusion) raises the order from 1 at the first step of the run. diffusers' LMS
takes the order from the step's index in the whole schedule, so an img2img run that starts at step k
asks for order min(k+1, 4) while it holds one derivative: its first steps use one coefficient of a
higher-order rule, which is not even consistent (constant ε is not integrated exactly). We follow
k-diffusion; the tests compare with diffusers' own step(order=...) at the order k-diffusion uses, and
show the default call's error on a constant ε.

A1111's "discard penultimate σ" (DPM2, DPM2 a): A1111 computes the schedule for steps + 1 and drops
the σ before the final 0, so the last (Euler) step starts from a larger σ and the run still has
`steps` steps. That is a property of the grid, not of the sampler, so it is the registry flag
`SamplerSpec.discard_penultimate_sigma`, applied by `make_grid` to every schedule type as A1111 does.
diffusers has no such option: the tests prove the samplers exact against diffusers on the grids
diffusers builds (the flag off) and test the discard's arithmetic on its own.

Grids: Uniform is diffusers' linspace grid (σ linear in t), as for Euler; Karras and Exponential are the
grids diffusers builds for these schedulers (between the σ of that linspace grid, so one step is σ(t=0)
alone, as `grids.euler_karras_grid`), KDPM2's with its rounded (Karras) or float64 (Exponential)
timesteps. DPM++ 2S a has no diffusers scheduler: its Karras/Exponential are A1111's schedule types.

Precision: σ-level coefficients are float64 python scalars. diffusers and k-diffusion build σ_down in
float32, which cancels when σ_next << σ (a 2-step run: 14.6 -> 0.029); ours is the exact value there.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from . import grids
from .samplers import Steps, ancestral_step
from .schedule import ScheduleConfig, timestep_at

if TYPE_CHECKING:
    from .denoiser import Denoiser
    from .noise import NoiseSource
    from .plan import Plan

LMS_ORDER = 4  # A1111's (k-diffusion's default) and diffusers' (StableDiffusionPipeline passes no order)


def dpm2_karras_grid(steps: int, cfg: ScheduleConfig) -> grids.Grid:
    """KDPM2(Ancestral)DiscreteScheduler's Karras grid: Euler's (Karras between the σ of its own linspace
    grid), with each timestep rounded to an integer as those two schedulers do (the σ stay unrounded)."""
    _t, sigmas = grids.euler_karras_grid(steps, cfg)
    return timestep_at(sigmas[:-1], cfg).round(), sigmas


def dpm2_exponential_grid(steps: int, cfg: ScheduleConfig) -> grids.Grid:
    """KDPM2(Ancestral)DiscreteScheduler's exponential grid: Euler's, with the fractional timesteps kept in
    float64 (these two schedulers do not cast them to float32)."""
    _t, sigmas = grids.euler_exponential_grid(steps, cfg)
    return timestep_at(sigmas[:-1], cfg), sigmas


def sample_heun(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource) -> Steps:
    """Heun's method (trapezoidal rule) on dx/dσ = ε: Karras et al. 2022, alg. 1 (alg. 2 with S_churn = 0)."""
    for i, _t, s, s_next in plan.steps():
        eps = model(x, i)
        if s_next == 0:
            x = x + (s_next - s) * eps  # alg. 1 line 7: no correction from σ = 0
        else:
            x_euler = x + (s_next - s) * eps
            eps_next = model(x_euler, i + 1)  # the slope at the end point: grid point i+1 (module docstring)
            x = x + (s_next - s) * ((eps + eps_next) / 2)
        x = yield x


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """∫ ℓ_j(τ) dτ from σ_i to σ_{i+1}, j = 0..order-1, where ℓ_j is the Lagrange basis polynomial on the
    nodes σ_i, σ_{i-1}, ..., σ_{i-order+1} that is 1 at σ_{i-j} (Adams–Bashforth on a variable grid).

    Exact: ℓ_j is a polynomial of degree order-1, integrated in closed form in u = τ − σ_i (about the
    step's start, so the powers of u stay small and nothing cancels).
    """
    if not 1 <= order <= i + 1:
        raise ValueError(f"LMS order {order} needs {order} previous points, step {i} has {i + 1}")
    h = sigmas[i + 1] - sigmas[i]
    coefficients = []
    for j in range(order):
        poly, denominator = [1.0], 1.0  # numerator of ℓ_j(σ_i + u), coefficients of u^0, u^1, ...
        for k in range(order):
            if k != j:  # times (u + σ_i − σ_{i-k})
                c = sigmas[i] - sigmas[i - k]
                poly = [c * a + b for a, b in zip(poly + [0.0], [0.0] + poly)]
                denominator *= sigmas[i - j] - sigmas[i - k]
        coefficients.append(sum(a * h ** (p + 1) / (p + 1) for p, a in enumerate(poly)) / denominator)
    return coefficients


def sample_lms(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource) -> Steps:
    """Linear multistep (Adams–Bashforth) in σ, order 4: x_{i+1} = x_i + Σ_j c_j·ε_{i-j}, c_j the integrals of
    the Lagrange basis through the last few (σ, ε) (k-diffusion's sample_lms). The order grows from 1 at the
    run's first step (module docstring: img2img)."""
    sigmas = plan.sigmas.tolist()
    history: list[torch.Tensor] = []  # ε at the last LMS_ORDER grid points, newest last
    for i, _t, _s, _s_next in plan.steps():
        history = (history + [model(x, i)])[-LMS_ORDER:]
        coefficients = lms_coefficients(sigmas, i, len(history))
        x = x + sum(c * eps for c, eps in zip(coefficients, reversed(history)))
        x = yield x


def _midpoint_step(model: Denoiser, x: torch.Tensor, eps: torch.Tensor, i: int, s: float,
                   s_to: float) -> torch.Tensor:
    """DPM-Solver-2 as k-diffusion writes it in σ: an Euler half step to the midpoint in log σ, then the whole
    step from x with the slope there (Lu et al. 2022, alg. 1 with r = 1/2, in the ε view)."""
    s_mid = math.sqrt(s * s_to)  # exp of the mean of log σ and log σ_to
    eps_mid = model(x + (s_mid - s) * eps, i, sigma=s_mid)
    return x + (s_to - s) * eps_mid


def sample_dpm2(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource) -> Steps:
    """k-diffusion's sample_dpm_2 (S_churn = 0): a midpoint step in log σ, Euler on the last step."""
    for i, _t, s, s_next in plan.steps():
        eps = model(x, i)
        x = x + (s_next - s) * eps if s_next == 0 else _midpoint_step(model, x, eps, i, s, s_next)
        x = yield x


def sample_dpm2_ancestral(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource, *,
                          eta: float = 1.0, s_noise: float = 1.0) -> Steps:
    """k-diffusion's sample_dpm_2_ancestral: the DPM2 midpoint step down to σ_down, then noise of std
    s_noise·σ_up (`ancestral_step`)."""
    for i, _t, s, s_next in plan.steps():
        s_down, s_up = ancestral_step(s, s_next, eta)
        eps = model(x, i)
        x = x + (s_down - s) * eps if s_down == 0 else _midpoint_step(model, x, eps, i, s, s_down)
        if s_next > 0 and eta > 0 and s_noise > 0:  # one draw per step that adds noise (module docstring)
            x = x + (s_noise * s_up) * noise.step(x, s, s_next)
        x = yield x


def sample_dpmpp_2s_ancestral(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource, *,
                              eta: float = 1.0, s_noise: float = 1.0) -> Steps:
    """DPM-Solver++(2S), Lu et al. 2022 (DPM-Solver++) alg. 1 with r = 1/2, down to σ_down, then ancestral
    noise: k-diffusion's sample_dpmpp_2s_ancestral. In λ = −log σ the step is h = log(σ/σ_down) and the
    intermediate point is λ + h/2, i.e. σ_mid = sqrt(σ·σ_down); each update is exact for a constant x0
    prediction: x' = (σ'/σ)·x − expm1(−h')·x0."""
    for i, _t, s, s_next in plan.steps():
        s_down, s_up = ancestral_step(s, s_next, eta)
        eps = model(x, i)
        if s_down == 0:
            x = x - s * eps  # Euler to σ = 0: the x0 prediction
        else:
            h = math.log(s / s_down)
            s_mid = math.sqrt(s * s_down)
            x_mid = (s_mid / s) * x - math.expm1(-h / 2) * (x - s * eps)
            x0_mid = x_mid - s_mid * model(x_mid, i, sigma=s_mid)
            x = (s_down / s) * x - math.expm1(-h) * x0_mid
        if s_next > 0 and eta > 0 and s_noise > 0:
            x = x + (s_noise * s_up) * noise.step(x, s, s_next)
        x = yield x
