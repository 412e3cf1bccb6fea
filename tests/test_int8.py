"""Opt-in int8 (sd15.models.int8): the int8 layers compute what their quantised numbers mean, the UNet
stays close to float32, the seams keep working, and nothing changes for a model that did not opt in.

References are plain torch float32 ops on the dequantised numbers (int8 weight x scale, uint8 input
minus zero point x scale), so they check oneDNN's int8 kernels and our zero-point correction
independently; the float32 model is the reference for closeness. Tiny demo configs, CPU, 1 thread.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sd15
from sd15.models.blocks import Conv2d, Linear, deltas_active, merge_delta, restore_weight
from sd15.models.demo import TINY_UNET
from sd15.models.int8 import (Int8Conv2d, Int8Linear, activation_range, dequantize_int8, int8_available, is_int8,
                              quantize_activation, quantize_activation_plain, quantize_int8, quantize_weight)
from sd15.models.unet import UNet

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),   # see sd15.models.int8
              pytest.mark.skipif(not int8_available(), reason="this torch has no oneDNN int8 kernels")]

EXACT_TOL = 1e-5     # int8 layer vs float32 ops on the same dequantised numbers: only summation order differs
LAYER_TOL = 0.03     # int8 layer vs float32 layer, ||Δ|| / ||y||: 8-bit input and weight rounding (~1 %)
UNET_TOL = 0.08      # whole tiny UNet vs float32, ||Δ|| / ||y||: ~30 layers of rounding in a row


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def int8_copy(layer):
    q = copy.deepcopy(layer)
    quantize_int8(q, keep_float=())
    return q


def dequantised_input(x: torch.Tensor) -> torch.Tensor:
    scale, zp = activation_range(x)
    return (quantize_activation(x, scale, zp).float() - zp) * scale


def dequantised_weight(w: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_weight(w)
    return q.float() * scale.view(-1, *[1] * (w.dim() - 1))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("cin, cout, k, stride, size, shift", [
    (16, 24, 3, 1, (9, 7), -0.3),     # odd sizes: border taps differ from the interior
    (16, 16, 3, 2, (10, 10), -0.3),   # stride 2 (Downsample)
    (32, 8, 1, 1, (6, 6), 2.0),       # 1x1, all-positive input: zero point 0, no correction
    (8, 16, 3, 1, (5, 5), -3.0),      # mostly negative: large zero point
])
@torch.inference_mode()
def test_conv_computes_its_quantised_numbers(gen, cin, cout, k, stride, size, shift):
    conv = Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    x = torch.randn(2, cin, *size, generator=gen) + shift
    out = int8_copy(conv)(x)
    ref = F.conv2d(dequantised_input(x), dequantised_weight(conv.weight), conv.bias, stride, k // 2)
    assert out.shape == ref.shape
    assert rel(out, ref) < EXACT_TOL
    assert rel(out, conv(x)) < LAYER_TOL


@torch.inference_mode()
def test_conv_zero_point_correction_equals_onednn_own(gen):
    """Our correction (zero point 0 plus a precomputed response) against oneDNN given the zero point."""
    conv = int8_copy(Conv2d(16, 16, 3, padding=1))
    x = torch.randn(2, 16, 8, 8, generator=gen).contiguous(memory_format=torch.channels_last)
    scale, zp = activation_range(x)
    assert zp > 0
    qx = quantize_activation(x, scale, zp)
    packed = conv._int8_weight()
    theirs = torch.ops.onednn.qconv2d_pointwise(qx, scale, zp, packed.packed, packed.scale, packed.zero_points,
                                                packed.bias, *packed.geometry, 1.0, 0, torch.float32, "none", [], "")
    assert rel(packed.conv(qx, scale, zp), theirs) < EXACT_TOL


@torch.inference_mode()
def test_linear_computes_its_quantised_numbers(gen):
    linear = Linear(24, 40)
    x = torch.randn(2, 33, 24, generator=gen)
    out = int8_copy(linear)(x)
    ref = F.linear(dequantised_input(x), dequantised_weight(linear.weight), linear.bias)
    assert out.shape == (2, 33, 40)
    assert rel(out, ref) < EXACT_TOL
    assert rel(out, linear(x)) < LAYER_TOL


@torch.inference_mode()
def test_linear_part_is_that_part_of_the_int8_output(gen):
    """GEGLU computes `proj`'s halves apart (Linear.forward_part): in int8 too. Weight scales are per output
    row, so a part's int8 numbers are the whole layer's: the same values, to summation order."""
    linear = Linear(24, 40)
    q = int8_copy(linear)
    x = torch.randn(2, 33, 24, generator=gen)
    with torch.profiler.profile() as prof:
        parts = [q.forward_part(x, i, 2) for i in range(2)]
    assert sum(e.count for e in prof.key_averages() if e.key == "onednn::qlinear_pointwise") == 2
    whole = q(x).chunk(2, -1)
    assert all(rel(p, w) < EXACT_TOL for p, w in zip(parts, whole))


@torch.inference_mode()
def test_linear_with_few_rows_and_bias_free_layers(gen):
    """A linear with fewer than MIN_ROWS rows stays float32 exactly; a bias-free one runs int8."""
    linear = Linear(24, 40)
    small = torch.randn(2, 24, generator=gen)
    assert torch.equal(int8_copy(linear)(small), linear(small))
    no_bias = Linear(24, 40, bias=False)
    x = torch.randn(64, 24, generator=gen)
    ref = F.linear(dequantised_input(x), dequantised_weight(no_bias.weight))
    assert rel(int8_copy(no_bias)(x), ref) < EXACT_TOL


def test_activation_quantisers_agree(gen):
    x = torch.randn(2, 8, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last) - 0.2
    scale, zp = activation_range(x)
    lo, hi = float(x.min()), float(x.max())
    assert scale == pytest.approx((hi - lo) / 255) and zp == round(-lo / scale)
    fast, plain = quantize_activation(x, scale, zp), quantize_activation_plain(x, scale, zp)
    assert fast.dtype == plain.dtype == torch.uint8 and torch.equal(fast, plain)
    assert fast.is_contiguous(memory_format=torch.channels_last)


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    unet = UNet(TINY_UNET).eval().requires_grad_(False)
    x = torch.randn(2, 4, 16, 16)
    context = torch.randn(2, 77, TINY_UNET.context_dim)
    return unet, x, context


@torch.inference_mode()
def test_unet_int8_close_to_float_and_undone_exactly(tiny_unet):
    unet, x, context = tiny_unet
    before = unet(x, 500, context)
    switched = quantize_int8(unet)
    assert is_int8(unet)
    layers = dict(unet.named_modules())
    for kept in ("conv_in", "conv_out", "down.0.attn.0.block.attn2.to_k", "down.0.attn.0.block.attn2.to_v"):
        assert type(layers[kept]) in (Conv2d, Linear), kept
    assert type(layers["down.0.res.0.conv1"]) is Int8Conv2d
    assert type(layers["down.0.attn.0.block.attn1.to_q"]) is Int8Linear
    all_layers = sum(isinstance(m, (Conv2d, Linear)) for m in unet.modules())
    transformers = sum(name.endswith("attn2") for name in layers)
    assert transformers == 7
    assert switched == all_layers - 2 - 2 * transformers     # conv_in, conv_out, to_k/to_v of each transformer
    quantised = unet(x, 500, context)
    err = rel(quantised, before)
    assert 1e-4 < err < UNET_TOL                        # int8 really ran, and stayed close
    assert torch.equal(copy.deepcopy(unet)(x, 500, context), quantised)   # deepcopy keeps int8, drops caches
    assert dequantize_int8(unet) == switched and not is_int8(unet)
    assert torch.equal(unet(x, 500, context), before)


@torch.inference_mode()
def test_default_model_untouched(tiny_unet):
    unet, x, context = tiny_unet
    other = copy.deepcopy(unet)
    before = unet(x, 500, context)
    quantize_int8(other)
    assert not is_int8(unet)
    assert not any(type(m) in (Int8Conv2d, Int8Linear) for m in unet.modules())
    assert torch.equal(unet(x, 500, context), before)


def test_float_path_outside_cpu_float32_inference(gen):
    """With autograd on, the int8 layers run their float32 path, bit for bit."""
    conv = Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 6, 6, generator=gen)
    q = int8_copy(conv)
    with torch.no_grad():
        assert not torch.equal(q(x), conv(x))
    assert torch.equal(q(x), conv(x))                  # grad enabled: no fast path, no int8


@torch.inference_mode()
def test_on_the_fly_delta_is_added_in_float(gen):
    conv, linear = Conv2d(8, 8, 3, padding=1), Linear(8, 12)
    for layer, x in ((conv, torch.randn(2, 8, 6, 6, generator=gen)), (linear, torch.randn(32, 8, generator=gen))):
        q = int8_copy(layer)
        down = torch.randn(3, 8, generator=gen)
        up = torch.randn(q.weight.shape[0], 3, generator=gen)

        def delta(inp, down=down, up=up, is_conv=layer is conv):
            if is_conv:
                return torch.einsum("or,ri,bihw->bohw", up, down, inp)
            return inp @ down.T @ up.T

        plain = q(x)
        with deltas_active({q: [delta]}):
            with_delta = q(x)
        assert rel(with_delta, plain + delta(x)) < EXACT_TOL


@torch.inference_mode()
def test_merged_delta_is_quantised_again_and_restored(gen):
    conv = Conv2d(8, 8, 3, padding=1)
    q = int8_copy(conv)
    x = torch.randn(2, 8, 6, 6, generator=gen)
    before = q(x)
    delta = 0.5 * torch.randn(conv.weight.shape, generator=gen)
    original = merge_delta(q, delta)
    merged = q(x)
    ref = F.conv2d(dequantised_input(x), dequantised_weight(conv.weight + delta), conv.bias, 1, 1)
    assert rel(merged, ref) < EXACT_TOL
    restore_weight(q, original)
    assert torch.equal(q(x), before)


def test_refuses_a_bfloat16_model():
    unet = UNet(TINY_UNET).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 CPU engine"):
        quantize_int8(unet)
    assert not is_int8(unet)                            # nothing half-switched


def test_txt2img_int8_near_float(tiny_ckpt_file):
    """A whole tiny txt2img at one seed: the int8 image is close to the float32 one (PSNR), and the
    pipeline is float32 again after dequantize_int8."""
    pipe = sd15.load(tiny_ckpt_file, device="cpu", dtype=torch.float32)
    settings = dict(steps=4, sampler="DPM++ 2M Karras", seed=7, width=64, height=64)
    fp32 = np.asarray(pipe.txt2img("a lighthouse", **settings)[0], dtype=np.float64)
    quantize_int8(pipe.unet)
    int8 = np.asarray(pipe.txt2img("a lighthouse", **settings)[0], dtype=np.float64)
    dequantize_int8(pipe.unet)
    again = np.asarray(pipe.txt2img("a lighthouse", **settings)[0], dtype=np.float64)
    mse = float(np.mean((int8 - fp32) ** 2))
    assert mse > 0                                     # int8 ran
    assert 10 * np.log10(255 ** 2 / mse) > 28          # and changed the picture by little (28 dB: ~10 levels rms)
    assert np.array_equal(again, fp32)


def test_cli_int8_runs_and_refuses_what_it_cannot_do(tiny_ckpt_file, tmp_path):
    """`--int8` from the command line: an image from the int8 UNet, and a clear non-zero exit where int8
    cannot apply (bf16, compile), before anything loads."""
    import subprocess
    import sys
    out = tmp_path / "int8.png"
    base = [sys.executable, "-m", "sd15.generate", "--ckpt", str(tiny_ckpt_file), "--prompt", "a lighthouse",
            "--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--device", "cpu", "--quiet"]
    done = subprocess.run([*base, "--int8", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plain = subprocess.run([*base, "--out", str(tmp_path / "plain.png")], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    from PIL import Image
    a, b = (np.asarray(Image.open(p), dtype=np.float64) for p in (out, tmp_path / "plain.png"))
    assert 0 < float(np.abs(a - b).max())                 # the int8 UNet ran
    for extra in (["--dtype", "bfloat16"], ["--compile"]):
        bad = subprocess.run([*base, "--int8", *extra, "--out", str(tmp_path / "x.png")], capture_output=True,
                             text=True, timeout=120)
        assert bad.returncode != 0 and "--int8 is for the float32 CPU engine" in bad.stderr
        assert not (tmp_path / "x.png").exists()
