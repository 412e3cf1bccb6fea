"""The SD 1.x denoising UNet (Rombach et al. 2022): predicts the noise in a latent at timestep t.

Layout: `conv_in`, then `down` levels of ResBlocks (+ cross-attention transformers on the levels in
`attention_levels`) ending in a stride-2 conv, a `mid` block, `up` levels that concatenate the saved
skips, and `norm_out`/`conv_out`. Each level is a small module with explicit lists, so `forward` reads
like the diagram in the paper.

Seam for ControlNet-style control: `forward(..., residuals=Residuals(skips, mid))` adds one tensor to
each saved skip (in the order they are saved, `conv_in`'s first: 12 for SD1.5) and one to the middle
block's output, as diffusers' `down_block_additional_residuals` / `mid_block_additional_residual` do.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .blocks import Conv2d, Downsample, Linear, ResBlock, Upsample
from .config import UNetConfig


def batch_timesteps(t, batch: int, device: torch.device) -> torch.Tensor:
    """The one normalisation of a timestep argument: python number, 0-d or [b] tensor -> float32 [batch].

    A python number becomes a fill on the device (no host-to-GPU copy, so no sync per step); [b] is tiled.
    """
    if isinstance(t, (int, float)):
        return torch.full((batch,), t, dtype=torch.float32, device=device)
    t = torch.as_tensor(t, device=device).float()
    return t.expand(batch) if t.ndim == 0 else t.repeat(batch // len(t))


class Residuals(NamedTuple):
    """Additions to the UNet's skip connections and middle block (a ControlNet's output)."""
    skips: tuple[torch.Tensor, ...]     # one per saved skip, in the order the way down saves them
    mid: torch.Tensor


def _add_residuals(skips: list[torch.Tensor], mid: torch.Tensor,
                   residuals: Residuals) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Skips and middle output plus the residuals, each checked to have exactly its tensor's shape (no
    broadcasting) and taken in its dtype."""
    if len(residuals.skips) != len(skips):
        raise ValueError(f"{len(residuals.skips)} skip residuals for a UNet with {len(skips)} skips")
    for i, (s, r) in enumerate([*zip(skips, residuals.skips), (mid, residuals.mid)]):
        if r.shape != s.shape:
            where = f"skip residual {i}" if i < len(skips) else "middle-block residual"
            raise ValueError(f"{where} has shape {tuple(r.shape)}; the UNet's tensor there is {tuple(s.shape)}")
    return [s + r.to(s.dtype) for s, r in zip(skips, residuals.skips)], mid + residuals.mid.to(mid.dtype)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoid of the timestep, **cos first then sin** as SD was trained.

    Frequencies exp(-ln(10000)·i/(dim/2)), i = 0..dim/2-1 (Vaswani et al. 2017, §3.5).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoid an LCM-distilled UNet takes its guidance scale in (VDM's embedding, Kingma et al. 2021;
    diffusers' `get_guidance_scale_embedding`): of 1000·w, **sin first then cos**, frequencies
    exp(-ln(10000)·i/(dim/2 - 1)) -- not `timestep_embedding`'s order or spacing. w [B] -> [B, dim], float32."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)      # float32 throughout, as diffusers computes it
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -step)
    angles = (w.float() * 1000.0)[:, None] * freqs[None]
    return F.pad(torch.cat([torch.sin(angles), torch.cos(angles)], dim=1), (0, dim % 2))


class TimestepMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, cond_dim: int | None = None):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, hidden)
        # LCM-distilled UNets: the guidance embedding, projected to the sinusoid's width, is added to it.
        self.cond_proj = Linear(cond_dim, dim, bias=False) if cond_dim else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_proj is not None:
            x = x + self.cond_proj(cond.to(x.dtype))
        return self.fc2(F.silu(self.fc1(x)))


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020), inner width 4C, exact (erf) GELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = Linear(dim, 2 * 4 * dim)
        self.out = Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            value, gate = self.proj(x).chunk(2, dim=-1)
            return self.out(value * F.gelu(gate))
        # Inference: `proj`'s two halves as two matmuls, each a fresh contiguous tensor, gated in place. The
        # [tokens, 8C] output of one matmul and the two strided passes over it are never made (168 MB at
        # 64x64 latents in float32); a whole UNet step took 0.95x the time on an AMD machine, 0.92x in bf16 on
        # an Intel one (BENCHMARKS.md, "Closing in on OpenVINO").
        gate = torch.ops.aten.gelu_(self.proj.forward_part(x, 1, 2))
        return self.out(self.proj.forward_part(x, 0, 2).mul_(gate))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = GEGLU(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """Image features -> tokens -> one transformer block (self + cross attention) -> back, residual."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        self.proj_in = Conv2d(channels, channels, 1)
        self.block = TransformerBlock(channels, cfg.num_heads, cfg.context_dim)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)      # [B, HW, C]
        tokens = self.block(tokens, context)
        return self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w), residual=x)


class Level(nn.Module):
    """One resolution of the UNet: ResBlocks, optional transformers after each, optional resampler."""

    def __init__(self, res: list[ResBlock], attn: list[SpatialTransformer], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)          # empty on levels without attention
        self.resample = resample


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.res1 = ResBlock(channels, channels, cfg.norm_groups, 1e-5, cfg.time_embed_dim)
        self.attn = SpatialTransformer(channels, cfg)
        self.res2 = ResBlock(channels, channels, cfg.norm_groups, 1e-5, cfg.time_embed_dim)

    def forward(self, x, time_emb, context):
        return self.res2(self.attn(self.res1(x, time_emb), context), time_emb)


def down_levels(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The way down (shared by the UNet and a ControlNet's copy of its encoder): its levels, and the width
    of each skip it saves, `conv_in`'s first."""
    widths = [cfg.channels * m for m in cfg.channel_mult]
    skip_widths, ch = [cfg.channels], cfg.channels
    levels = nn.ModuleList()
    for i, width in enumerate(widths):
        res, attn = [], []
        for _ in range(cfg.num_res_blocks):
            res.append(ResBlock(ch, width, cfg.norm_groups, 1e-5, cfg.time_embed_dim))
            ch = width
            if i in cfg.attention_levels:
                attn.append(SpatialTransformer(ch, cfg))
            skip_widths.append(ch)
        down = Downsample(ch) if i < len(widths) - 1 else None
        if down is not None:
            skip_widths.append(ch)
        levels.append(Level(res, attn, down))
    return levels, skip_widths


def run_down(levels: nn.ModuleList, h: torch.Tensor, time_emb: torch.Tensor,
             context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`down_levels`' forward from `conv_in`'s output `h`: (the deepest features, every skip in saving order)."""
    skips = [h]
    for level in levels:
        for i, res in enumerate(level.res):
            h = res(h, time_emb)
            if level.attn:
                h = level.attn[i](h, context)
            skips.append(h)
        if level.resample is not None:
            h = level.resample(h)
            skips.append(h)
    return h, skips


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        groups, tdim = cfg.norm_groups, cfg.time_embed_dim
        widths = [cfg.channels * m for m in cfg.channel_mult]

        self.time_embed = TimestepMLP(cfg.channels, tdim, cfg.time_cond_proj_dim)
        self.conv_in = Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)

        # Way down: remember each block's output width; the way up consumes them in reverse.
        self.down, skip_widths = down_levels(cfg)
        ch = skip_widths[-1]
        self.mid = MidBlock(ch, cfg)

        # Way up: levels run deepest first; each has one more ResBlock than on the way down.
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            res, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResBlock(ch + skip_widths.pop(), width, groups, 1e-5, tdim))
                ch = width
                if i in cfg.attention_levels:
                    attn.append(SpatialTransformer(ch, cfg))
            self.up.append(Level(res, attn, Upsample(ch) if i > 0 else None))

        self.norm_out = nn.GroupNorm(groups, ch, eps=1e-5)
        self.conv_out = Conv2d(ch, cfg.out_channels, 3, padding=1)

    @property
    def num_skips(self) -> int:
        """How many skip tensors the way down saves (what `Residuals.skips` must hold)."""
        return 1 + sum(len(level.res) + (level.resample is not None) for level in self.down)

    def forward(self, x: torch.Tensor, t, context: torch.Tensor, residuals: Residuals | None = None, *,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise ε in latents `x` [B,C,h,w] at timestep `t` (number, 0-d or [B]) given text states
        `context` [B, N, context_dim] (any N: long prompts are 77·k tokens).

        timestep_cond: an LCM-distilled UNet's guidance input, `guidance_embedding(w, time_cond_proj_dim)`
        [B, dim] (diffusers' `timestep_cond`); required by such a UNet, refused by any other."""
        if (timestep_cond is None) != (self.time_embed.cond_proj is None):
            raise ValueError("this UNet is LCM-distilled: it takes its guidance scale as an input, pass "
                             "timestep_cond=guidance_embedding(w, cfg.time_cond_proj_dim) (see "
                             "sd15.sampling.consistency.embedded_guidance)" if timestep_cond is None else
                             "timestep_cond is only for LCM-distilled UNets (with a guidance embedding); "
                             "this one has none")
        t = batch_timesteps(t, x.shape[0], x.device)
        time_emb = self.time_embed(timestep_embedding(t, self.cfg.channels).to(x.dtype), timestep_cond)

        h, skips = run_down(self.down, self.conv_in(x), time_emb, context)
        h = self.mid(h, time_emb, context)
        if residuals is not None:
            skips, h = _add_residuals(skips, h, residuals)

        for level in self.up:
            for i, res in enumerate(level.res):
                h = res(torch.cat([h, skips.pop()], dim=1), time_emb)
                if level.attn:
                    h = level.attn[i](h, context)
            if level.resample is not None:
                # Upsample to the size of the skip it will meet, so odd latent sizes work.
                h = level.resample(h, size=skips[-1].shape[-2:])

        # .contiguous(): the CPU fast path (sd15.models.blocks) runs channels-last; hand back the usual layout.
        return self.conv_out(F.silu(self.norm_out(h), inplace=True)).contiguous()
