"""The SDE samplers of DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", sec. 5 and app. B; k-diffusion's
formulas): each step solves the reverse SDE exactly for the linear part and adds fresh noise, so the result
depends on the seed at every step, not only through the initial noise.

  sampler             A1111                diffusers                                            UNet calls
  dpmpp_2m_sde        DPM++ 2M SDE         DPMSolverMultistepScheduler(sde-dpmsolver++)          N
  dpmpp_2m_sde_heun   DPM++ 2M SDE Heun    the same, solver_type="heun"                          N
  dpmpp_3m_sde        DPM++ 3M SDE         none (k-diffusion's formula, see below)               N
  dpmpp_sde           DPM++ SDE            DPMSolverSDEScheduler(noise_sampler_seed=seed)        2N − 1

State: the 2M SDE samplers keep the VP latent as DPMSolverMultistepScheduler does (each yielded latent is its
`prev_sample`); DPM++ SDE keeps x_σ = x0 + σ·ε as DPMSolverSDEScheduler does; DPM++ 3M SDE has no diffusers
counterpart and keeps k-diffusion's (and A1111's) x_σ, so txt2img starts from noise·σ_max as A1111 does.

Noise: a sampler gets a function (σ, σ_next) -> noise from the noise source, `noise.sde_noise(x, σ_min, σ_max,
brownian=...)`, over the whole schedule's positive σ range (`schedule_range`; an img2img run is a tail of it).
Under diffusers' seed policy (`GeneratorNoise`) the 2M SDE samplers draw a float32 normal per step from the
generator, as DPMSolverMultistepScheduler does (on the last step too, where the noise is multiplied by
σ_next = 0), and DPM++ SDE and 3M SDE draw from one Brownian tree over the batch seeded with the seed
(`brownian.py`), as DPMSolverSDEScheduler does; A1111's policy gives every sampler here one tree per image.
A run with eta = 0 or s_noise = 0 draws nothing and is deterministic (eta = 0 is the probability-flow ODE:
2M SDE becomes DPM++ 2M, DPM++ SDE becomes DPM++ 2S without noise).

DPM++ 3M SDE: k-diffusion's sample_dpmpp_3m_sde, which A1111 runs with its "discard penultimate σ" grid
(`SamplerSpec.discard_penultimate_sigma`). diffusers' solver_order=3 with sde-dpmsolver++ is a different
formula: its second step is the 2M midpoint update where k-diffusion's is the Heun-type one, and its third-
order term has the coefficient ((1 − e^{−2h} − 2h)/(2h)² − 1/2), which tends to −1 as h -> 0 where the
Taylor-consistent coefficient tends to 0 (the ODE branch of the same function has + 1/2) -- it is not
reproduced. k-diffusion's own third-order term is half the Taylor-exact one (its D2 estimates h²·x0''/2 but
is weighted as if it estimated h²·x0''), so with eta = 0 its local error is O(h³) and the method is second
order, like the 2M samplers, with a smaller error constant (tests/test_sde_samplers.py measures both).

DPM++ SDE: k-diffusion's sample_dpmpp_sde with r = 1/2 (A1111 does not expose r): per step an ancestral
half step to the midpoint in log σ, a model call there, then the whole step from the start with the
midpoint's x0 prediction, each half adding Brownian noise; the last step (to σ = 0) is an Euler step.
The Brownian noise is queried at σ values computed in float32 exactly as the references compute them: the
tree rounds query times to 1e-6, so a σ one float32 ulp off can select another sample (see `brownian.py`);
for the same reason this sampler's grids compute the σ table in float32 as DPMSolverSDEScheduler does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .grids import Grid
from .samplers import Steps, ancestral_step
from .schedule import ScheduleConfig, alphas_cumprod, karras_sigmas, np_linspace, np_linspace_between, timestep_at

if TYPE_CHECKING:
    from .denoiser import Denoiser
    from .noise import NoiseSource
    from .plan import Plan


# ---- the whole schedule's σ range -----------------------------------------------------------------------------

def schedule_range(plan: Plan) -> tuple[float, float]:
    """(σ_min, σ_max) of the whole schedule whose last steps the plan runs: the smallest σ above 0 (the tail
    ends where the schedule ends) and the first σ. A1111 and diffusers both root their Brownian trees there
    (A1111's img2img passes the full schedule to create_noise_sampler), so an img2img run draws at a σ what
    the whole run would draw."""
    sigmas = plan.sigmas
    return float(sigmas[sigmas > 0].min()), plan.schedule_sigma_max or float(sigmas.max())


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


# ---- DPM++ 2M SDE (and Heun) ----------------------------------------------------------------------------------

def _dpmpp_2m_sde(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource, eta: float, s_noise: float,
                  heun: bool) -> Steps:
    """DPM-Solver++(2M) SDE on the VP latent (α = 1/sqrt(1+σ²), σ_vp = σ·α, λ = −log σ, h = λ_next − λ):

        x' = (σ_vp'/σ_vp)·e^{−ηh}·x + α'·(1 − e^{−(1+η)h})·D + α'·c·(D − D_prev)/r + σ_vp'·sqrt(1 − e^{−2ηh})·s_noise·z

    with r = h_prev/h and c = 1/2·(1 − e^{−(1+η)h}) (midpoint) or 1 − (1 − e^{−(1+η)h})/((1+η)h) (Heun):
    k-diffusion's sample_dpmpp_2m_sde times α' (its state is x_σ = x/α), diffusers' sde-dpmsolver++ at η = 1.
    First order on the first step; the last (σ_next = 0) returns the x0 prediction D, the update's limit.
    """
    noisy = eta > 0 and s_noise > 0
    noise_at = noise.sde_noise(x, *schedule_range(plan), brownian=False) if noisy else None
    prev = None  # (D, h) of the previous step
    for i, _t, s, s_next in plan.steps():
        alpha = 1 / math.sqrt(1 + s * s)
        eps = model(x, i)
        denoised = (x - s * alpha * eps) / alpha  # D, the data prediction x_θ
        if s_next == 0:
            x = denoised
            if noise_at is not None:
                noise_at(s, 0.0)  # diffusers draws on this step too (its noise term is × σ_vp' = 0): keep its stream
        else:
            alpha_next = 1 / math.sqrt(1 + s_next * s_next)
            h = math.log(s / s_next)
            decay = -math.expm1(-(1 + eta) * h)  # 1 − e^{−(1+η)h}
            x = (s_next * alpha_next) / (s * alpha) * math.exp(-eta * h) * x + (alpha_next * decay) * denoised
            if prev is not None:
                r = prev[1] / h
                c = 1 - decay / ((1 + eta) * h) if heun else decay / 2
                x = x + (alpha_next * c / r) * (denoised - prev[0])
            if noise_at is not None:
                std = s_next * alpha_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
                x = x + std * noise_at(s, s_next)
            prev = (denoised, h)
        x = yield x


def sample_dpmpp_2m_sde(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource, *,
                        eta: float = 1.0, s_noise: float = 1.0) -> Steps:
    """DPM++ 2M SDE, midpoint second-order term (`_dpmpp_2m_sde`)."""
    return _dpmpp_2m_sde(model, x, plan, noise, eta, s_noise, heun=False)


def sample_dpmpp_2m_sde_heun(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource, *,
                             eta: float = 1.0, s_noise: float = 1.0) -> Steps:
    """DPM++ 2M SDE Heun: the Heun-type second-order term (`_dpmpp_2m_sde`)."""
    return _dpmpp_2m_sde(model, x, plan, noise, eta, s_noise, heun=True)


# ---- DPM++ 3M SDE ---------------------------------------------------------------------------------------------

def sample_dpmpp_3m_sde(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource, *,
                        eta: float = 1.0, s_noise: float = 1.0) -> Steps:
    """k-diffusion's sample_dpmpp_3m_sde on x_σ, with H = (1+η)·h, φ₂ = (e^{−H} − 1)/H + 1, φ₃ = φ₂/H − 1/2:

        x' = e^{−H}·x + (1 − e^{−H})·D + φ₂·D1 − φ₃·D2 + σ'·sqrt(1 − e^{−2ηh})·s_noise·z

    D1, D2 from the last three x0 predictions (r0 = h₁/h, r1 = h₂/h; d₀ = (D − D₁)/r0, d₁ = (D₁ − D₂)/r1,
    D1 = d₀ + (d₀ − d₁)·r0/(r0 + r1), D2 = (d₀ − d₁)/(r0 + r1)); with only one earlier prediction φ₂·(D − D₁)/r0,
    with none first order. The last step (σ_next = 0) returns D. See the module docstring for its order.
    """
    noisy = eta > 0 and s_noise > 0
    noise_at = noise.sde_noise(x, *schedule_range(plan), brownian=True) if noisy else None
    history: list[tuple[torch.Tensor, float]] = []  # (D, h) of the previous steps, newest first
    for i, _t, s, s_next in plan.steps():
        denoised = x - s * model(x, i)
        if s_next == 0:
            x = denoised
        else:
            h = math.log(s / s_next)
            big_h = (1 + eta) * h
            x = math.exp(-big_h) * x - math.expm1(-big_h) * denoised
            phi_2 = math.expm1(-big_h) / big_h + 1
            if len(history) == 2:
                (d_1, h_1), (d_2, h_2) = history
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / big_h - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif history:
                (d_1, h_1), = history
                x = x + (phi_2 * h / h_1) * (denoised - d_1)
            if noise_at is not None:
                x = x + (s_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise) * noise_at(s, s_next)
            history = [(denoised, h)] + history[:1]
        x = yield x


# ---- DPM++ SDE ------------------------------------------------------------------------------------------------

def _query_sigmas(s: float, s_next: float) -> tuple[float, float, float]:
    """σ, the log-σ midpoint and σ_next as k-diffusion (sigma_fn(t_fn(σ)), t + h/2) and diffusers compute them:
    in float32 (module docstring: the Brownian tree's time resolution)."""
    t, t_next = -_f32(s).log(), -_f32(s_next).log()
    t_mid = t + (t_next - t) * 0.5
    return float((-t).exp()), float((-t_mid).exp()), float((-t_next).exp())


def sample_dpmpp_sde(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource, *,
                     eta: float = 1.0, s_noise: float = 1.0) -> Steps:
    """DPM-Solver++ (stochastic), k-diffusion's sample_dpmpp_sde with r = 1/2: in λ = −log σ, h = λ' − λ,
    σ_mid = e^{−(λ + h/2)} = sqrt(σ·σ'),

        x_mid = (σ_d/σ)·x − expm1(−log(σ/σ_d))·D + s_noise·σ_u·z₁      (σ_d, σ_u) = ancestral(σ -> σ_mid)
        x'    = (σ_d'/σ)·x − expm1(−log(σ/σ_d'))·D_mid + s_noise·σ_u'·z₂  (σ_d', σ_u') = ancestral(σ -> σ')

    D_mid = x0 prediction at (x_mid, σ_mid); z₁, z₂ Brownian increments over [σ_mid, σ] and [σ', σ]. With r = 1/2
    k-diffusion's mix (1 − 1/2r)·D + 1/2r·D_mid is D_mid alone. The last step (σ' = 0) is Euler.
    """
    noisy = eta > 0 and s_noise > 0
    noise_at = noise.sde_noise(x, *schedule_range(plan), brownian=True) if noisy else None
    for i, _t, s, s_next in plan.steps():
        eps = model(x, i)
        if s_next == 0:
            x = x - s * eps  # Euler to σ = 0: x + (0 − σ)·ε
        else:
            denoised = x - s * eps
            s_mid = math.sqrt(s * s_next)
            q, q_mid, q_next = _query_sigmas(s, s_next)
            s_down, s_up = ancestral_step(s, s_mid, eta)
            x_mid = (s_down / s) * x - math.expm1(-math.log(s / s_down)) * denoised
            if noise_at is not None:
                x_mid = x_mid + (s_noise * s_up) * noise_at(q, q_mid)
            denoised_mid = x_mid - s_mid * model(x_mid, i, sigma=s_mid)
            s_down, s_up = ancestral_step(s, s_next, eta)
            x = (s_down / s) * x - math.expm1(-math.log(s / s_down)) * denoised_mid
            if noise_at is not None:
                x = x + (s_noise * s_up) * noise_at(q, q_next)
        x = yield x


def dpmpp_sde_nfe(steps: int) -> int:
    return 2 * steps - 1   # two calls per step, one on the last (Euler) step


# ---- DPM++ SDE's grids: DPMSolverSDEScheduler's, σ table in float32 -------------------------------------------

def _table32(cfg: ScheduleConfig) -> torch.Tensor:
    """σ_t = sqrt((1 − ᾱ)/ᾱ) computed in float32 as DPMSolverSDEScheduler does (then widened): its float32 σ
    levels differ from those of the float64 table by an ulp at many steps, and the Brownian tree sees that."""
    abar = alphas_cumprod(cfg).float()
    return ((1 - abar) / abar).sqrt().double()


def _linspace_sigmas(steps: int, cfg: ScheduleConfig) -> tuple[torch.Tensor, torch.Tensor]:
    # timestep_spacing="linspace": t = linspace(0, N−1, steps) reversed (float64), σ = np.interp on the table.
    table = _table32(cfg)
    t = np_linspace(cfg.num_train_steps - 1, steps).flip(0)
    lo = t.floor().long().clamp(max=len(table) - 2)
    w = t - lo
    sigmas = torch.where(w == 0, table[lo], (table[lo + 1] - table[lo]) * w + table[lo])
    return t, sigmas


def _sde_grid(sigmas: torch.Tensor, t: torch.Tensor) -> Grid:
    # diffusers stores the levels as float32 (and fractional t in float64): round the σ, keep t.
    sigmas = sigmas.float().double()
    return t, torch.cat([sigmas, sigmas.new_zeros(1)])


def dpmpp_sde_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    """DPMSolverSDEScheduler's own ("Uniform") grid: linspace timesteps, σ interpolated linearly in t."""
    t, sigmas = _linspace_sigmas(steps, cfg)
    return _sde_grid(sigmas, t)


def dpmpp_sde_karras_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    """use_karras_sigmas: Karras between the first and last σ of its linspace grid (so one step is σ(t=0)
    alone, diffusers' quirk, as for Euler), t by log-σ interpolation."""
    _t, linear = _linspace_sigmas(steps, cfg)
    sigmas = karras_sigmas(float(linear[-1]), float(linear[0]), steps)
    return _sde_grid(sigmas, timestep_at(sigmas, cfg))


def dpmpp_sde_exponential_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    """use_exponential_sigmas: evenly spaced in log σ between the same two levels."""
    _t, linear = _linspace_sigmas(steps, cfg)
    sigmas = np_linspace_between(math.log(float(linear[0])), math.log(float(linear[-1])), steps).exp()
    return _sde_grid(sigmas, timestep_at(sigmas, cfg))
