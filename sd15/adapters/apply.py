"""Adapters on a model, for one generation: merged into the weights, or applied on the fly.

    loras = [Use(adapter, te=0.8, unet=0.8), ...]
    with merged(text_encoder, unet, loras):      # W' = W + Σ m·ΔW, summed in float32, one rounding
        ...                                      # the originals go back bit for bit afterwards
    with on_the_fly(text_encoder, unet, loras):  # y = W·x + m·U(D(x)): weights untouched, this thread only
        ...

Several adapters apply in order, each to the weight the previous ones made (A1111's order: a plain sum
for LoRA/LoHa/LoKr, order-dependent only with DoRA). The text encoder's modules take `te`, the UNet's
`unet` (A1111's `<lora:name:te:unet>`).
"""

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blocks import Delta, deltas_active, replace_weight, restore_weight
from .deltas import Factors, apply_dora, kind_of, module_delta, scale_of
from .files import AdapterFile
from .names import TEXT, UNET


@dataclass(frozen=True)
class Use:
    """One adapter in a generation, with its strengths (and A1111's DyLoRA rank cut, `dyn`)."""
    adapter: AdapterFile
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None


def _factors(use: Use, factors: Factors) -> Factors:
    """A1111's `dyn=`: keep the first `dyn` ranks of a LoRA's up and down."""
    if use.dyn is None or "lora_up.weight" not in factors:
        return factors
    out = dict(factors)
    out["lora_up.weight"] = factors["lora_up.weight"][:, :use.dyn]
    out["lora_down.weight"] = factors["lora_down.weight"][:use.dyn]
    return out


def targets(text_encoder: nn.Module, unet: nn.Module, uses: Sequence[Use]) -> dict[nn.Module, list[tuple[Use, Factors]]]:
    """Each module an adapter touches, with what touches it, in order. Every adapter's ΔW is checked to
    have its module's weight shape first: a ValueError names the file, the module and both shapes."""
    models = {TEXT: text_encoder, UNET: unet}
    found: dict[nn.Module, list[tuple[Use, Factors]]] = {}
    for use in uses:
        for (component, path), factors in use.adapter.modules.items():
            module = models[component].get_submodule(path)
            factors = _factors(use, factors)
            with torch.device("meta"):               # shapes only: nothing is computed or allocated
                try:
                    module_delta({k: v.to("meta") if v.dim() else v for k, v in factors.items()}, module.weight.shape)
                except ValueError as e:
                    where = "text encoder" if component == TEXT else "UNet"
                    raise ValueError(f"{use.adapter.path}: {where} module {path}: {e}") from None
            found.setdefault(module, []).append((use, factors))
    return found


def new_weight(module: nn.Module, changes: list[tuple[Use, Factors]], component_of) -> torch.Tensor:
    """The module's weight after every change, summed in float32 (or wider), rounded once to its dtype."""
    weight = module.weight
    current = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    for use, factors in changes:
        strength = use.te if component_of(module) == TEXT else use.unet
        try:
            delta = module_delta(factors, weight.shape).to(current.device, current.dtype)
        except ValueError as e:
            raise ValueError(f"{use.adapter.path}: {e}") from None
        if "dora_scale" in factors:
            current = apply_dora(current, delta, factors["dora_scale"].to(current.device), strength)
        else:
            current = current + strength * delta
    return current.to(weight.dtype)


def _component_of(text_encoder: nn.Module):
    text_modules = set(text_encoder.modules())
    return lambda module: TEXT if module in text_modules else UNET


@contextlib.contextmanager
def merged(text_encoder: nn.Module, unet: nn.Module, uses: Sequence[Use]) -> Iterator[None]:
    """Within the block the models hold W + ΔW; afterwards their original weight tensors themselves."""
    component_of = _component_of(text_encoder)
    originals = []
    try:
        for module, changes in targets(text_encoder, unet, uses).items():
            with torch.inference_mode(False):
                weight = new_weight(module, changes, component_of)
            originals.append((module, replace_weight(module, weight)))
        yield
    finally:
        for module, original in reversed(originals):
            restore_weight(module, original)


