"""Multistep samplers on the VP latent: PLMS (PNDM), UniPC and DEIS.

Each reuses the model outputs of earlier steps instead of calling the UNet more than once per step, and keeps
the state diffusers keeps: the VP latent x_t = α·x0 + σ_vp·ε, α = 1/sqrt(1+σ²), σ_vp = σ·α (σ the plan's level
in sigma space). Each matches its diffusers scheduler under the SD1.5 config, step for step:

  plms       PNDMScheduler(skip_prk_steps=True): diffusers' own SD1.5 default, A1111's "PLMS"
  unipc      UniPCMultistepScheduler(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"): the
             configuration of A1111's "UniPC" (its defaults: variant bh1, order 3, lower_order_final)
  unipc_bh2  UniPCMultistepScheduler() as from_config(SD1.5) builds it: bh2, order 2, ending at σ = 0
  deis       DEISMultistepScheduler(solver_order=3) (log-ρ; diffusers' default order is 2, ComfyUI's `deis` 3)

The schedule quirks of each scheduler (which σ the last step ends at, how fractional timesteps are rounded, when
the order is lowered) are reproduced, so every yielded latent equals the scheduler's `prev_sample`. The `order`
option of UniPC and DEIS is diffusers' solver_order.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from . import grids
from .grids import Grid
from .samplers import Steps, _abar
from .schedule import ScheduleConfig, dpm_timesteps, sigma_table
from .schedule_types import karras

if TYPE_CHECKING:
    from .denoiser import Denoiser
    from .noise import NoiseSource
    from .plan import Plan


# ---- grids ---------------------------------------------------------------------------------------------------

def sigma_min_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    """diffusers' "linspace" timesteps (those of DPM-Solver), ending at σ(t=0) rather than at 0: DEIS's own end
    and UniPC's final_sigmas_type="sigma_min", which is where A1111's UniPC ends too (continuous t = 1/1000)."""
    t = dpm_timesteps(steps, cfg)
    table = sigma_table(cfg)
    return t.double(), torch.cat([table[t], table[:1]])


def _last_level_repeated(grid: Grid) -> Grid:
    # DEISMultistepScheduler ends its σ schedules by repeating the last level (σ_min) instead of appending 0:
    # the last step then has h = 0 and returns its input unchanged (one UNet call for nothing, kept for parity).
    t, sigmas = grid
    return t, torch.cat([sigmas[:-1], sigmas[-2:-1]])


def deis_karras_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    return _last_level_repeated(grids.from_sigmas(karras(steps, cfg), cfg, round_timesteps=True))


def deis_exponential_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    return _last_level_repeated(grids.dpm_exponential_grid(steps, cfg))


# ---- PLMS ------------------------------------------------------------------------------------------------------

def _pndm_transfer(x: torch.Tensor, eps: torch.Tensor, s: float, s_next: float) -> torch.Tensor:
    """PNDM's transfer φ (Liu et al. 2022, eq. 9): x from ᾱ(σ) to ᾱ(σ_next) along ε. (The map of a DDIM step,
    written as the paper and diffusers write it.)"""
    a, a_next = _abar(s), _abar(s_next)
    eps_coeff = (a_next - a) / (a * math.sqrt(1 - a_next) + math.sqrt(a * (1 - a) * a_next))
    return math.sqrt(a_next / a) * x - eps_coeff * eps


# Adams–Bashforth weights on ε, newest first: PLMS uses the last 4 values, and 1 to 3 until it has 4.
_ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_plms(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource) -> Steps:
    """PLMS, the pseudo linear multistep method of Liu et al. 2022 (PNDM: the transfer φ of their eq. 9 driven by
    ε' = the fourth-order Adams–Bashforth combination of the last four ε), as CompVis' plms.py, A1111's "PLMS"
    and diffusers' PNDMScheduler(skip_prk_steps=True) run it, on the "leading" DDIM grid (t = 1 + k·(1000 // N)).

    Step 0 is the warm-up that replaces PNDM's Runge–Kutta start: a "pseudo improved Euler" (Heun) step that
    takes two UNet calls, ε at x and ε at φ(x, ε) one grid level down, then φ from x again with their mean.
    Every later step is one call. So N steps make N + 1 UNet calls (one step: one call, no warm-up). This is
    exactly diffusers, whose timesteps list has N + 1 entries (the second timestep twice) and whose first two
    `step` calls are this step 0: the state after its first call (the Euler predictor) is not yielded here, so
    the states yielded are the N after diffusers' calls 2..N+1. (The warm-up's second ε is not kept as
    history, in diffusers as in CompVis.)

    img2img runs PLMS on the kept steps, warm-up on the first of them, as CompVis and A1111 do; that is also
    diffusers' PNDM arithmetic driven over those timesteps. It is not what diffusers' img2img pipeline does:
    its get_timesteps slices the N + 1-entry list (order 1) by the step count, so it starts one grid level
    noisier than the kept steps and, after the warm-up, feeds the UNet (and the φ coefficients) the timestep
    one level below the state's (cutting a single step, it evaluates the repeated timestep on the Euler
    predictor and steps from the level above). That is no tail of one grid, and it skips a level: not reproduced
    (see the tests). Likewise diffusers' inpainting pipeline blends its Euler predictor too, which changes the
    warm-up's second ε; `after_step` sees the N yielded states only.
    """
    eps_past: list[torch.Tensor] = []       # ε at the earlier steps' grid points, newest first (at most 3)
    for i, _t, s, s_next in plan.steps():
        eps = model(x, i)
        if i == 0 and plan.num_steps > 1:   # warm-up: Heun's average of the slopes at both ends
            direction = (eps + model(_pndm_transfer(x, eps, s, s_next), 1)) / 2
        else:
            weights = _ADAMS_BASHFORTH[len(eps_past) + 1]
            direction = weights[0] * eps
            for w, past in zip(weights[1:], eps_past):
                direction = direction + w * past
        eps_past = [eps, *eps_past][:3]
        x = _pndm_transfer(x, direction, s, s_next)
        x = yield x


def plms_nfe(steps: int) -> int:
    return steps + 1 if steps > 1 else 1    # the warm-up's extra call


# ---- shared by UniPC and DEIS --------------------------------------------------------------------------------

def _order(order: float, sampler: str) -> int:
    if order != int(order) or not 1 <= order <= 3:
        raise ValueError(f"{sampler} order must be 1, 2 or 3, got {order:g}")
    return int(order)


def _vp(sigma: float) -> tuple[float, float]:
    """(α, σ_vp) of the VP latent at level σ."""
    alpha = 1 / math.sqrt(1 + sigma * sigma)
    return alpha, sigma * alpha


# ---- UniPC -----------------------------------------------------------------------------------------------------

def _unipc_coefficients(lambdas: list[float], order: int, bh2: bool) -> tuple[float, float, list[float],
                                                                              list[float], list[float]]:
    """The coefficients of one UniPC interval in λ = −log σ on the data prediction (Zhao et al. 2023, UniP-p and
    UniC-p with B(h) = h ("bh1") or e^h − 1 ("bh2"), in −h as diffusers' predict_x0 form writes them).

    lambdas: λ at the interval's end, then at its start and at the `order` − 1 grid points before it.
    Returns (h·φ_1, B(h), r_k for the history, the predictor's weights on D_k, the corrector's weights on D_k and
    on D_t = m_t − m_0 last). The update is x_t = (σ_vp,t/σ_vp,s)·x − α_t·(h·φ_1·m_0 + B(h)·Σ w_k·D_k) with
    D_k = (m_k − m_0)/r_k.
    """
    lam_t, lam_s, past = lambdas[0], lambdas[1], lambdas[2:]
    h = lam_t - lam_s
    hh = -h                                     # the data-prediction form integrates e^{−λ}
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh) if bh2 else hh
    rks = [(lam_k - lam_s) / h for lam_k in past]
    # b_k = k!·g_k / B(h), g_1 = φ_1(hh) − 1, g_{k+1} = g_k/hh − 1/(k+1)!: the order conditions' right-hand side
    b, g, factorial = [], h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        b.append(g * factorial / b_h)
        factorial *= k + 1
        g = g / hh - 1 / factorial
    if order == 1:
        predictor = []
    elif order == 2:
        predictor = [0.5]                        # diffusers' (and UniPC's) simplified order-2 predictor
    else:
        predictor = _solve([[r ** k for r in rks] for k in range(order - 1)], b[:order - 1])
    nodes = rks + [1.0]
    corrector = [0.5] if order == 1 else _solve([[r ** k for r in nodes] for k in range(order)], b)
    return h_phi_1, b_h, rks, predictor, corrector


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    a, b = torch.tensor(matrix, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)
    return torch.linalg.solve(a, b).tolist()


def sample_unipc(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource, *, order: float = 3.0,
                 variant: str = "bh1") -> Steps:
    """UniPC, Zhao et al. 2023: the multistep predictor UniP-p and corrector UniC-p on the data prediction
    m = x0(x, ε), in λ = −log σ, with B(h) = h ("bh1") or e^h − 1 ("bh2"); diffusers' UniPCMultistepScheduler
    (predict_x0, lower_order_final, no disabled corrector).

    At each step the UNet is called once, at the predicted x. Its output first corrects that x (UniC, with the
    order of the predictor that produced it), then enters the history and drives the next prediction (UniP). The
    corrector thus costs no extra call, and the last prediction stays uncorrected. The order ramps up 1, 2, ...
    over the first steps and down again over the last (lower_order_final): the last step is first order, and
    ending at σ = 0 it returns the data prediction (the update's limit; diffusers computes the same for bh2 and
    NaN for bh1, whose row ends at σ_min as A1111 does). The yielded states are the predictions, as diffusers'
    `prev_sample`; a state replaced between steps (inpainting) is what the UNet and the corrector then see.

    A1111's UniPC (variant bh1, order 3, lower_order_final, skip type time_uniform) differs from this bh1 row
    only in its discretisation: its timesteps are linspace(999, 0, N + 1) unrounded (fractional t fed to the
    UNet, λ from log α interpolated between table entries); diffusers (and this) round them to integers.
    """
    max_order = _order(order, "UniPC")
    bh2 = variant == "bh2"
    sigmas = plan.sigmas.tolist()
    lambdas = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    history: list[torch.Tensor] = []      # data predictions at the grid points so far, newest first
    pending = None                        # the last prediction: (its start state, its coefficients), to correct
    for i, _t, s, s_next in plan.steps():
        alpha, sigma_vp = _vp(s)
        m = (x - sigma_vp * model(x, i)) / alpha
        if pending is not None:           # UniC: redo the last interval with the new output as one more node
            x_start, (h_phi_1, b_h, rks, _, corrector) = pending
            x = sigma_vp / _vp(sigmas[i - 1])[1] * x_start - alpha * (h_phi_1 * history[0] + b_h * (
                _weighted(corrector[:-1], rks, history) + corrector[-1] * (m - history[0])))
        history = [m, *history][:max_order]
        p = min(max_order, i + 1, plan.num_steps - i)   # warm-up, and lower_order_final
        if s_next == 0:     # λ_next = ∞: α_next = 1, σ_vp,next = 0, h·φ_1 = −1 (p is 1 on the last step)
            pending, x = None, history[0]
        else:
            alpha_next, sigma_vp_next = _vp(s_next)
            coefficients = _unipc_coefficients([lambdas[i + 1]] + _back(lambdas, i, p), p, bh2)
            h_phi_1, b_h, rks, predictor, _ = coefficients
            pending = (x, coefficients)
            x = sigma_vp_next / sigma_vp * x - alpha_next * (h_phi_1 * history[0]
                                                              + b_h * _weighted(predictor, rks, history))
        x = yield x


def _back(values: list[float], start: int, count: int) -> list[float]:
    """values[start], values[start − 1], ...: `count` of them, newest first."""
    return [values[start - k] for k in range(count)]


def _weighted(weights: list[float], rks: list[float], history: list[torch.Tensor]):
    """Σ_k w_k·D_k, D_k = (m_k − m_0)/r_k over the history after its newest entry m_0 (0 for no weights)."""
    total = 0.0
    for w, r, m_k in zip(weights, rks, history[1:]):
        total = total + (w / r) * (m_k - history[0])
    return total


def sample_unipc_bh2(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource, *,
                     order: float = 2.0) -> Steps:
    """UniPC with B(h) = e^h − 1, diffusers' default (bh2, order 2, σ = 0 at the end); see `sample_unipc`."""
    return sample_unipc(model, x, plan, noise, order=order, variant="bh2")


# ---- DEIS ------------------------------------------------------------------------------------------------------

def _deis_coefficients(log_rhos: list[float], rho: float, rho_next: float) -> list[float]:
    """∫ ℓ_j(log ρ) dρ from ρ to ρ_next for the Lagrange basis ℓ_j in u = log ρ through the nodes `log_rhos`.

    ℓ_j is expanded as Σ c_k u^k; ∫ u^k dρ = ρ·Σ_{i≤k} (−1)^(k−i)·k!/i!·u^i (ρ = e^u), evaluated at both ends.
    """
    def antiderivative(poly: list[float], r: float) -> float:
        u = math.log(r)
        total = 0.0
        for k, c in enumerate(poly):
            total += c * sum((-1) ** (k - i) * math.factorial(k) // math.factorial(i) * u ** i
                             for i in range(k + 1))
        return r * total

    out = []
    for j, u_j in enumerate(log_rhos):
        poly = [1.0]                        # coefficients of ℓ_j, lowest power first
        for m, u_m in enumerate(log_rhos):
            if m != j:                      # multiply by (u − u_m)/(u_j − u_m)
                scale = 1 / (u_j - u_m)
                poly = [scale * (a - u_m * b) for a, b in zip([0.0, *poly], [*poly, 0.0])]
        out.append(antiderivative(poly, rho_next) - antiderivative(poly, rho))
    return out


def sample_deis(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource, *, order: float = 3.0) -> Steps:
    """DEIS, Zhang & Chen 2023: the exponential integrator of the probability-flow ODE in ρ = σ_vp/α (= σ),
    x_next/α_next = x/α + ∫ ε dρ, with ε extrapolated by the Lagrange polynomial in log ρ through the last
    `order` model outputs (diffusers' DEISMultistepScheduler, algorithm "deis", solver "logrho"). First order it
    is DDIM.

    The order ramps up over the first steps; diffusers lowers it over the last two (third order → second →
    first) only when the whole schedule has fewer than 15 steps, so an img2img tail is judged by its schedule,
    not by the steps it runs. diffusers' DEIS ends at σ(t=0) on its own grid and repeats the last σ level under
    the Karras and exponential schedules (their last step changes nothing); both are kept here.
    """
    max_order = _order(order, "DEIS")
    lower_final = _short_schedule(plan, 15)
    sigmas = plan.sigmas.tolist()
    eps_past: list[torch.Tensor] = []      # newest first
    for i, _t, s, s_next in plan.steps():
        eps_past = [model(x, i), *eps_past][:max_order]
        p = min(max_order, i + 1)
        if lower_final:
            p = min(p, plan.num_steps - i)
        coefficients = _deis_coefficients([math.log(r) for r in _back(sigmas, i, p)], s, s_next)
        alpha, _ = _vp(s)
        alpha_next, _ = _vp(s_next)
        update = x / alpha
        for c, eps in zip(coefficients, eps_past):
            update = update + c * eps
        x = alpha_next * update
        x = yield x


def _short_schedule(plan: Plan, limit: int) -> bool:
    """Whether the whole schedule `plan` runs the tail of has fewer than `limit` steps."""
    return (plan.schedule_steps or plan.num_steps) < limit
