"""Brownian-tree noise for SDE samplers: the noise of a step σ -> σ_next is the increment of one Brownian
motion W(σ), normalised, (W(σ_next) − W(σ)) / sqrt(|σ_next − σ|), so it depends on the σ interval only, not
on the step count or on the order of the queries (Kidger et al. 2021, "Efficient and accurate gradients for
neural SDEs": the Brownian interval).

    noise_at = brownian_noise(x, sigma_min, sigma_max, seed=1234)        # one tree over the whole batch
    noise_at = brownian_noise(x, sigma_min, sigma_max, seed=[1234, 1235]) # one tree per image (x[i])
    z = noise_at(sigma, sigma_next)                                        # standard normal, shaped like x

Both policies are k-diffusion's `BrownianTreeNoiseSampler`, bit for bit (diffusers' DPMSolverSDEScheduler
uses a copy of it): an int seed is one tree of x's shape (diffusers' `noise_sampler_seed`), a list is one tree
per image of shape x[i] (A1111 passes its per-image seeds, so an image's noise does not depend on its batch).
The trees are torchsde's `BrownianInterval` with k-diffusion's settings (tol 1e-6, pool_size 24, the dyadic
"halfway" tree), so torchsde is needed: it is an optional dependency, `pip install sd15[sde]`. Reproducing
its internals here would have to follow numpy's SeedSequence spawning, its LRU cache and its Brownian-bridge
arithmetic exactly; depending on the library that A1111 and diffusers both call is the exact and
maintainable choice.

Query times are rounded to float32 first, as both references hold σ in float32 tensors: the tree rounds
times to 1e-6, and a float64 σ one float32 ulp away can land on another 1e-6 point and a different sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

StepNoise = Callable[[float, float], torch.Tensor]   # (σ, σ_next) -> standard normal noise like the state


def _torchsde():
    try:
        import torchsde
    except ImportError as err:
        raise ImportError("this sampler draws Brownian-tree noise (DPM++ SDE, as in A1111 and diffusers), "
                          "which needs torchsde: pip install sd15[sde]  (or: pip install torchsde)") from err
    # The tree rounds its ends to 1e-6, so a query at σ_min (or σ_max) can fall a hair outside; torchsde then
    # clamps it to the end, as it does under both references, and warns each time. Nothing to act on: hide it.
    warnings.filterwarnings("ignore", message=r"Should have t[ab][<>]=t[01] but got", category=UserWarning,
                            module=r"torchsde\.")
    return torchsde


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


class BrownianTreeNoise:
    """(σ, σ_next) -> noise from Brownian trees over [σ_min, σ_max]; see `brownian_noise`."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed: int | Sequence[int],
                 dtype: torch.dtype | None = None):
        torchsde = _torchsde()
        low, high = sorted((float(_f32(sigma_min)), float(_f32(sigma_max))))
        self.batched = not isinstance(seed, int)
        seeds = list(seed) if self.batched else [seed]
        if self.batched and len(seeds) != x.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {x.shape[0]}: give one seed per image, or one int")
        self.shape = tuple(x.shape)
        self.dtype, self.device = dtype or x.dtype, x.device
        tree_shape = self.shape[1:] if self.batched else self.shape
        self.trees = [torchsde.BrownianInterval(t0=low, t1=high, size=tree_shape, dtype=self.dtype, device=self.device,
                                                entropy=int(s), tol=1e-6, pool_size=24, halfway_tree=True)
                      for s in seeds]

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        if sigma_next == 0:
            # The final denoising step: samplers that call here too (to keep a per-step source's draw
            # count, as diffusers draws there) multiply the result by σ_next = 0. No query: 0 is outside the tree.
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        a, b = _f32(sigma), _f32(sigma_next)
        lo, hi = (a, b) if a < b else (b, a)
        sign = 1.0 if a < b else -1.0   # W(σ_next) − W(σ): σ decreases along a sampling run
        w = torch.stack([tree(float(lo), float(hi)) for tree in self.trees]) * sign
        w = w if self.batched else w[0]
        return w / (b - a).abs().sqrt()   # float32 0-d, as the references divide


def brownian_noise(x: torch.Tensor, sigma_min: float, sigma_max: float, seed: int | Sequence[int],
                   dtype: torch.dtype | None = None) -> StepNoise:
    """Brownian-tree noise for steps within [σ_min, σ_max] (the whole schedule's positive range, so that a
    run over part of it draws what the whole run draws there). seed: an int for one tree over x's whole
    shape (diffusers), a list for one tree per image (A1111). dtype: the trees' dtype (the references use the
    latents' dtype, which is the model's in diffusers' pipelines); default x's. The noise is on x's device,
    drawn by that device's generator as torchsde does."""
    return BrownianTreeNoise(x, sigma_min, sigma_max, seed, dtype)
