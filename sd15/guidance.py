"""Classifier-free guidance as an eps_model wrapper (Ho & Salimans 2022).

    eps_model = cfg_eps_model(unet, cond, uncond, scale=7.5)
    eps = eps_model(x, t)   # ε = ε_uncond + s·(ε_cond − ε_uncond), one UNet call on [uncond; cond]

`unet(x, t, context) -> ε` is the engine's UNet signature; `cond` / `uncond` are text-encoder
outputs [B, 77, 768] with the batch of x (the unconditional prompt is the negative prompt, "" if none).
"""
from typing import Callable

import torch

from .samplers import EpsModel


def cfg_eps_model(unet: Callable, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> EpsModel:
    """eps_model(x, t) with guidance scale `scale`; scale == 1 is the conditional model alone (one pass).

    Below 1 the formula still applies (0 = unconditional). diffusers instead skips guidance for any
    scale <= 1, so scales in (0, 1) give different images there.
    """
    if scale == 1:
        def conditional(x: torch.Tensor, t) -> torch.Tensor:
            return unet(x, batch_timesteps(t, len(x), x.device), cond)
        return conditional

    context = torch.cat([uncond, cond])  # diffusers' order: unconditional half first

    def guided(x: torch.Tensor, t) -> torch.Tensor:
        both = torch.cat([x, x])
        eps_uncond, eps_cond = unet(both, batch_timesteps(t, len(both), x.device), context).chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)
    return guided


def batch_timesteps(t, batch: int, device: torch.device) -> torch.Tensor:
    """t as a python float, 0-d or [b] tensor -> float32 tensor [batch] on `device` ([b] is tiled)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    return t.expand(batch) if t.ndim == 0 else t.repeat(batch // len(t))
