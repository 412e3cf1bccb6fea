"""A sampling plan (the part of one sampler's schedule that will run) and the entry points that walk it.

    plan = make_plan(resolve_sampler("DPM++ 2M Karras"), steps=25)                 # txt2img
    plan = make_plan(resolve_sampler("ddim"), steps=25, strength=0.75, options={"eta": 0.5})   # img2img
    for x in sample(plan, model, noise, x0=None, source=GeneratorNoise.seeded(42)): ...  # or denoise(...)

`model(x_in, call) -> ε` is the (guided) UNet seen through `sampling.denoiser`. The range checks of
steps, strength and sampler options live here and nowhere else; the request type calls them.
"""

from __future__ import annotations

import collections
import math
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .schedule import ScheduleConfig

if TYPE_CHECKING:
    from .denoiser import EpsModel
    from .noise import NoiseSource
    from .registry import SamplerSpec


@dataclass(frozen=True, eq=False)
class Plan:
    """The last int(steps·strength) steps of one sampler's schedule, with the sampler's options."""
    sampler: SamplerSpec
    timesteps: torch.Tensor     # [k] float64: the UNet's t at each step to run
    sigmas: torch.Tensor        # [k+1] float64: σ before each step, then σ after the last one
    init_sigma: float           # txt2img start x = noise·init_sigma (diffusers' init_noise_sigma)
    strength: float
    options: Mapping[str, float]   # every option of the sampler, defaults filled in (read-only)
    schedule: ScheduleConfig
    schedule_steps: int = 0        # length of the whole schedule the plan is the tail of (0: the plan's own)
    schedule_sigma_max: float = 0.0   # its first σ: SDE samplers root their Brownian trees there (0: the plan's)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def steps(self) -> Iterator[tuple[int, float, float, float]]:
        """(step index, t, σ, σ_next) for each step, as python floats."""
        return zip(range(self.num_steps), self.timesteps.tolist(), self.sigmas[:-1].tolist(),
                   self.sigmas[1:].tolist())


def kept_steps(steps: int, strength: float, num_train_steps: int = ScheduleConfig().num_train_steps) -> int:
    """How many of `steps` an img2img of `strength` runs: int(steps·strength), as diffusers' get_timesteps.

    The one check of steps and strength: a clear error for anything that cannot run.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps must be an integer from 1 to {num_train_steps}, got {steps!r}")
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1] (the fraction of the schedule to re-run), got {strength!r}")
    kept = min(int(steps * strength), steps)
    if kept == 0:
        raise ValueError(f"strength {strength} of {steps} steps leaves no step to run; "
                         f"raise strength to at least {1 / steps:.3g} or use more steps")
    return kept


def make_plan(sampler: SamplerSpec, steps: int, strength: float = 1.0, options: Mapping[str, float] | None = None,
              schedule: ScheduleConfig = ScheduleConfig(), *, run: int | None = None) -> Plan:
    """The schedule of `steps` steps, of which the last int(steps·strength) run (img2img keeps a tail,
    exactly as diffusers' StableDiffusionImg2ImgPipeline.get_timesteps does), or the last `run` of them
    (A1111's hires pass: exactly that many, `hires_schedule`)."""
    if run is not None:
        kept_steps(steps, 1.0, schedule.num_train_steps)
        if not isinstance(run, int) or isinstance(run, bool) or not 1 <= run <= steps:
            raise ValueError(f"cannot run the last {run!r} steps of a {steps}-step schedule")
        strength = run / steps
    kept = run if run is not None else kept_steps(steps, strength, schedule.num_train_steps)
    checked = sampler.check_options(options or {})
    timesteps, sigmas = sampler.make_grid(steps, schedule)
    init_sigma = 1.0 if sampler.vp else float(sigmas.max())
    start = steps - kept
    return Plan(sampler, timesteps[start:], sigmas[start:], init_sigma, strength,
                types.MappingProxyType(checked), schedule, steps, float(sigmas.max()))


def hires_schedule(steps: int, strength: float) -> int:
    """The schedule length whose last `steps` steps A1111's hires pass runs at denoising `strength`:
    int(steps / min(strength, 0.999)) (its "fix steps" img2img arithmetic: exactly `steps` run)."""
    kept_steps(steps, 1.0)
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 < strength <= 1:
        raise ValueError(f"denoising strength must be in (0, 1], got {strength!r}")
    total = int(steps / min(strength, 0.999))
    if total > ScheduleConfig().num_train_steps:
        raise ValueError(f"{steps} hires steps at denoising strength {strength} need a {total}-step schedule, more "
                         f"than the {ScheduleConfig().num_train_steps} training timesteps; use fewer steps or a "
                         "higher strength")
    return total


def noised(plan: Plan, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Clean latents x0 noised to σ, in the plan's sampler's view (diffusers' `add_noise`)."""
    x = x0 + sigma * noise  # x_σ = x0 + σ·ε
    return x / math.sqrt(sigma * sigma + 1) if plan.sampler.vp else x  # VP: sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε


def start_latents(plan: Plan, noise: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
    """txt2img: noise·init_sigma. img2img: x0 noised to the first kept step."""
    if x0 is None:
        if plan.strength < 1:
            raise ValueError(f"strength {plan.strength} needs an init image (x0); txt2img uses strength 1")
        return noise * plan.init_sigma
    return noised(plan, x0, noise, float(plan.sigmas[0]))


class NoNoise:
    """The source of deterministic runs: a sampler that asks it for noise is told what is missing."""

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        raise ValueError("this run draws noise: pass a noise source (e.g. GeneratorNoise.seeded(seed))")

    def step(self, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        return self.draw(tuple(x.shape))

    def sde_noise(self, x: torch.Tensor, sigma_min: float, sigma_max: float, *, brownian: bool):
        raise ValueError("this run draws SDE noise: pass a noise source (e.g. GeneratorNoise.seeded(seed))")


def sample(plan: Plan, model: EpsModel, initial_noise: torch.Tensor, x0: torch.Tensor | None = None, *,
           source: NoiseSource | None = None,
           after_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """Iterate the latents after each step; the last one is the result.

    initial_noise: (B,C,h,w) on the device of x0 / the model. x0: clean latents (already ×0.18215) for
    img2img, None for txt2img. The sampler runs in the dtype of the noise (and x0).
    source: where per-step noise comes from (ancestral samplers, DDIM with eta > 0).
    after_step(x, step): may replace the state after each step, before the sampler goes on from it
    (and before it is yielded here); x is in the sampler's view (see `noised`).
    """
    from .denoiser import Denoiser
    steps = plan.sampler.fn(Denoiser(model, plan), start_latents(plan, initial_noise, x0), plan,
                            source or NoNoise(), **plan.options)
    return _drive(steps, plan.num_steps, after_step)


def _drive(steps, count: int, after_step) -> Iterator[torch.Tensor]:
    """Run a sampler generator: each state (replaced by after_step if given) is yielded and sent back."""
    x = next(steps)
    for i in range(count):
        if after_step is not None:
            x = after_step(x, i)
        yield x
        try:
            x = steps.send(x)
        except StopIteration:
            return


def denoise(plan: Plan, model: EpsModel, initial_noise: torch.Tensor, x0: torch.Tensor | None = None, *,
            source: NoiseSource | None = None) -> torch.Tensor:
    """Run `sample` to the end and return the final latents."""
    return collections.deque(sample(plan, model, initial_noise, x0, source=source), maxlen=1)[0]
