"""The SD 1.x autoencoder (KL-f8, Rombach et al. 2022): images in [-1, 1] <-> unscaled latents.

`encode` returns the posterior mean, `decode` takes unscaled latents; the 0.18215 latent scale lives in
`sd15.models.latents`, not here. The decoder's `up` list is kept in the order it runs (the original file
stores it reversed; the key map handles that).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .blocks import Conv2d, Downsample, ResBlock, Upsample
from .config import VAEConfig

EPS = 1e-6   # every GroupNorm in the VAE


class SelfAttention2d(nn.Module):
    """Single-head self-attention over all pixels, with a residual (the VAE's mid block)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.attn = Attention(channels, heads=1, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        return x + self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups, EPS)
        self.attn = SelfAttention2d(channels, groups)
        self.res2 = ResBlock(channels, channels, groups, EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class Level(nn.Module):
    def __init__(self, res: list[ResBlock], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.resample = resample


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.channels
        for i, width in enumerate(widths):
            res = []
            for _ in range(cfg.num_res_blocks):
                res.append(ResBlock(ch, width, cfg.norm_groups, EPS))
                ch = width
            last = i == len(widths) - 1
            self.down.append(Level(res, None if last else Downsample(ch, asymmetric_pad=True)))
        self.mid = MidBlock(ch, cfg.norm_groups)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=EPS)
        self.conv_out = Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)   # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for res in level.res:
                h = res(h)
            if level.resample is not None:
                h = level.resample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in reversed(cfg.channel_mult)]
        ch = widths[0]
        self.conv_in = Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, cfg.norm_groups)
        self.up = nn.ModuleList()
        for i, width in enumerate(widths):
            res = []
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResBlock(ch, width, cfg.norm_groups, EPS))
                ch = width
            last = i == len(widths) - 1
            self.up.append(Level(res, None if last else Upsample(ch)))
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch, eps=EPS)
        self.conv_out = Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up:
            for res in level.res:
                h = res(h)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def encode_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Diagonal Gaussian posterior q(z|x): (mean, log-variance clamped to [-30, 20] as trained)."""
        # .contiguous(): the CPU fast path (sd15.models.blocks) runs channels-last; hand back the usual layout.
        mean, logvar = self.quant_conv(self.encoder(images)).contiguous().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior mean [B,4,H/8,W/8], unscaled; `images` in [-1, 1]."""
        return self.encode_distribution(images)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B,3,8h,8w] in about [-1, 1] from unscaled latents."""
        return self.decoder(self.post_quant_conv(latents)).contiguous()