class KeptMerge:
    """Adapters left merged in two models between generations, as A1111 leaves its LoRAs: the same set
    again (the same files, by identity, and strengths, in order) costs nothing; another set first puts the
    original weight tensors back. A merge of LCM-LoRA into SD1.5's UNet took 3.6-7.4 s on our benchmark
    machine, and the merged convs' weights must be prepacked again (see blocks.Conv2d) both ways.

    Not thread-safe: whoever calls `switch` or `restore` has the models alone (Pipeline's exclusive lock)."""

    def __init__(self, text_encoder: nn.Module, unet: nn.Module):
        self._models = (text_encoder, unet)
        self._uses: tuple[Use, ...] = ()
        self._stack = contextlib.ExitStack()

    @property
    def uses(self) -> tuple[Use, ...]:
        return self._uses

    def holds(self, uses: Sequence[Use]) -> bool:
        return len(uses) == len(self._uses) and all(
            a.adapter is b.adapter and (a.te, a.unet, a.dyn) == (b.te, b.unet, b.dyn) for a, b in zip(uses, self._uses))

    def switch(self, uses: Sequence[Use]) -> None:
        """Make `uses` the merged set (none: the original weights)."""
        if self.holds(uses):
            return
        self.restore()
        if uses:
            stack = contextlib.ExitStack()
            stack.enter_context(merged(*self._models, uses))   # a failure here has already restored
            self._stack, self._uses = stack, tuple(uses)

    def restore(self) -> None:
        """Put every original weight tensor back, bit for bit."""
        stack, self._stack, self._uses = self._stack, contextlib.ExitStack(), ()
        stack.close()


def _low_rank(module: nn.Module, factors: Factors, factor: float) -> Delta:
    """m·scale·U(D(x)) for a LoRA / LoCon (/ Tucker) on a Linear or Conv2d, in the module's dtype."""
    dtype, device = module.weight.dtype, module.weight.device
    scale = factor * scale_of(factors)
    up = factors["lora_up.weight"].to(device, dtype)
    down = factors["lora_down.weight"].to(device, dtype)
    if isinstance(module, nn.Conv2d):
        up = up.reshape(*up.shape[:2], 1, 1)
        mid = factors.get("lora_mid.weight")
        if mid is not None:      # 1x1 down, the kernel on the core, 1x1 up
            down = down.reshape(*down.shape[:2], 1, 1)
            mid = mid.to(device, dtype)
            return lambda x: scale * F.conv2d(F.conv2d(F.conv2d(x, down), mid, None, module.stride, module.padding,
                                                       module.dilation), up)
        down = down.reshape(down.shape[0], module.in_channels, *module.kernel_size)
        return lambda x: scale * F.conv2d(F.conv2d(x, down, None, module.stride, module.padding, module.dilation), up)
    return lambda x: scale * F.linear(F.linear(x, down), up)


def _dense(module: nn.Module, delta: torch.Tensor) -> Delta:
    if isinstance(module, nn.Conv2d):
        return lambda x: F.conv2d(x, delta, None, module.stride, module.padding, module.dilation, module.groups)
    return lambda x: F.linear(x, delta)


@contextlib.contextmanager
def on_the_fly(text_encoder: nn.Module, unet: nn.Module, uses: Sequence[Use]) -> Iterator[None]:
    """Within the block (this thread only) each touched module adds its adapters' outputs. LoRA and LoCon
    run as their two small layers; LoHa, LoKr and DoRA, which have no such form, as their dense ΔW."""
    component_of = _component_of(text_encoder)
    mapping: dict[nn.Module, list[Delta]] = {}
    for module, changes in targets(text_encoder, unet, uses).items():
        low_rank = all(kind_of(f).startswith(("LoRA", "LoCon")) and "dora_scale" not in f for _, f in changes)
        if low_rank:
            mapping[module] = [_low_rank(module, f, u.te if component_of(module) == TEXT else u.unet)
                               for u, f in changes]
        else:
            with torch.inference_mode(False):
                weight = new_weight(module, changes, component_of)
                delta = (weight.to(torch.float32) - module.weight.detach().to(torch.float32)).to(weight.dtype)
            mapping[module] = [_dense(module, delta)]
    with deltas_active(mapping):
        yield
