"""Classifier-free guidance as a model wrapper (Ho & Salimans 2022).

    model = guided(unet, cond, uncond, scale=7.5)
    eps = model(x_in, call)   # ε = ε_uncond + s·(ε_cond − ε_uncond)

`unet(x, t, context) -> ε` is the engine's UNet signature, t a float32 tensor [B] made here (a python
number would make a compiled UNet recompile for every step); `cond` / `uncond` are text states
[B, 77·k, 768] with the batch of x (the unconditional prompt is the negative prompt, "" if none).
Of equal length they go through the UNet as one batch [uncond; cond], diffusers' order; of different
lengths (a long prompt against a short negative) as two calls, which is A1111's default.

A UNet wrapper that treats conditional and unconditional rows differently (a ControlNet in guess mode or
A1111's "ControlNet is more important") is marked `row_aware`: guidance then also passes it
`rows=Rows(conditional, call)`, which rows of this call carry a prompt and where in the schedule the call
is. A plain UNet is called with (x, t, context) alone.

The UNet runs in the dtype of the text states (the models' dtype); x, the guidance arithmetic and the
returned ε stay in x's dtype, so a fp16 UNet can drive a float32 sampler: the difference of two
nearly equal fp16 predictions, scaled by 7.5, is where half precision loses the most.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.unet import batch_timesteps
from .denoiser import EpsModel, ModelCall

UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]   # (x, t [B], context) -> ε


@dataclass(frozen=True)
class Rows:
    """What the rows of one UNet call made by guidance are."""
    conditional: torch.Tensor    # bool [B]: True for a row with a prompt's text, False for the negative's
    call: ModelCall              # the evaluation this UNet call is part of (step, steps, σ)


def row_aware(unet: UNetFn) -> UNetFn:
    """Mark a UNet callable as taking `rows=Rows(...)` besides (x, t, context)."""
    unet.row_aware = True
    return unet


def _run(unet: UNetFn, x: torch.Tensor, call: ModelCall, context: torch.Tensor, conditional: list[bool]):
    t = batch_timesteps(call.t, len(x), x.device)
    if getattr(unet, "row_aware", False):
        return unet(x, t, context, rows=Rows(torch.tensor(conditional, dtype=torch.bool), call))
    return unet(x, t, context)


def guided(unet: UNetFn, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> EpsModel:
    """The model with guidance scale `scale`; scale == 1 is the conditional model alone (one pass).

    Below 1 the formula still applies (0 = unconditional). diffusers instead skips guidance for any
    scale <= 1, so scales in (0, 1) give different images there.
    """
    if scale == 1:
        def conditional(x: torch.Tensor, call: ModelCall) -> torch.Tensor:
            # copy=True: a compiled UNet (CUDA graphs) reuses its output buffer on the next call.
            return _run(unet, x.to(cond.dtype), call, cond, [True] * len(x)).to(x.dtype, copy=True)
        return conditional

    if uncond.shape[1] != cond.shape[1]:
        def separate(x: torch.Tensor, call: ModelCall) -> torch.Tensor:
            xm = x.to(cond.dtype)
            eps_cond = _run(unet, xm, call, cond, [True] * len(x)).to(x.dtype, copy=True)
            eps_uncond = _run(unet, xm, call, uncond, [False] * len(x)).to(x.dtype)
            return eps_uncond + scale * (eps_cond - eps_uncond)
        return separate

    context = torch.cat([uncond, cond])  # diffusers' order: unconditional half first

    def batched(x: torch.Tensor, call: ModelCall) -> torch.Tensor:
        eps = _run(unet, torch.cat([x, x]).to(context.dtype), call, context,
                   [False] * len(x) + [True] * len(x)).to(x.dtype)
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)
    return batched


# per image: its prompt parts as (weight, states [N, width]); and per image the negative's states (or None)
StepTexts = tuple[list[list[tuple[float, torch.Tensor]]], "list[torch.Tensor] | None"]


def stack_padded(states: list[torch.Tensor]) -> torch.Tensor:
    """[N_i, width] tensors as one [len, max N, width] batch, shorter ones padded by repeating their last
    vector (A1111's `stack_conds`, for batch entries and AND parts of different lengths)."""
    longest = max(s.shape[0] for s in states)
    return torch.stack([s if s.shape[0] == longest else torch.cat([s, s[-1:].expand(longest - s.shape[0], -1)])
                        for s in states])


def guided_by_step(unet: UNetFn, texts_at: Callable[[int], StepTexts], scale: float) -> EpsModel:
    """Guidance whose text states depend on the step (prompt editing) and may have several weighted parts
    per image (A1111's AND): ε = ε_uncond + Σ_j w_j·scale·(ε_cond_j − ε_uncond), A1111's `combine_denoised`
    in ε form. Conditional rows are one UNet batch, the unconditional rows another (one call when their
    lengths agree). With a single part of weight 1 per image this is `guided`'s formula."""
    def model(x: torch.Tensor, call: ModelCall) -> torch.Tensor:
        cond, uncond = texts_at(call.step)
        owners = [i for i, parts in enumerate(cond) for _ in parts]
        weights = [w for parts in cond for w, _ in parts]
        cond_batch = stack_padded([s for parts in cond for _, s in parts])
        dtype = cond_batch.dtype
        x_cond = x[owners].to(dtype)
        if uncond is None:
            eps = _run(unet, x_cond, call, cond_batch, [True] * len(owners)).to(x.dtype)
            return _weighted_sum(eps, owners, weights, len(x))
        uncond_batch = stack_padded(uncond)
        if uncond_batch.shape[1] == cond_batch.shape[1]:
            both = _run(unet, torch.cat([x.to(dtype), x_cond]), call, torch.cat([uncond_batch, cond_batch]),
                        [False] * len(x) + [True] * len(owners)).to(x.dtype)
            eps_uncond, eps_cond = both[:len(x)], both[len(x):]
        else:
            eps_cond = _run(unet, x_cond, call, cond_batch, [True] * len(owners)).to(x.dtype, copy=True)
            eps_uncond = _run(unet, x.to(dtype), call, uncond_batch, [False] * len(x)).to(x.dtype)
        return eps_uncond + _weighted_sum(eps_cond - eps_uncond[owners], owners, [w * scale for w in weights], len(x))
    return model


def _weighted_sum(rows: torch.Tensor, owners: list[int], weights: list[float], images: int) -> torch.Tensor:
    """Σ over each image's rows of weight·row."""
    out = torch.zeros((images, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    for row, (owner, weight) in enumerate(zip(owners, weights)):
        out[owner] += weight * rows[row]
    return out
