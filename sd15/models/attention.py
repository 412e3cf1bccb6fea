"""The one attention helper, shared by CLIP (causal), the UNet (self/cross) and the VAE (single head)."""

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Linear


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention over [B, N, C] tokens (Vaswani et al. 2017, eq. 1)."""
    b, n, c = q.shape
    q, k, v = (t.unflatten(-1, (heads, c // heads)).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, n, c)


class Attention(nn.Module):
    """Projections around `attention`: self-attention, or cross-attention when `context_dim` is given."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        self.heads = heads
        kv_dim = context_dim or dim
        self.to_q = Linear(dim, dim, bias=qkv_bias)
        self.to_k = Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = Linear(kv_dim, dim, bias=qkv_bias)
        self.to_out = Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, causal)
        return self.to_out(out)
