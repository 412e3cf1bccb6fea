"""A1111's seed semantics as a noise source: one generator per image, variation seeds, seed resize, ENSD.

    noise = A1111Noise([seed + i for i in range(4)])      # image i is what seed + i gives alone
    x = noise.first((4, 4, 64, 64))                       # initial noise (variation seed and resize applied)
    noise.step(x, sigma, sigma_next)                      # per-step noise: each image's generator, continued

What A1111 does (modules/rng.py, ImageRNG): image i of a batch has its own CPU-side generator seeded with its
seed; its initial noise is that generator's first randn of [4, h, w] and every later draw of the sampler
(ancestral noise) continues from the same generator. So image i of a batch equals a batch of one with seed
seed + i, which is what A1111 users expect and what diffusers' one generator per call does not give.

  variation seed   the initial noise is slerp(strength, noise(seed), noise(subseed)); A1111's slerp normalises
                   along dim 1 of the [4, h, w] draw (each channel's columns are the vectors) and, when the two
                   draws are nearly parallel, falls back to low·strength + high·(1 − strength): both kept.
  seed resize      the seed's noise is drawn at the "resize from" size from a fresh generator and pasted,
                   centred, into the full-size draw of the image's generator, so a small change of size keeps
                   the composition.
  ENSD             eta noise seed delta: after the initial noise, every generator is re-seeded with
                   seed + delta, so the ancestral noise differs from the initial noise's stream.

A1111 draws on the GPU by default (its "RNG: GPU" setting); these draws are its "RNG: CPU" ones, which are
the same on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _randn(seed: int, shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation of two [4, h, w] draws (vectors along dim 1)."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:       # A1111's near-parallel fallback, weights as it writes them
        return low * strength + high * (1 - strength)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - strength) * omega) / so).unsqueeze(1) * low + \
        (torch.sin(strength * omega) / so).unsqueeze(1) * high


def paste_centred(full: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """`small` [c, h', w'] centred on `full` [c, h, w] (cropped where it is larger), as A1111's seed resize."""
    dx = (full.shape[2] - small.shape[2]) // 2
    dy = (full.shape[1] - small.shape[1]) // 2
    w = small.shape[2] if dx >= 0 else small.shape[2] + 2 * dx
    h = small.shape[1] if dy >= 0 else small.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    out = full.clone()
    out[:, ty:ty + h, tx:tx + w] = small[:, sy:sy + h, sx:sx + w]
    return out


class A1111Noise:
    """A noise source with A1111's per-image generators (see the module docstring). Draws are float32, on
    the CPU; callers move them to the device."""

    def __init__(self, seeds: Sequence[int], *, subseeds: Sequence[int] = (), subseed_strength: float = 0.0,
                 resize_from: tuple[int, int] | None = None, seed_delta: int = 0, downscale: int = 8):
        self.seeds = [int(s) for s in seeds]
        self.subseeds = [int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.resize_from = resize_from          # (width, height) in pixels
        self.seed_delta, self.downscale = int(seed_delta), downscale
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def _check(self, shape: Sequence[int]) -> None:
        if shape[0] != len(self.seeds):
            raise ValueError(f"a1111 noise for {len(self.seeds)} images asked for a batch of {shape[0]}")

    def first(self, shape: Sequence[int]) -> torch.Tensor:
        """The initial noise [images, c, h, w]; afterwards the ENSD re-seed, if any."""
        self._check(shape)
        image_shape = tuple(shape[1:])
        small = image_shape
        if self.resize_from is not None:
            w, h = self.resize_from
            small = (image_shape[0], h // self.downscale, w // self.downscale)
        images = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            sub = None
            if self.subseed_strength != 0:
                sub = _randn(self.subseeds[i] if i < len(self.subseeds) else 0, small)
            noise = _randn(seed, small, None if small != image_shape else generator)
            if sub is not None:
                noise = slerp(self.subseed_strength, noise, sub)
            if small != image_shape:
                noise = paste_centred(_randn(seed, image_shape, generator), noise)
            images.append(noise)
        if self.seed_delta:
            self.generators = [torch.Generator().manual_seed(s + self.seed_delta) for s in self.seeds]
        return torch.stack(images)

    def draw(self, shape: Sequence[int]) -> torch.Tensor:
        """The next draw of every image's generator, stacked."""
        self._check(shape)
        return torch.stack([_randn(0, shape[1:], g) for g in self.generators])

    def posterior(self, shape: Sequence[int]) -> torch.Tensor:
        """The VAE posterior's noise for img2img: none. A1111 samples it from torch's global, unseeded RNG,
        which no seed reproduces; the posterior's mean is the reproducible choice, and leaves each image's
        generator to its initial noise and sampler steps as in A1111."""
        return torch.zeros(tuple(shape))

    def step(self, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        return self.draw(tuple(x.shape)).to(x.device, x.dtype)

    def sde_noise(self, x: torch.Tensor, sigma_min: float, sigma_max: float, *, brownian: bool):
        """A1111 gives every SDE sampler Brownian noise (its `brownian_noise` samplers, DPM++ 2M SDE included):
        one tree per image, seeded with the image's seed, over the whole schedule's σ range."""
        from .brownian import brownian_noise
        return brownian_noise(x, sigma_min, sigma_max, list(self.seeds), torch.float32)
