"""Consistency samplers: LCM and TCD, for consistency-distilled SD1.5 models (LCM-LoRA, TCD-LoRA, Hyper-SD's
unified LoRA, LCM-distilled checkpoints).

Both walk the timesteps of the distillation schedule rather than a σ schedule of their own:
  the 50 "skipping-step" timesteps 999, 979, ..., 19 (Luo et al. 2023, §4.2: k = N / 50 = 20), of which
  `steps` are picked at evenly spaced indices (floor(i·50/steps)): 4 steps run t = 999, 759, 499, 259.
That is diffusers' LCMScheduler / TCDScheduler `set_timesteps` with original_inference_steps=50 under the
SD1.5 config. A1111's "LCM" spaces its steps linearly in t down to t = 19 instead (4 steps: 999, 679,
339, 19); the samplers here follow diffusers, which LCM-LoRA's model card and scripts use.

The state is the VP latent (`SamplerSpec.vp`), as in diffusers. img2img keeps the last int(steps·strength)
steps of that schedule, as diffusers' StableDiffusionImg2ImgPipeline does with these schedulers (the
route for LoRAs on an SD1.5 checkpoint).

Also here, for LCM-distilled UNets (a guidance embedding instead of classifier-free guidance):
`embedded_guidance`, the model wrapper diffusers' LatentConsistencyModelPipeline amounts to.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .grids import Grid
from .samplers import Steps, _abar
from .schedule import ScheduleConfig, alphas_cumprod, sigma_table

if TYPE_CHECKING:
    from .denoiser import Denoiser, EpsModel, ModelCall
    from .noise import NoiseSource
    from .plan import Plan

ORIGINAL_STEPS = 50        # the distillation schedule's length (diffusers' original_inference_steps)
TIMESTEP_SCALING = 10.0    # LCM's boundary condition is evaluated at 10·t (diffusers' timestep_scaling)
SIGMA_DATA = 0.5


def consistency_timesteps(steps: int, cfg: ScheduleConfig) -> torch.Tensor:
    """`steps` of the 50 distillation timesteps (k·j − 1, j = 50..1, k = N // 50), at indices
    floor(i·(50/steps)): numpy's linspace(0, 50, steps, endpoint=False) then floor, bit for bit. int64."""
    if steps > ORIGINAL_STEPS:
        raise ValueError(f"LCM and TCD take at most {ORIGINAL_STEPS} steps (they pick steps among the "
                         f"{ORIGINAL_STEPS} timesteps they were distilled on), got {steps}")
    k = cfg.num_train_steps // ORIGINAL_STEPS
    origin = torch.arange(ORIGINAL_STEPS, 0, -1, dtype=torch.int64) * k - 1          # 999, 979, ..., 19
    index = (torch.arange(steps, dtype=torch.float64) * (ORIGINAL_STEPS / steps)).floor().long()
    return origin[index]


def lcm_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    # The last step returns the boundary-conditioned x0 prediction: σ = 0 after it.
    t = consistency_timesteps(steps, cfg)
    return t.double(), torch.cat([sigma_table(cfg)[t], torch.zeros(1, dtype=torch.float64)])


def tcd_grid(steps: int, cfg: ScheduleConfig) -> Grid:
    # TCD's last step goes back along the trajectory to t = 0, not to the clean sample: σ_0 after it.
    t = consistency_timesteps(steps, cfg)
    table = sigma_table(cfg)
    return t.double(), torch.cat([table[t], table[:1]])


def boundary_scalings(t: float) -> tuple[float, float]:
    """LCM's c_skip(t), c_out(t) (Song et al. 2023, consistency models, eq. 8 form, σ_data = 0.5) at the
    scaled timestep 10·t: c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/sqrt((10t)² + σ_d²). They make the
    consistency function the identity at t = 0; from t ≈ 139 on, c_skip < 1e-6 (denoised ≈ x0)."""
    scaled = TIMESTEP_SCALING * t
    return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / math.sqrt(scaled**2 + SIGMA_DATA**2)


def sample_lcm(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource) -> Steps:
    """Multistep latent consistency sampling, Luo et al. 2023 alg. 3 (diffusers' LCMScheduler).

    Each step maps x_t to the trajectory's origin with the consistency function f(x, t) = c_skip·x +
    c_out·x0(x, t), then, unless it is the last step, noises that estimate afresh to the next timestep.
    """
    for i, t, s, s_next in plan.steps():
        a = _abar(s)
        eps = model(x, i)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        c_skip, c_out = boundary_scalings(t)
        denoised = c_out * x0 + c_skip * x
        if s_next > 0:     # a fresh draw per step (the "multistep" of alg. 3): stochastic by design
            a_next = _abar(s_next)
            x = math.sqrt(a_next) * denoised + math.sqrt(1 - a_next) * noise.step(x, s, s_next)
        else:
            x = denoised
        x = yield x


def tcd_timestep(eta: float, t_next: int) -> int:
    """TCD's intermediate timestep s = floor((1 − γ)·t_next), computed as diffusers does it: a float32
    product (γ = 0.3 and t_next = 759 give 531). Different rounding would move s by one at some γ."""
    return int(torch.floor((1 - eta) * torch.tensor(t_next)))


def sample_tcd(model: Denoiser, x: torch.Tensor, plan: Plan, noise: NoiseSource, *, eta: float = 0.3) -> Steps:
    """Strategic stochastic sampling of Trajectory Consistency Distillation (Zheng et al. 2024, alg. 4,
    γ = eta; diffusers' TCDScheduler).

    Each step predicts x0 and ε at t, goes back along the trajectory (the DDIM update) to the earlier point
    s = floor((1 − γ)·t_next), then forward with fresh noise from s to t_next. γ = 0 stops at t_next: DDIM,
    deterministic; γ = 1 goes all the way to s = 0 and re-noises fully, as LCM does. The last step lands on
    t = 0 (s = floor((1 − γ)·0)) with no noise.
    """
    abar = alphas_cumprod(plan.schedule)
    timesteps = [int(t) for t in plan.timesteps.tolist()]
    for i, _t, s, s_next in plan.steps():
        last = i == plan.num_steps - 1
        t_s = tcd_timestep(eta, 0 if last else timesteps[i + 1])
        a, a_s = _abar(s), float(abar[t_s])
        eps = model(x, i)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps          # the predicted noised sample at s
        if eta > 0 and not last:      # forward process s -> t_next: q(x_next | x_s)
            ratio = _abar(s_next) / a_s
            x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * noise.step(x, s, s_next)
        x = yield x


# ---- LCM-distilled UNets: guidance as an input of the UNet, no classifier-free guidance pass ----------

def embedded_guidance(unet, cond: torch.Tensor, scale: float) -> EpsModel:
    """The model of an LCM-distilled UNet (one with a guidance embedding, `UNetConfig.time_cond_proj_dim`):
    one conditional pass per step, the guidance scale w fed in as the sinusoidal embedding of w − 1
    (`models.unet.guidance_embedding`), as diffusers' LatentConsistencyModelPipeline does (it writes the
    scale in the Imagen/CFG convention, hence the −1; LCM's README uses w = 8). No negative prompt.

    `unet(x, t, context, timestep_cond=...)` is our UNet's signature; `cond` the text states [B, N, 768].
    """
    from ..models.unet import batch_timesteps, guidance_embedding
    dim = unet.cfg.time_cond_proj_dim
    w = guidance_embedding(torch.full((len(cond),), scale - 1.0), dim)

    def model(x: torch.Tensor, call: ModelCall) -> torch.Tensor:
        t = batch_timesteps(call.t, len(x), x.device)
        return unet(x.to(cond.dtype), t, cond, timestep_cond=w.to(x.device, cond.dtype)).to(x.dtype, copy=True)
    return model
