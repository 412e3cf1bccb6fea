"""CLIP ViT-L/14 text transformer, as used by SD 1.x (Radford et al. 2021).

Output is the final LayerNorm of the last layer for every position: [B, 77, 768]. There is no padding
mask (SD was trained without one: padding tokens attend causally like any other token).

Two seams for the conditioning stage: `clip_skip` stops early (A1111's numbering: 1 = the last layer;
2 = the penultimate layer's output, still through the final LayerNorm, as anime fine-tunes expect), and
`token_embeds` replaces the token-embedding lookup (textual-inversion vectors go in at chosen positions).
One call encodes at most `max_length` tokens; longer prompts are encoded in chunks by the caller.
"""

import torch
from torch import nn

from .attention import Attention
from .blocks import Linear
from .config import TextEncoderConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI's CLIP was trained with this sigmoid approximation, not the exact GELU.
    return x * torch.sigmoid(1.702 * x)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        # The loader builds models on the meta device, where nn.Embedding's random init has nothing to fill
        # yet imports torch._dynamo (about 1 s of every load): skip it there.
        if not self.weight.is_meta:
            super().reset_parameters()


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer with causal self-attention."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.attn = Attention(cfg.width, cfg.num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = MLP(cfg.width, cfg.mlp_ratio * cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=True)
        x = x + self.mlp(self.norm2(x))
        return x


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig = TextEncoderConfig()):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = Embedding(cfg.max_length, cfg.width)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.width, eps=1e-5)

    def forward(self, ids: torch.Tensor, *, clip_skip: int = 1,
                token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Text states [B, N, width] for token ids [B, N], N <= max_length.

        clip_skip: 1 runs every layer; k runs all but the last k-1 (A1111's "Clip skip"; diffusers'
        `clip_skip=k-1`). token_embeds: [B, N, width] used instead of `token_embedding(ids)`.
        """
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= len(self.layers):
            raise ValueError(f"clip_skip must be an integer from 1 to {len(self.layers)} (1 = the last layer), "
                             f"got {clip_skip!r}")
        if ids.shape[1] > self.cfg.max_length:
            raise ValueError(f"{ids.shape[1]} tokens in one pass; the text encoder takes at most "
                             f"{self.cfg.max_length} (encode longer prompts in chunks)")
        if token_embeds is not None and tuple(token_embeds.shape) != (*ids.shape, self.cfg.width):
            raise ValueError(f"token_embeds must have shape {(*ids.shape, self.cfg.width)} (ids {tuple(ids.shape)} "
                             f"by width {self.cfg.width}), got {tuple(token_embeds.shape)}")
        # Positions are always 0..N-1, whatever position_ids tensor a checkpoint might carry.
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.token_embedding(ids) if token_embeds is None else token_embeds
        x = x + self.position_embedding(positions)
        for layer in self.layers[:len(self.layers) - (clip_skip - 1)]:
            x = layer(x)
        return self.final_norm(x)
