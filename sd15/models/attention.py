"""The one attention helper, shared by CLIP (causal), the UNet (self/cross) and the VAE (single head).

CPU fast path for long key sequences (the UNet's self-attention at 64x64 and 32x32 latents, the VAE's
mid-block), on CPUs that are not Intel's. PyTorch's CPU flash-attention kernel multiplies small blocks
through MKL, and MKL runs slower code on other vendors' CPUs: on an AMD machine with AVX-512 it ran at
about a third of oneDNN's matmul rate, in bfloat16 no faster than in float32, while on an Intel Xeon with
AMX SDPA was 2.7x (float32) and 5x (bf16) faster than the chunks below. So where `CHUNKED` is on (CPU
vendor not GenuineIntel; SD15_CHUNKED_ATTENTION=1 or 0 forces it) and on the CPU fast path
(`blocks.cpu_fast_path`), attention over >= LONG_KEYS keys is computed per head in query chunks with
oneDNN's matmul and one softmax per chunk: scores = (q·scale) kᵀ, softmax, times v. Each chunk's scores
(QUERY_CHUNK x keys) stay small enough to live in the cache, and nothing of size tokens x tokens is ever
held. The math is the textbook formula, the same as SDPA's up to float rounding (float32: ~3e-7
relative, measured). In bfloat16 the scores and the softmax are computed in float32 (bf16 scores would
cost ~2x SDPA's error on sharp attention maps) and only the probabilities enter the second matmul in
bf16, as in SDPA's own bf16 kernel. Figures: BENCHMARKS.md ("Closing in on OpenVINO").
"""

import os

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Linear, cpu_fast_path

LONG_KEYS = 256        # below this (text tokens, small latents) SDPA's one call is as fast
QUERY_CHUNK = 256      # rows of scores per matmul: 256 x 4096 float32 = 4 MiB, measured best of 64..512


def cpu_vendor(cpuinfo: str | None = None) -> str:
    """The x86 vendor string ("GenuineIntel", "AuthenticAMD", ...) from /proc/cpuinfo; "" when unknown."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read(1 << 16)
        except OSError:
            return ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip()
    return ""


def chunked_by_default(vendor: str, env: str | None) -> bool:
    """Whether the chunked path is on: SD15_CHUNKED_ATTENTION=1/0 if set, else for a known non-Intel CPU."""
    if env in ("0", "1"):
        return env == "1"
    return vendor not in ("", "GenuineIntel")


CHUNKED = chunked_by_default(cpu_vendor(), os.environ.get("SD15_CHUNKED_ATTENTION"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention over [B, N, C] tokens (Vaswani et al. 2017, eq. 1)."""
    b, n, c = q.shape
    q, k, v = (t.unflatten(-1, (heads, c // heads)).transpose(1, 2) for t in (q, k, v))
    if CHUNKED and not causal and k.shape[2] >= LONG_KEYS and cpu_fast_path(q):
        out = _chunked_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, n, c)


def _chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over [B, H, N, d], per head and per QUERY_CHUNK queries, with oneDNN matmuls."""
    matmul = torch.ops.mkldnn._linear_pointwise          # x · wᵀ: the "weight" is k for scores, vᵀ for values
    scale = q.shape[-1] ** -0.5
    q = (q.float() * scale).contiguous()                 # scores in float32 whatever the dtype (see above)
    k = k.float().contiguous()
    v_t = v.transpose(-1, -2).contiguous()               # [B, H, d, keys], one copy
    out = torch.empty(q.shape, dtype=v.dtype)
    for i in range(q.shape[0]):
        for h in range(q.shape[1]):
            for start in range(0, q.shape[2], QUERY_CHUNK):
                rows = slice(start, start + QUERY_CHUNK)
                probs = torch.softmax(matmul(q[i, h, rows], k[i, h], None, "none", [], ""), dim=-1)
                out[i, h, rows] = matmul(probs.to(v.dtype), v_t[i, h], None, "none", [], "")
    return out


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
