"""Classifier-free guidance as an eps_model wrapper (Ho & Salimans 2022).

    eps_model = cfg_eps_model(unet, cond, uncond, scale=7.5)
    eps = eps_model(x, t)   # ε = ε_uncond + s·(ε_cond − ε_uncond), one UNet call on [uncond; cond]

`unet(x, t, context) -> ε` is the engine's UNet signature; `cond` / `uncond` are text-encoder
outputs [B, 77, 768] with the batch of x (the unconditional prompt is the negative prompt, "" if none).

The UNet runs in the dtype of the text states (the models' dtype); x, the guidance arithmetic and the
returned ε stay in x's dtype, so a fp16 UNet can drive a float32 sampler: the difference of two
nearly equal fp16 predictions, scaled by 7.5, is where half precision loses the most.
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
            # copy=True: a compiled UNet (CUDA graphs) reuses its output buffer on the next call.
            return unet(x.to(cond.dtype), batch_timesteps(t, len(x), x.device), cond).to(x.dtype, copy=True)
        return conditional

    context = torch.cat([uncond, cond])  # diffusers' order: unconditional half first

    def guided(x: torch.Tensor, t) -> torch.Tensor:
        both = torch.cat([x, x]).to(context.dtype)
        eps = unet(both, batch_timesteps(t, len(both), x.device), context).to(x.dtype)
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)
    return guided


def batch_timesteps(t, batch: int, device: torch.device) -> torch.Tensor:
    """t as a python float, 0-d or [b] tensor -> float32 tensor [batch] on `device` ([b] is tiled)."""
    if isinstance(t, (int, float)):  # a fill on the device: no host-to-GPU copy, so no sync per step
        return torch.full((batch,), t, dtype=torch.float32, device=device)
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    return t.expand(batch) if t.ndim == 0 else t.repeat(batch // len(t))
