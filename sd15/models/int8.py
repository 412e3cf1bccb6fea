"""Opt-in int8 for the UNet on CPU: int8 weights quantised once, activations quantised on every call.

    from sd15.models.int8 import quantize_int8, dequantize_int8
    quantize_int8(pipe.unet)        # in place; returns how many layers now run int8
    images = pipe.txt2img(...)      # float32 CPU inference now runs the UNet's layers in int8
    dequantize_int8(pipe.unet)      # back to the float32 fast path, bit for bit

Each sd15 `Linear` / `Conv2d` of the model (but see "kept in float32") becomes an `Int8Linear` /
`Int8Conv2d`. It stays the same module object with the same weight Parameter and name, so state_dict,
the adapters and `deltas_active` still find it. In CPU float32 inference its forward runs oneDNN's int8
kernels, the ones Inductor's X86InductorQuantizer lowers to (VNNI on AVX-512 CPUs):
- weight: int8, symmetric, one scale per output channel (max|W_row| / 127). It is made once per weight
  tensor and kept prepacked next to the float weight, which adds a quarter of the float weight's size.
  `merge_delta`, `replace_weight` and `.to()` give a new tensor or version, which is quantised again on
  its next call (the same rule as Conv2d's prepack cache).
- input: uint8, asymmetric, one scale per tensor from the tensor's own min and max, on every call
  (dynamic, so no calibration data). Quantising costs about 1 ms per 10 MB of input; the timings count it.
- output: float32 (oneDNN folds both scales in), bias added in float32.
Everywhere else (GPU, bfloat16, autograd, autocast, torch.compile, `torch.backends.mkldnn` off) the layer
runs exactly as before. So compile a model without quantising it: a compiled graph would run in float32.

Kept in float32:
- `conv_in` and `conv_out`. The latent comes in and the noise prediction goes out through them, 4
  channels each: int8 saves almost nothing there and costs the most accuracy.
- the cross-attention `attn2.to_k` / `attn2.to_v`. Their input is the text encoder's output, where a few
  tokens (CLIP's first) can be much larger than the rest; one scale for the whole tensor would squeeze
  the others into a few levels. They see only 77 tokens per prompt, so there is little time to save.
- any linear that gets fewer than MIN_ROWS rows (the timestep embedding: one row per image), where
  quantising costs more than the int8 product saves.

Weight deltas: on-the-fly deltas still add delta(x), computed in float32 from the float input. Merged
deltas change the weight, which is then quantised again. Speed and error: `tools/bench_int8.py` and
BENCHMARKS.md ("int8 UNet"). On our benchmark CPU (Zen 5, AVX512-VNNI and -BF16), a 1-thread UNet step
took 0.69x the float32 time, but the bf16 opt-in (`sd15.load(dtype=torch.bfloat16)`) took 0.51x.
"""

import math
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Conv2d, Linear, _deltas_for, _plus_deltas, cpu_fast_path

FLOAT_LAYERS = ("conv_in", "conv_out", "attn2.to_k", "attn2.to_v")   # name suffixes kept in float32
MIN_ROWS = 16
RESPONSE_SHAPES = 2         # input shapes per conv whose zero-point correction is kept (see _PackedWeight.conv)

# torch deprecates its quantized tensor type. We use one only for a moment, inside quantize_activation,
# where it is the fast native quantiser, and then read its bytes as plain uint8. That is why we silence
# this one warning, by its text. quantize_activation has a plain-op fallback for when the type goes.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                        category=UserWarning)


def int8_available() -> bool:
    """Whether this torch has oneDNN's int8 conv and matmul (x86 CPU builds do)."""
    onednn = torch.ops.onednn
    return (torch.backends.mkldnn.is_available() and hasattr(onednn, "qconv2d_pointwise")
            and hasattr(onednn, "qlinear_pointwise"))


# ---- quantisation --------------------------------------------------------------------------------------

def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per output channel: (int8 weight, float32 scales); W ≈ q * scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=tuple(range(1, w.dim()))).clamp(min=1e-12) / 127
    q = torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).clamp_(-127, 127).to(torch.int8)
    return q, scale


def activation_range(x: torch.Tensor) -> tuple[float, float]:
    """(scale, zero point) of asymmetric uint8 for x, from its min and max, with 0 exactly representable
    (zero padding and ReLU-like zeros stay exact)."""
    # A reduction over a channels-last tensor takes torch's slow strided path (10x slower); a dense
    # tensor's elements fill one block of memory, so reduce over that block in memory order instead.
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    flat = x.as_strided((x.numel(),), (1,)) if dense else x.reshape(-1)
    lo, hi = (float(v) for v in torch.aminmax(flat))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    return scale, int(min(255, max(0, round(-lo / scale))))


