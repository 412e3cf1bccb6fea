"""A row's grid: every list-valued column is an axis, and the row makes one image per point of their
product, like A1111's X/Y/Z plot.

    fixed, axes = split_axes({"prompt": "a cat", "seed": [1, 2], "cfg": [5, 7]})
    for point in points(fixed, axes):      # 4 points: seed 1 cfg 5, seed 1 cfg 7, seed 2 cfg 5, ...
        point.fields, point.parts          # the point's values; (axis key, value label) for its id

Axes come in the order their columns appear in the row (the first is the contact sheet's columns, the
second its rows). `loras` is a list by nature: its weights may be lists instead (`[["style", [0.4, 0.8]]]`),
each such list an axis. A row may make at most MAX_POINTS images.
"""

import itertools
import re
from dataclasses import dataclass

from .fields import RowError, lora_specs, parse_value
from .ids import value_labels

MAX_POINTS = 10_000


@dataclass(frozen=True)
class Axis:
    key: str                # in ids: the column ("cfg"), or "lora-NAME" / "lora-NAME-te" for LoRA weights
    label: str              # on the contact sheet: "cfg", "lora style"
    column: str
    values: tuple
    lora: tuple[int, int] | None = None      # LoRA weights: (index of the LoRA in `loras`, weight slot 1 or 2)

    @property
    def labels(self) -> list[str]:
        return value_labels(list(self.values))


@dataclass(frozen=True)
class Point:
    fields: dict                              # canonical column -> value
    parts: tuple[tuple[str, str], ...]        # (axis key, value label), in axis order
    values: tuple                             # the axis values of this point, in axis order


def split_axes(values: dict) -> tuple[dict, list[Axis]]:
    """Canonical columns -> their parsed fixed values and the grid axes (lists), in the row's order."""
    fixed: dict[str, object] = {}
    axes: list[Axis] = []
    for column, value in values.items():
        if column == "loras":
            fixed[column] = specs = lora_specs(value)
            axes += _lora_axes(specs)
        elif isinstance(value, list):
            if column == "id":
                raise RowError("id cannot be a list: a grid's images get the row's id plus their point")
            if not value:
                raise RowError(f"{column} is an empty list: give at least one value")
            parsed = tuple(parse_value(column, v) for v in value)
            if len(set(map(repr, parsed))) != len(parsed):
                raise RowError(f"{column} lists a value twice: {value!r}")
            axes.append(Axis(column, column, column, parsed))
        else:
            fixed[column] = parse_value(column, value)
    return fixed, axes


def _lora_axes(specs: list[list]) -> list[Axis]:
    axes = []
    for index, (name, *weights) in enumerate(specs):
        key = "lora-" + re.sub(r"[^A-Za-z0-9_+-]", "_", name.rsplit("/", 1)[-1].rsplit(".", 1)[0])[:32]
        for slot, weight in enumerate(weights, start=1):
            if isinstance(weight, list):
                part = "" if len(weights) == 1 else ("-te" if slot == 1 else "-unet")
                axes.append(Axis(key + part, f"lora {name}" + part.replace("-", " "), "loras", tuple(weight),
                                 (index, slot)))
    return axes


def points(fixed: dict, axes: list[Axis]) -> list[Point]:
    """Every point of the grid (one point, the row itself, without axes), the last axis varying fastest."""
    count = 1
    for axis in axes:
        count *= len(axis.values)
    if count > MAX_POINTS:
        raise RowError(f"the row's grid has {count} points ({' x '.join(str(len(a.values)) for a in axes)}); "
                       f"at most {MAX_POINTS} per row: split it into several rows")
    labels = [axis.labels for axis in axes]
    out = []
    for combo in itertools.product(*(range(len(a.values)) for a in axes)):
        fields = {k: ([list(spec) for spec in v] if k == "loras" else v) for k, v in fixed.items()}
        for axis, i in zip(axes, combo):
            if axis.lora is None:
                fields[axis.column] = axis.values[i]
            else:
                spec_index, slot = axis.lora
                fields["loras"][spec_index][slot] = axis.values[i]
        out.append(Point(fields, tuple((a.key, labels[n][i]) for n, (a, i) in enumerate(zip(axes, combo))),
                         tuple(a.values[i] for a, i in zip(axes, combo))))
    return out


def canonical_row(fixed: dict, axes: list[Axis]) -> dict:
    """What a row's derived id hashes: its fixed values (LoRA weight lists included) and its axes' values."""
    return {"fields": {k: v for k, v in fixed.items() if k != "id"},
            "axes": [[a.key, list(a.values)] for a in axes if a.lora is None]}
