"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the UNet's encoder (time embedding, `conv_in`, the way down, the middle block), built
from the UNet's own pieces (`down_levels`, `run_down`, `MidBlock`), that also sees a control image (edges,
depth, pose...) through a small conv network, `hint`. Each of its 12 saved skips and its middle output
leaves through a zero-initialised 1x1 conv; the 13 results are what the frozen UNet adds to its own skips
and middle block (`UNet.forward(..., residuals=...)`, paper Fig. 3 / `cldm.py`'s `ControlledUnetModel`):

    residuals = controlnet(x, t, context, hint)      # hint [B, 3, 8h, 8w], RGB in [0, 1]
    eps = unet(x, t, context, residuals=residuals)

Module names follow the UNet's (`time_embed`, `conv_in`, `down`, `mid`), so `keymap.controlnet_key_map`
reuses the UNet's key map for the copied encoder.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Conv2d
from .config import ControlNetConfig
from .unet import MidBlock, Residuals, TimestepMLP, batch_timesteps, down_levels, run_down, timestep_embedding


class HintEncoder(nn.Module):
    """Control image -> features at the latent size and the first level's width (`input_hint_block`).

    3x3 convs with SiLU after each but the last: one into `hint_widths[0]`, then per step to the next width
    a conv at the width and a stride-2 conv into the next (three of them: x8 down), and a last
    (zero-initialised) conv into the UNet's first width.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...], out_channels: int):
        super().__init__()
        convs = [Conv2d(in_channels, widths[0], 3, padding=1)]
        for a, b in zip(widths, widths[1:]):
            convs += [Conv2d(a, a, 3, padding=1), Conv2d(a, b, 3, padding=1, stride=2)]
        convs.append(Conv2d(widths[-1], out_channels, 3, padding=1))
        self.convs = nn.ModuleList(convs)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = hint
        for conv in self.convs[:-1]:
            h = F.silu(conv(h))
        return self.convs[-1](h)


class ControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig = ControlNetConfig()):
        super().__init__()
        self.cfg = cfg
        unet = cfg.unet
        if unet.time_cond_proj_dim:
            raise ValueError("a ControlNet copies an ordinary SD 1.x encoder; it has no guidance embedding")
        self.time_embed = TimestepMLP(unet.channels, unet.time_embed_dim)
        self.conv_in = Conv2d(unet.in_channels, unet.channels, 3, padding=1)
        self.hint = HintEncoder(cfg.hint_channels, cfg.hint_widths, unet.channels)
        self.down, skip_widths = down_levels(unet)
        self.mid = MidBlock(skip_widths[-1], unet)
        # One 1x1 conv per saved skip and one after the middle block: zero at initialisation, so an untrained
        # ControlNet leaves the UNet unchanged.
        self.zero_convs = nn.ModuleList(Conv2d(w, w, 1) for w in skip_widths)
        self.mid_out = Conv2d(skip_widths[-1], skip_widths[-1], 1)

    @property
    def num_skips(self) -> int:
        return len(self.zero_convs)

    def forward(self, x: torch.Tensor, t, context: torch.Tensor, hint: torch.Tensor) -> Residuals:
        """The residuals for latents `x` [B, C, h, w] at timestep `t` (number, 0-d or [B]) with text states
        `context` [B, N, context_dim] and control image `hint` [B, hint_channels, 8h, 8w] (RGB in [0, 1])."""
        t = batch_timesteps(t, x.shape[0], x.device)
        time_emb = self.time_embed(timestep_embedding(t, self.cfg.unet.channels).to(x.dtype))
        # The hint joins after conv_in only: every later block sees it through the features.
        h, guide = self.conv_in(x), self.hint(hint.to(x.dtype))
        if guide.shape[-2:] != h.shape[-2:]:
            raise ValueError(f"control image of size {tuple(hint.shape[-2:])} for latents of size "
                             f"{tuple(x.shape[-2:])}: it must be 8x the latent size")
        h = h + guide
        h, skips = run_down(self.down, h, time_emb, context)
        h = self.mid(h, time_emb, context)
        return Residuals(tuple(conv(s) for conv, s in zip(self.zero_convs, skips)), self.mid_out(h))
