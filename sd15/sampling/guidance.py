"""Classifier-free guidance as a model wrapper (Ho & Salimans 2022).

    model = guided(unet, cond, uncond, scale=7.5)
    eps = model(x_in, call)   # ε = ε_uncond + s·(ε_cond − ε_uncond)

`unet(x, t, context) -> ε` is the engine's UNet signature, t a float32 tensor [B] made here (a python
number would make a compiled UNet recompile for every step); `cond` / `uncond` are text states
[B, 77·k, 768] with the batch of x (the unconditional prompt is the negative prompt, "" if none).
Of equal length they go through the UNet as one batch [uncond; cond], diffusers' order; of different
lengths (a long prompt against a short negative) as two calls, which is A1111's default.

The UNet runs in the dtype of the text states (the models' dtype); x, the guidance arithmetic and the
returned ε stay in x's dtype, so a fp16 UNet can drive a float32 sampler: the difference of two
nearly equal fp16 predictions, scaled by 7.5, is where half precision loses the most.
"""

from collections.abc import Callable

import torch

from ..models.unet import batch_timesteps
from .denoiser import EpsModel, ModelCall

UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]   # (x, t [B], context) -> ε


def guided(unet: UNetFn, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> EpsModel:
    """The model with guidance scale `scale`; scale == 1 is the conditional model alone (one pass).

    Below 1 the formula still applies (0 = unconditional). diffusers instead skips guidance for any
    scale <= 1, so scales in (0, 1) give different images there.
    """
    if scale == 1:
        def conditional(x: torch.Tensor, call: ModelCall) -> torch.Tensor:
            # copy=True: a compiled UNet (CUDA graphs) reuses its output buffer on the next call.
            return unet(x.to(cond.dtype), batch_timesteps(call.t, len(x), x.device), cond).to(x.dtype, copy=True)
        return conditional

    if uncond.shape[1] != cond.shape[1]:
        def separate(x: torch.Tensor, call: ModelCall) -> torch.Tensor:
            xm, t = x.to(cond.dtype), batch_timesteps(call.t, len(x), x.device)
            eps_cond = unet(xm, t, cond).to(x.dtype, copy=True)
            eps_uncond = unet(xm, t, uncond).to(x.dtype)
            return eps_uncond + scale * (eps_cond - eps_uncond)
        return separate

    context = torch.cat([uncond, cond])  # diffusers' order: unconditional half first

    def batched(x: torch.Tensor, call: ModelCall) -> torch.Tensor:
        eps = unet(torch.cat([x, x]).to(context.dtype), batch_timesteps(call.t, 2 * len(x), x.device),
                   context).to(x.dtype)
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)
    return batched