def quantize_activation(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """uint8 round(x / scale) + zero_point, clamped, with x's shape and memory layout."""
    if hasattr(torch, "quantize_per_tensor"):
        q = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)   # one vectorised pass
        # The quantized tensor's bytes are the uint8 values: view them instead of copying (int_repr).
        return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), 0, q.shape, q.stride())
    return quantize_activation_plain(x, scale, zero_point)


def quantize_activation_plain(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """The same with plain ops (about 5x slower): for a torch without quantized tensors."""
    y = torch.mul(x, 1.0 / scale)
    return y.round_().add_(zero_point).clamp_(0, 255).to(torch.uint8)


def int8_path(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and cpu_fast_path(x)


class _PackedWeight:
    """The int8 copy of one weight tensor (at one version), prepacked for oneDNN."""

    def __init__(self, module: nn.Module, weight: torch.Tensor, version: int, part: tuple[int, int] | None = None):
        self.source, self.version = weight, version
        bias = module.bias
        if part is not None:                               # rows `index` of `parts` (Linear.forward_part)
            weight, bias = module.part_parameters(*part)
        q, self.scale = quantize_weight(weight)
        self.zero_points = torch.zeros(q.shape[0], dtype=torch.int64)   # symmetric weights
        self.bias = None if bias is None else bias.detach().float()
        if isinstance(module, nn.Conv2d):
            # No input shape given: then oneDNN picks a layout that serves every input shape, and on our
            # measurements it runs as fast as one packed for the exact shape (unlike float32 convs).
            self.geometry = (list(module.stride), list(module.padding), list(module.dilation), module.groups)
            self.packed = torch.ops.onednn.qconv_prepack(q, self.scale, 1.0, 0, *self.geometry, None)
            # The correction (see conv) needs only each output channel's weight summed over its input
            # channels, per kernel tap: [out, 1, kh, kw]. Summed from the weight as int8 sees it, not the
            # float weight, or it would add the weight's rounding error times the shift.
            self._tap_sums = (q.float() * self.scale.view(-1, 1, 1, 1)).sum(dim=1, keepdim=True)
            self._responses: dict[torch.Size, torch.Tensor] = {}
            self._responses_lock = threading.Lock()
        else:
            self.packed = torch.ops.onednn.qlinear_prepack(q, None)

    def conv(self, qx: torch.Tensor, x_scale: float, x_zp: int) -> torch.Tensor:
        """conv(x) for qx = round(x / x_scale) + x_zp.

        The zero point is not handed to oneDNN: with one, its int8 conv ran 2.2x slower on the UNet's
        16x16 and 8x8 convs (compensation computed on every call). Read with zero point 0, the same bytes
        mean x + x_zp * x_scale, and conv(x + c) = conv(x) + c * conv(ones) (bias-free, with the same zero
        padding), so we subtract c times that response, computed once per input shape from the int8
        weight: the result is what oneDNN computes with the zero point, to float rounding. As every input
        channel of `ones` is the same, the response is a one-channel conv with the tap sums."""
        out = torch.ops.onednn.qconv2d_pointwise(qx, x_scale, 0, self.packed, self.scale, self.zero_points,
                                                 self.bias, *self.geometry, 1.0, 0, torch.float32,
                                                 "none", [], "")
        if x_zp:
            out.add_(self._ones_response(qx.shape), alpha=-x_zp * x_scale)
        return out

    def _ones_response(self, shape: torch.Size) -> torch.Tensor:
        key = shape[1:]                                    # the same for every image of a batch
        response = self._responses.get(key)
        if response is None:
            with self._responses_lock:
                response = self._responses.get(key)
                if response is None:
                    stride, padding, dilation, _groups = self.geometry
                    ones = torch.ones(1, 1, *key[1:], dtype=torch.float32)
                    response = F.conv2d(ones, self._tap_sums, None, stride, padding,
                                        dilation).contiguous(memory_format=torch.channels_last)
                    # Keep the latest few shapes, so two sizes in turn (a hires fix) do not recompute.
                    kept = dict(list(self._responses.items())[1 - RESPONSE_SHAPES:]) if RESPONSE_SHAPES > 1 else {}
                    kept[key] = response
                    self._responses = kept
        return response

    def linear(self, qx: torch.Tensor, x_scale: float, x_zp: int) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(qx, x_scale, x_zp, self.packed, self.scale, self.zero_points,
                                                  self.bias, 1.0, 0, torch.float32, "none", [], "")


class _Int8Weights:
    """Mixin for the int8 layers: the packed int8 weight, kept valid for the current weight tensor."""

    _int8: dict[tuple[int, int] | None, _PackedWeight]   # the whole weight (None), or a part of its rows
    _int8_lock: threading.Lock

    def _init_int8(self) -> None:
        self._int8, self._int8_lock = {}, threading.Lock()

    def _int8_weight(self, part: tuple[int, int] | None = None) -> _PackedWeight:
        w = self.weight
        version = 0 if w.is_inference() else w._version    # inference tensors keep no version counter
        packed = self._int8.get(part)
        if packed is not None and packed.source is w and packed.version == version:
            return packed
        with self._int8_lock:                              # one thread packs; the others wait and reuse it
            packed = self._int8.get(part)
            if packed is None or packed.source is not w or packed.version != version:
                packed = _PackedWeight(self, w, version, part)
                fresh = {k: v for k, v in self._int8.items() if v.source is w and v.version == version}
                self._int8 = fresh | {part: packed}        # one assignment: readers see old or new, whole
        return packed

    def _apply(self, fn, recurse=True):                    # .to(), .float(), ...: the weight changes
        self._int8 = {}
        return super()._apply(fn, recurse)

    def __getstate__(self):                                # deepcopy / pickle: no oneDNN tensors, no locks
        return {k: v for k, v in super().__getstate__().items() if k not in ("_int8", "_int8_lock")}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._init_int8()


class Int8Linear(_Int8Weights, Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._int8_forward(x, None)
        return super().forward(x) if out is None else out

    def forward_part(self, x: torch.Tensor, index: int, parts: int) -> torch.Tensor:
        out = self._int8_forward(x, (index, parts))
        return super().forward_part(x, index, parts) if out is None else out

    def _int8_forward(self, x: torch.Tensor, part: tuple[int, int] | None) -> torch.Tensor | None:
        """The int8 result (of the weight's rows `part`, or all), or None where float32 runs instead."""
        if not int8_path(x) or x.numel() < MIN_ROWS * self.in_features:
            return None
        x = x.contiguous()
        scale, zp = activation_range(x)
        if not math.isfinite(scale):                       # inf / nan input: let float32 propagate it
            return None
        out = self._int8_weight(part).linear(quantize_activation(x, scale, zp), scale, zp)
        return _plus_deltas(out, x, _deltas_for(self), part)


class Int8Conv2d(_Int8Weights, Conv2d):
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not int8_path(x) or self.padding_mode != "zeros":
            return super().forward(x, residual)
        x = x.contiguous(memory_format=torch.channels_last)
        scale, zp = activation_range(x)
        if not math.isfinite(scale):
            return super().forward(x, residual)
        out = self._int8_weight().conv(quantize_activation(x, scale, zp), scale, zp)
        deltas = _deltas_for(self)
        if deltas:
            out = _plus_deltas(out, x, deltas)
        # oneDNN's int8 "sum" would write the result into the residual tensor itself, which the caller
        # may still hold: add it to our fresh output instead.
        return out if residual is None else out.add_(residual)


_INT8_OF = {Linear: Int8Linear, Conv2d: Int8Conv2d}
_FLOAT_OF = {v: k for k, v in _INT8_OF.items()}


def quantize_int8(model: nn.Module, keep_float: tuple[str, ...] = FLOAT_LAYERS) -> int:
    """Make the model's Linear and Conv2d layers run int8 on CPU float32 inference (in place); returns how
    many layers it switched. Layers whose name ends with one of `keep_float` stay float32. The model must
    be float32 on the CPU and not compiled."""
    if not int8_available():
        raise RuntimeError("this torch has no oneDNN int8 kernels (torch.ops.onednn.qconv2d_pointwise); "
                           "int8 needs torch's x86 CPU build with mkldnn")
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise ValueError("quantize_int8 on a compiled model: the compiled graph would keep running float32; "
                         "quantize the model and do not compile it (or compile without int8)")
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in _INT8_OF and not name.endswith(keep_float)]
    for name, m in targets:
        if m.weight.device.type != "cpu" or m.weight.dtype != torch.float32:
            raise ValueError(f"{name} has a {m.weight.dtype} weight on {m.weight.device}: int8 is for the "
                             "float32 CPU engine; load the model with device='cpu', dtype=torch.float32")
    for _, m in targets:
        m.__class__ = _INT8_OF[type(m)]
        m._init_int8()
    return len(targets)


def dequantize_int8(model: nn.Module) -> int:
    """Undo `quantize_int8` (in place): the layers run their float32 path again and the int8 copies are
    freed. The weights were never changed, so the model is bit for bit what it was. Returns the count."""
    count = 0
    for m in model.modules():
        if type(m) in _FLOAT_OF:
            del m._int8, m._int8_lock
            m.__class__ = _FLOAT_OF[type(m)]
            count += 1
    return count


def is_int8(model: nn.Module) -> bool:
    """Whether any layer of the model runs int8 (`quantize_int8` was applied)."""
    return any(type(m) in _FLOAT_OF for m in model.modules())
