"""Building blocks shared by the models: `Linear` and `Conv2d` (with a CPU fast path and the weight-delta
seam), and the UNet's and VAE's ResBlock, Downsample and Upsample.

CPU fast path. On CPU, PyTorch runs nn.Linear through MKL's sgemm, and every conv call first re-lays-out
its weight for oneDNN. oneDNN (shipped inside PyTorch) does both better: its matmul ran about twice as
fast as MKL's on our benchmark machine, and a conv weight laid out once ("prepacked") makes the UNet's
small convs much faster; conv activations stay channels-last, which oneDNN reads without a reorder.
Same float32 math (outputs within ~1e-6 relative of the plain ops). It applies to CPU inference in
float32, and in bfloat16 where oneDNN supports it; not to autograd or autocast.
`torch.backends.mkldnn.flags(enabled=False)` turns it off. Figures: BENCHMARKS.md.

Weight deltas (LoRA and its relatives) have one seam, here, for every Linear and Conv2d of all three models:
- on the fly: inside `with deltas_active({module: [delta, ...]})`, each listed module adds `delta(x)` to its
  output. The mapping lives in a context variable, so it belongs to the calling thread (or asyncio task):
  two generations with different adapters can share one model. torch.compile cannot trace a context
  variable, so a compiled model sees no on-the-fly deltas: merge them instead.
- merged: `merge_delta(module, ΔW)` replaces the weight by (W + ΔW), computed in float32 and rounded once to
  the weight's dtype, and returns the original Parameter; `restore_weight(module, original)` puts that very
  tensor back, so removal is exact to the bit. Merging changes the shared model: not while it generates.
"""

import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Delta = Callable[[torch.Tensor], torch.Tensor]   # layer input -> addition to the layer's output


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


# ---- the weight-delta seam ---------------------------------------------------------------------------

_ACTIVE_DELTAS: contextvars.ContextVar[Mapping[nn.Module, tuple[Delta, ...]] | None] = contextvars.ContextVar(
    "sd15_active_deltas", default=None)


@contextlib.contextmanager
def deltas_active(deltas: Mapping[nn.Module, Sequence[Delta]]) -> Iterator[None]:
    """Within the block, each module in `deltas` adds its deltas' outputs to its own (this thread only).
    A nested block adds to the deltas of the blocks around it."""
    active = dict(_ACTIVE_DELTAS.get() or {})
    for module, fns in deltas.items():
        active[module] = active.get(module, ()) + tuple(fns)
    token = _ACTIVE_DELTAS.set(active)
    try:
        yield
    finally:
        _ACTIVE_DELTAS.reset(token)


def active_deltas() -> Mapping[nn.Module, tuple[Delta, ...]]:
    """The on-the-fly deltas in effect for the calling thread ({} outside any `deltas_active`)."""
    return _ACTIVE_DELTAS.get() or {}


def _deltas_for(module: nn.Module) -> tuple[Delta, ...]:
    if torch.compiler.is_compiling():
        return ()
    active = _ACTIVE_DELTAS.get()
    return active.get(module, ()) if active else ()


def _plus_deltas(out: torch.Tensor, x: torch.Tensor, deltas: tuple[Delta, ...],
                 part: tuple[int, int] | None = None) -> torch.Tensor:
    """out + Σ delta(x); with part = (index, parts), only those output columns (Linear.forward_part)."""
    for delta in deltas:
        d = delta(x)
        out = out + (d if part is None else d.chunk(part[1], -1)[part[0]])
    return out


def merge_delta(module: "Linear | Conv2d", delta: torch.Tensor) -> nn.Parameter:
    """Set module.weight = W + ΔW (sum in float32 or wider, one rounding); return the original Parameter."""
    original = module.weight
    wide = torch.promote_types(original.dtype, torch.float32)
    merged = original.to(wide) + delta.reshape(original.shape).to(original.device, wide)
    return replace_weight(module, merged.to(original.dtype))


def replace_weight(module: "Linear | Conv2d", weight: torch.Tensor) -> nn.Parameter:
    """Give the module a new weight tensor (never written into the old one, which may be shared or
    memory-mapped from a file); return the original Parameter for `restore_weight`."""
    original = module.weight
    if weight.shape != original.shape or weight.dtype != original.dtype:
        raise ValueError(f"new weight {tuple(weight.shape)} {weight.dtype} for a {tuple(original.shape)} "
                         f"{original.dtype} weight")
    module.weight = nn.Parameter(weight, requires_grad=False)
    return original


