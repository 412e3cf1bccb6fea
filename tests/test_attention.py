"""The attention helper's CPU fast path (query-chunked oneDNN matmuls for long key sequences) against the
textbook formula computed in float64, and against PyTorch's own SDPA in the same dtype.

The UNet parity tests at tiny size never reach LONG_KEYS keys; the full-size UNet parity test does (16x24
latents = 384 tokens), and these tests pin the helper itself: tails of a partial chunk, heads, batch,
dtypes, and where the fast path must step aside (causal, short keys, autograd, oneDNN off, and by default
on Intel CPUs, where SDPA's MKL kernels are the faster ones). The path is forced on here (`chunked`) so
that it is tested on every machine.
"""

import pytest
import torch
import torch.nn.functional as F

from sd15.models import attention as attention_module
from sd15.models.attention import LONG_KEYS, QUERY_CHUNK, attention


@pytest.fixture
def chunked(monkeypatch):
    monkeypatch.setattr(attention_module, "CHUNKED", True)


def textbook(q, k, v, heads):
    """softmax(q kᵀ / √d) v per head, in float64 (Vaswani et al. 2017, eq. 1)."""
    b, n, c = q.shape
    d = c // heads
    split = lambda t: t.double().unflatten(-1, (heads, d)).transpose(1, 2)        # noqa: E731
    qh, kh, vh = split(q), split(k), split(v)
    weights = torch.softmax(qh @ kh.transpose(-1, -2) / d ** 0.5, dim=-1)
    return (weights @ vh).transpose(1, 2).reshape(b, n, c)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def tokens(shape, scale=1.0, seed=0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ran_ops(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("queries,keys,heads,width", [
    (QUERY_CHUNK + 37, LONG_KEYS + 44, 8, 320),     # a partial last chunk, 8 heads of 40 (the UNet's 64x64)
    (300, 300, 8, 640),                              # heads of 80 (the UNet's 32x32)
    (2 * QUERY_CHUNK, 512, 1, 512),                  # the VAE's single 512-wide head
])
@torch.inference_mode()
def test_float32_chunked_path_matches_the_formula(chunked, queries, keys, heads, width):
    q, k, v = tokens((2, queries, width), 2.0, 1), tokens((2, keys, width), 2.0, 2), tokens((2, keys, width), 1.0, 3)
    out, ops = ran_ops(lambda: attention(q, k, v, heads))
    assert "mkldnn::_linear_pointwise" in ops and not any("flash_attention" in op for op in ops)
    exact = textbook(q, k, v, heads)
    sdpa = attention_module.F.scaled_dot_product_attention
    reference = sdpa(*(t.unflatten(-1, (heads, width // heads)).transpose(1, 2) for t in (q, k, v)))
    reference = reference.transpose(1, 2).reshape(q.shape)
    assert out.dtype == torch.float32 and out.shape == q.shape
    # Measured: 1.2e-6 / 1.5e-6 / 3.0e-6 for these cases, SDPA 1.1e-6 / 1.7e-6 / 1.9e-6 (scores of std 4):
    # float32 rounding, not an approximation.
    assert rel(out, exact) <= 1e-5
    assert rel(out, exact) <= 3 * rel(reference, exact)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 on this CPU")
@pytest.mark.parametrize("scale", [1.0, 3.0])      # 3: sharp attention maps, where bf16 scores would hurt
@torch.inference_mode()
def test_bfloat16_chunked_path_no_worse_than_sdpa(chunked, scale):
    heads, width = 8, 320
    q, k, v = (tokens((2, 400, width), s, seed) for s, seed in ((scale, 4), (scale, 5), (1.0, 6)))
    bf = [t.bfloat16() for t in (q, k, v)]
    out, ops = ran_ops(lambda: attention(*bf, heads))
    assert out.dtype == torch.bfloat16 and not any("flash_attention" in op for op in ops)
    exact = textbook(*bf, heads)                      # the formula on the very bf16 inputs
    split = [t.unflatten(-1, (heads, width // heads)).transpose(1, 2) for t in bf]
    sdpa = F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(q.shape)
    # Measured at 4096 tokens: SDPA 2.8e-3 / 3.0e-3, ours 6.0e-3 / 1.9e-2 (scale 1 / 3): bf16 keeps
    # 8 bits. bf16 scores instead of float32 ones would have given 1.3e-2 / 6.1e-2.
    assert rel(out, exact) <= 0.03
    assert rel(out, exact) <= 8 * rel(sdpa, exact)


@pytest.mark.parametrize("case", ["causal", "short keys", "autograd", "onednn off", "switched off"])
def test_fast_path_steps_aside(monkeypatch, case):
    monkeypatch.setattr(attention_module, "CHUNKED", case != "switched off")
    q = tokens((1, 300, 64), 1.0, 7)
    k, v = (tokens((1, 20 if case == "short keys" else 300, 64), 1.0, s) for s in (8, 9))
    causal = case == "causal"

    def run():
        if case == "autograd":
            return attention(q.requires_grad_(), k, v, 4, causal)
        with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=case != "onednn off"):
            return attention(q, k, v, 4, causal)

    out, ops = ran_ops(run)
    assert "mkldnn::_linear_pointwise" not in ops
    assert any("scaled_dot_product" in op for op in ops)
    if causal:
        b, n, c = q.shape
        qh, kh, vh = (t.double().unflatten(-1, (4, 16)).transpose(1, 2) for t in (q, k, v))
        scores = (qh @ kh.transpose(-1, -2) / 4.0).masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf"))
        exact = (torch.softmax(scores, -1) @ vh).transpose(1, 2).reshape(b, n, c)
    else:
        exact = textbook(q.detach(), k, v, 4)
    assert rel(out.detach(), exact) <= 2e-6


INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n"


@pytest.mark.parametrize("cpuinfo,env,on", [
    (INTEL, None, False), (AMD, None, True), ("", None, False),       # unknown vendor: PyTorch's own kernel
    (INTEL, "1", True), (AMD, "0", False), (AMD, "yes", True),       # only 0 and 1 force it
])
def test_chunked_path_is_on_where_mkl_is_the_slower(cpuinfo, env, on):
    vendor = attention_module.cpu_vendor(cpuinfo)
    assert vendor == {INTEL: "GenuineIntel", AMD: "AuthenticAMD", "": ""}[cpuinfo]
    assert attention_module.chunked_by_default(vendor, env) is on
