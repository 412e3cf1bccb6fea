"""Building blocks shared by the models: `Linear` and `Conv2d` with a CPU fast path, and the UNet's and
VAE's ResBlock, Downsample and Upsample.

CPU fast path. On CPU, PyTorch runs nn.Linear through MKL's sgemm, and every conv call first re-lays-out
its weight for oneDNN. oneDNN (shipped inside PyTorch) does both better: on the AMD EPYC of BENCHMARKS.md
its matmul runs 2.2x faster than MKL's, and a conv weight laid out once ("prepacked") makes the UNet's
8x8-32x32 convs up to 2.7x faster; conv activations stay channels-last, which oneDNN reads without a
reorder. Same float32 math (outputs within ~1e-6 relative of the plain ops). It applies to CPU inference
in float32, and in bfloat16 where oneDNN supports it (a bf16 UNet step then takes 0.87x the plain bf16
ops' time on the AVX512-BF16 CPU of BENCHMARKS.md); not to autograd or autocast. `torch.backends.mkldnn.flags(enabled=False)`
turns it off.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn


def cpu_fast_path(x: torch.Tensor) -> bool:
    # Not under torch.compile (tested first, so it traces cleanly): Inductor fuses and prepacks the plain ops.
    return (not torch.compiler.is_compiling() and x.device.type == "cpu"
            and (x.dtype == torch.float32 or x.dtype == torch.bfloat16 and _native_bf16())
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


@functools.cache
def _native_bf16() -> bool:
    """oneDNN's own test for bf16 support (AVX-512 or newer on x86); measured only with AVX512-BF16."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_fast_path(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    """nn.Conv2d; on the CPU fast path, channels-last input and a prepacked weight.

    The prepacked weight is a second copy, kept per module for the last input shape and rebuilt when the
    weight is replaced or changed in place (for the UNet in float32: +2.4 GB, ~20% faster steps).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed = None          # (weight, its version, input shape, prepacked weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """conv(x), plus `residual` if given (on the fast path oneDNN adds it as the output is written)."""
        if not cpu_fast_path(x) or self.padding_mode != "zeros":
            out = super().forward(x)
            return out if residual is None else out + residual
        x = x.contiguous(memory_format=torch.channels_last)
        args = (self._prepacked(x.shape), self.bias, self.padding, self.stride, self.dilation, self.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, *args, "none", [], "")
        residual = residual.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args, "add", None, None, [], None)

    def _prepacked(self, shape: torch.Size) -> torch.Tensor:
        w, cached = self.weight, self._packed
        version = 0 if w.is_inference() else w._version    # inference tensors keep no version counter
        if cached is None or cached[0] is not w or cached[1] != version or cached[2] != shape:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), self.padding, self.stride,
                                                               self.dilation, self.groups, list(shape))
            self._packed = cached = (w, version, shape, packed)
        return cached[3]

    def _apply(self, fn, recurse=True):          # .to(), .float(), ...: the weight changes
        self._packed = None
        return super()._apply(fn, recurse)

    def __getstate__(self):                      # deepcopy / pickle: oneDNN tensors cannot be copied
        return {**self.__dict__, "_packed": None}


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual; the UNet variant adds the timestep embedding in between.

    The UNet uses GroupNorm eps 1e-5 and the VAE 1e-6: callers pass `eps` (DESIGN.md §3).
    """

    def __init__(self, in_ch: int, out_ch: int, groups: int, eps: float, time_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = Linear(time_dim, out_ch) if time_dim else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        # A 1x1 conv only where the width changes; otherwise the residual passes through untouched.
        self.skip = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        # SiLU in place: the normalised tensor is fresh and used once (saves a full-size allocation).
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        if self.time_proj is not None:
            h = h + self.time_proj(F.silu(time_emb))[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h), inplace=True), residual=self.skip(x))


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The UNet pads 1 on every side; the VAE encoder pads only right and bottom."""

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to an explicit size, so odd skip sizes line up), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            size = (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
