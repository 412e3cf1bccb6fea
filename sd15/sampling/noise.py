"""Noise sources: where every random draw of a generation comes from.

The pipeline builds one source per generation and hands it to the stages (initial latents, the VAE
posterior sample of img2img) and to the sampler (per-step noise). Seed policies are sources, not
parameters threaded through every signature: diffusers' one generator per call is `GeneratorNoise`; an
A1111-style generator per image, or a Brownian tree keyed on σ (DPM++ SDE), is another class with the
same two methods.

    noise.draw(shape)                 # a fresh standard-normal tensor, in draw order
    noise.step(x, sigma, sigma_next)  # per-step noise shaped like the state x, for the step σ -> σ_next

The pipeline also asks a source for `first(shape)` (the initial noise) and `posterior(shape)` (img2img's
VAE sample noise); A1111's per-image seeds are `seeds.A1111Noise`.
"""

from collections.abc import Callable
from typing import Protocol

import torch


class NoiseSource(Protocol):
    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal noise of `shape`, in the source's dtype, on the CPU or the generator's device."""
        ...

    def step(self, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        """Standard normal noise like `x` (its device and dtype) for a sampler step from sigma to sigma_next."""
        ...

    def sde_noise(self, x: torch.Tensor, sigma_min: float, sigma_max: float, *,
                  brownian: bool) -> Callable[[float, float], torch.Tensor]:
        """An SDE sampler's noise: a function (σ, σ_next) -> standard normal noise like `x`, for steps within
        [σ_min, σ_max], the whole schedule's positive σ range (`sde_samplers.schedule_range`). brownian: the
        sampler's diffusers scheduler draws from a Brownian tree (DPMSolverSDEScheduler), else a fresh draw
        per call (DPMSolverMultistepScheduler's SDE variants). A policy that always uses trees (A1111's:
        `brownian.brownian_noise(x, σ_min, σ_max, seeds)`) may ignore it. Samplers may call it with
        σ_next = 0 (the final step, to keep a per-step source's count) and multiply that noise by 0."""
        ...


class GeneratorNoise:
    """diffusers' seed semantics: one `torch.Generator` for the whole call, every draw from it in order.

    dtype is the models' dtype: diffusers draws in it, and CPU randn in fp16/bf16 is not float32 randn
    rounded (it differs whenever the count is not a multiple of 16), so the draws must be made in it even
    though the sampler state is float32.
    """

    def __init__(self, generator: torch.Generator, dtype: torch.dtype = torch.float32):
        self.generator, self.dtype = generator, dtype

    @classmethod
    def seeded(cls, seed: int, dtype: torch.dtype = torch.float32) -> "GeneratorNoise":
        return cls(torch.Generator().manual_seed(seed), dtype)

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.generator.device, dtype=self.dtype)

    first = draw        # the initial noise is the next draw (seeds.A1111Noise shapes its own)
    posterior = draw    # img2img's VAE posterior sample: drawn before the initial noise, as diffusers does

    def step(self, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        noise = self.draw(tuple(x.shape))
        if noise.device.type == "cpu" and x.device.type == "cuda":  # pinned: the copy need not stall the GPU queue
            return noise.pin_memory().to(x.device, x.dtype, non_blocking=True)
        return noise.to(x.device, x.dtype)

    def sde_noise(self, x: torch.Tensor, sigma_min: float, sigma_max: float, *,
                  brownian: bool) -> Callable[[float, float], torch.Tensor]:
        """diffusers' SDE noise. brownian: DPMSolverSDEScheduler's one tree over the whole batch, seeded with
        this generator's seed, as pipeline users pass `noise_sampler_seed=seed` (its default is a random
        seed); in the models' dtype, on x's device, as diffusers builds it from the latents. Otherwise
        DPMSolverMultistepScheduler's draw per step from the generator, float32 whatever the models' dtype."""
        if brownian:
            from .brownian import brownian_noise
            return brownian_noise(x, sigma_min, sigma_max, self.generator.initial_seed(), self.dtype)

        def per_step(sigma: float, sigma_next: float) -> torch.Tensor:
            noise = torch.randn(tuple(x.shape), generator=self.generator, device=self.generator.device,
                                dtype=torch.float32)
            return noise.to(x.device, x.dtype)
        return per_step
