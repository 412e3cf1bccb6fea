"""Noise sources: where every random draw of a generation comes from.

The pipeline builds one source per generation and hands it to the stages (initial latents, the VAE
posterior sample of img2img) and to the sampler (per-step noise). Seed policies are sources, not
parameters threaded through every signature: diffusers' one generator per call is `GeneratorNoise`; an
A1111-style generator per image, or a Brownian tree keyed on σ (DPM++ SDE), is another class with the
same two methods.

    noise.draw(shape)                 # a fresh standard-normal tensor, in draw order
    noise.step(x, sigma, sigma_next)  # per-step noise shaped like the state x, for the step σ -> σ_next
"""

from typing import Protocol

import torch


class NoiseSource(Protocol):
    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal noise of `shape`, in the source's dtype, on the CPU or the generator's device."""
        ...

    def step(self, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        """Standard normal noise like `x` (its device and dtype) for a sampler step from sigma to sigma_next."""
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

    def step(self, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        noise = self.draw(tuple(x.shape))
        if noise.device.type == "cpu" and x.device.type == "cuda":  # pinned: the copy need not stall the GPU queue
            return noise.pin_memory().to(x.device, x.dtype, non_blocking=True)
        return noise.to(x.device, x.dtype)
