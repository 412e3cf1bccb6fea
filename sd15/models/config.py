"""One frozen dataclass per component, with SD 1.5 values as defaults.

Tests build tiny models with ``dataclasses.replace(UNetConfig(), channels=32, ...)``.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    channels: int = 320                       # width of the first level; also the timestep sinusoid size
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2                   # per level on the way down; the way up has one more
    attention_levels: tuple[int, ...] = (0, 1, 2)   # levels that carry a cross-attention transformer
    num_heads: int = 8                        # SD 1.x fixes the head count, so head dim grows 40/80/160
    context_dim: int = 768                    # width of the CLIP text states
    norm_groups: int = 32
    # LCM-distilled UNets (e.g. LCM_Dreamshaper_v7): width of the guidance-scale embedding that a bias-free
    # `time_embed.cond_proj` adds to the timestep sinusoid (256); None for every other SD 1.x UNet.
    time_cond_proj_dim: int | None = None

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 4
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2                   # encoder; the decoder uses one more per level
    norm_groups: int = 32

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet (Zhang et al. 2023): a copy of `unet`'s encoder (its output head unused) plus the hint
    network, whose stride-2 convs take a `hint_channels` image at 8x the latent size to the first level's width."""
    unet: UNetConfig = UNetConfig()
    hint_channels: int = 3                    # RGB control image in [0, 1]
    hint_widths: tuple[int, ...] = (16, 32, 96, 256)   # one conv at each width, then a stride-2 conv to the next
