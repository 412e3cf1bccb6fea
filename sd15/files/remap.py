"""Rename a component's original-layout tensors to engine names, checking everything on the way.

Every source key must be mapped, every target filled, shapes must agree: a checkpoint that does not fit
is reported by name here, before anything is loaded into a model.
"""

from collections.abc import Iterable

import torch

from . import transforms
from .errors import CheckpointError

_SHOW = 8   # how many offending names to quote in a message


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def remap(source: dict[str, torch.Tensor], key_map: dict[str, str], target_shapes: dict[str, torch.Size],
          *, component: str, transform_names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Return `source` renamed through `key_map`, ready for `load_state_dict(strict=True, assign=True)`.

    `target_shapes` is the engine module's `{name: shape}`; `transform_names` names a layout transform
    (see `sd15.files.transforms`) for the source keys that need one.
    """
    transform_names = transform_names or {}
    # Programmer errors: the map itself must be one-to-one onto the engine's parameters.
    assert len(set(key_map.values())) == len(key_map), "key map is not one-to-one"
    assert set(key_map.values()) == set(target_shapes), (
        f"key map does not cover the {component} module: "
        f"{_listing(set(target_shapes) ^ set(key_map.values()))}")

    unknown = set(source) - set(key_map)
    if unknown:
        raise CheckpointError(f"{component}: {len(unknown)} unexpected tensor(s) in the checkpoint: "
                              f"{_listing(unknown)}")
    missing = set(key_map) - set(source)
    if missing:
        raise CheckpointError(f"{component}: {len(missing)} tensor(s) missing from the checkpoint: "
                              f"{_listing(missing)}")

    out, wrong = {}, []
    for src, dst in key_map.items():
        tensor, want = source[src], tuple(target_shapes[dst])
        name = transform_names.get(src)
        if name is not None:
            want_src = tuple(transforms.invert(name, torch.empty(want, device="meta")).shape)
            if tuple(tensor.shape) != want_src:
                wrong.append(f"{src} {tuple(tensor.shape)} (expected {want_src})")
                continue
            tensor = transforms.apply(name, tensor)
        elif tuple(tensor.shape) != want:
            wrong.append(f"{src} {tuple(tensor.shape)} (expected {want})")
            continue
        out[dst] = tensor
    if wrong:
        raise CheckpointError(f"{component}: {len(wrong)} tensor(s) have the wrong shape: {_listing(wrong)}")
    return out


def invert_map(key_map: dict[str, str], tensors: dict[str, torch.Tensor],
               transform_names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Engine-named tensors -> original names and layouts (for tools that write test checkpoints)."""
    transform_names = transform_names or {}
    out = {}
    for src, dst in key_map.items():
        tensor = tensors[dst]
        if src in transform_names:
            tensor = transforms.invert(transform_names[src], tensor)
        out[src] = tensor
    return out
