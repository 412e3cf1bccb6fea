"""The one place where the ε-model meets σ: what every sampler calls, and what every model wrapper sees.

Two views of a noisy latent (see `schedule`): x_σ = x0 + σ·ε, and the variance-preserving latent
x_t = x_σ / sqrt(σ²+1), which is what the UNet takes as input ("c_in" in Karras et al. 2022). Samplers keep
their state in whichever view their paper and diffusers use; the `Denoiser` takes the state in that view,
does the input scaling and the σ -> t lookup, and calls

    model(x_in, call) -> ε          x_in = x_σ / sqrt(σ²+1), call = ModelCall(σ, t, step, steps)

Everything that wraps the UNet has that one signature and so works with every sampler: classifier-free
guidance, an inpainting UNet's extra input channels, latent blending for masks (through `predicted_x0`),
x0 previews, ControlNet or guidance schedules keyed on `call.progress`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .schedule import timestep_at

if TYPE_CHECKING:
    from .plan import Plan


@dataclass(frozen=True)
class ModelCall:
    """Where in the schedule a model evaluation happens."""
    sigma: float     # noise level of the input: x_σ = x0 + σ·ε
    t: float         # the UNet's timestep for that σ (fractional under some schedules, as diffusers feeds it)
    step: int        # 0-based index of the sampler step this evaluation belongs to
    steps: int       # sampler steps in this run

    @property
    def progress(self) -> float:
        """Fraction of this run's steps already done when the evaluation happens (0 at the first)."""
        return self.step / self.steps


EpsModel = Callable[[torch.Tensor, ModelCall], torch.Tensor]


def predicted_x0(x_in: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
    """The clean latent the model's ε implies: x0 = x_σ − σ·ε with x_σ = x_in·sqrt(σ²+1)."""
    return x_in * math.sqrt(sigma * sigma + 1) - sigma * eps


class Denoiser:
    """`model` seen by the samplers of one `plan`: `denoiser(x, step)` -> ε for the state x at that step.

    (It returns ε, which every sampler here is written in; Karras' D(x;σ), the x0 prediction, is
    `predicted_x0` of it.)

    x is in the sampler's own view (`plan.sampler.vp`: the VP latent, else x_σ). At the plan's own grid
    points the timestep is the plan's (diffusers' rounding included); a sampler that evaluates between
    them (Heun, DPM2) passes `sigma=` and gets t from the schedule's σ -> t interpolation.
    """

    def __init__(self, model: EpsModel, plan: Plan):
        self.model, self.plan = model, plan
        self._timesteps, self._sigmas = plan.timesteps.tolist(), plan.sigmas.tolist()

    def __call__(self, x: torch.Tensor, step: int, sigma: float | None = None) -> torch.Tensor:
        if sigma is None:
            sigma, t = self._sigmas[step], self._timesteps[step]
        else:
            t = float(timestep_at(torch.tensor(sigma, dtype=torch.float64), self.plan.schedule))
        x_in = x if self.plan.sampler.vp else x / math.sqrt(sigma * sigma + 1)
        return self.model(x_in, ModelCall(sigma=sigma, t=t, step=step, steps=self.plan.num_steps))