def restore_weight(module: "Linear | Conv2d", original: nn.Parameter) -> None:
    """Undo `merge_delta`: the original tensor itself goes back, bit for bit."""
    module.weight = original


# ---- layers --------------------------------------------------------------------------------------------

def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b: oneDNN's matmul on the CPU fast path, F.linear elsewhere."""
    if cpu_fast_path(x):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _linear(x, self.weight, self.bias)
        deltas = _deltas_for(self)
        return _plus_deltas(out, x, deltas) if deltas else out

    def part_parameters(self, index: int, parts: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight rows and bias entries of output part `index` of `parts`."""
        return self.weight.chunk(parts)[index], None if self.bias is None else self.bias.chunk(parts)[index]

    def forward_part(self, x: torch.Tensor, index: int, parts: int) -> torch.Tensor:
        """`self(x).chunk(parts, -1)[index]` computed alone, as one matmul with those rows of the weight: the
        result is a tensor of its own, contiguous, that the caller may overwrite (see unet.GEGLU)."""
        return _plus_deltas(_linear(x, *self.part_parameters(index, parts)), x, _deltas_for(self), (index, parts))


class Conv2d(nn.Conv2d):
    """nn.Conv2d; on the CPU fast path, channels-last input and a prepacked weight.

    The prepacked weight is a second copy of the weight in oneDNN's layout for one input shape. Each
    module keeps those for its last PACKED_SHAPES input shapes (so two generations of different sizes,
    on two threads or a hires fix's two passes, do not repack on every call), each valid only for the
    weight tensor and version it was made from. For the full UNet in float32 one set is +2.4 GB.
    """

    PACKED_SHAPES = 2

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._packed: dict[torch.Size, tuple[torch.Tensor, int, torch.Tensor]] = {}   # shape -> (weight, version, packed)
        self._pack_lock = threading.Lock()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """conv(x), plus `residual` if given (on the fast path oneDNN adds it as the output is written)."""
        deltas = _deltas_for(self)
        if not cpu_fast_path(x) or self.padding_mode != "zeros":
            out = _plus_deltas(super().forward(x), x, deltas)
            return out if residual is None else out + residual
        x = x.contiguous(memory_format=torch.channels_last)
        args = (self._prepacked(x.shape), self.bias, self.padding, self.stride, self.dilation, self.groups)
        if residual is not None and not deltas:       # oneDNN adds the residual as it writes the output
            residual = residual.contiguous(memory_format=torch.channels_last)
            return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args, "add", None, None, [], None)
        out = _plus_deltas(torch.ops.mkldnn._convolution_pointwise(x, *args, "none", [], ""), x, deltas)
        return out if residual is None else out + residual

    def _prepacked(self, shape: torch.Size) -> torch.Tensor:
        w = self.weight
        version = 0 if w.is_inference() else w._version    # inference tensors keep no version counter
        cached = self._packed.get(shape)
        if cached is not None and cached[0] is w and cached[1] == version:
            return cached[2]
        with self._pack_lock:
            cached = self._packed.get(shape)              # another thread may have packed it meanwhile
            if cached is not None and cached[0] is w and cached[1] == version:
                return cached[2]
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), self.padding, self.stride,
                                                               self.dilation, self.groups, list(shape))
            entries = {s: e for s, e in self._packed.items() if s != shape and e[0] is w and e[1] == version}
            while len(entries) >= self.PACKED_SHAPES:
                entries.pop(next(iter(entries)))               # the oldest shape
            entries[shape] = (w, version, packed)
            self._packed = entries                              # one assignment: readers see old or new, whole
        return packed

    def _apply(self, fn, recurse=True):          # .to(), .float(), ...: the weight changes
        self._packed = {}
        return super()._apply(fn, recurse)

    def __getstate__(self):                      # deepcopy / pickle: oneDNN tensors and locks cannot be copied
        return {k: v for k, v in self.__dict__.items() if k not in ("_packed", "_pack_lock")}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._packed, self._pack_lock = {}, threading.Lock()


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual; the UNet variant adds the timestep embedding in between.

    The UNet uses GroupNorm eps 1e-5 and the VAE 1e-6: callers pass `eps` (docs/architecture.md, "Numerics").
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
