"""ControlNet preprocessors that need no model: Canny edges, invert, and passing the image through.

    edges = canny(photo, low=100, high=200)         # RGB, white edges on black, photo's size
    fn, defaults = PREPROCESSORS["canny"]           # the table a Control looks its preprocessor up in
    describe("canny", {"low": 100, "high": 200})    # {"Module": "canny", "Threshold A": "100", "Threshold B": "200"}

`canny` computes exactly what A1111's ControlNet extension gets from OpenCV: its canny preprocessor
(scripts/preprocessor/model_free_preprocessors.py, PreprocessorCanny) calls
`cv2.Canny(rgb_uint8_hwc, int(low), int(high))` on the 3-channel RGB image (aperture 3, L1 gradient, the
defaults) and turns the 1-channel result into RGB. It resizes first (short side to the processor
resolution, 512 unless pixel-perfect, edge-padded to a multiple of 64); here the caller resizes: this runs
at the size it is given. The steps are OpenCV's modules/imgproc/src/canny.cpp, in numpy:
  gradient   3x3 Sobel per channel, replicated borders (BORDER_REPLICATE); per pixel the channel with the
             largest L1 magnitude |dx| + |dy| (the first of equals, R before G before B) gives dx, dy, m
  NMS        OpenCV's integer sectors: with TG22 = round(tan 22.5° · 2^15), |dy|·2^15 < |dx|·TG22 is
             horizontal (m > left, m >= right), > |dx|·(TG22 + 2^16) vertical (m > above, m >= below),
             else diagonal along the signs of dx, dy (strictly greater than both); outside the image m = 0
  hysteresis pixels that survive NMS with m > floor(low) are kept when 8-connected through such pixels
             to one with m > floor(high); low > high are swapped first, as OpenCV does
The tests compare it with cv2.Canny pixel for pixel (opencv-python-headless is a test dependency only).

`describe` gives the entries of A1111's infotext unit (`ControlNet 0: "Module: canny, ..."`) that belong
to the preprocessor: "Module" and, for canny, "Threshold A" (low) and "Threshold B" (high), the sliders
the extension stores the thresholds in.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from .images import to_rgb

TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)   # tan(22.5°) in OpenCV's 15-bit fixed point
DEFAULT_LOW, DEFAULT_HIGH = 100, 200                                # A1111's canny sliders


def canny(image: Image.Image, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH) -> Image.Image:
    """Canny edges of `image` as OpenCV's cv2.Canny(rgb, low, high) finds them: RGB, 255 on edges, 0 elsewhere."""
    rgb = _rgb_array(image, "canny")
    low, high = _threshold(low, "low"), _threshold(high, "high")
    if low > high:                      # OpenCV swaps them
        low, high = high, low
    h, w = rgb.shape[:2]
    if h == 0 or w == 0:
        return Image.new("RGB", (w, h))
    dx, dy, m = _gradient(rgb)
    candidate = _non_maximum(dx, dy, m) & (m > low)
    edges = _hysteresis(candidate, candidate & (m > high))
    return Image.fromarray(np.repeat((edges * np.uint8(255))[:, :, None], 3, axis=2), mode="RGB")


def invert(image: Image.Image) -> Image.Image:
    """255 − x on the RGB image: a drawing in black lines on white becomes the white-on-black hint that
    scribble / lineart / canny ControlNets were trained on (A1111's "invert (from white bg & black line)")."""
    return Image.fromarray(255 - _rgb_array(image, "invert"), mode="RGB")


def passthrough(image: Image.Image) -> Image.Image:
    """A ready-made control image, used as it is (A1111's module "none")."""
    return image


class Preprocessor(NamedTuple):
    function: Callable[..., Image.Image]
    defaults: dict                      # parameter name -> default, in A1111's slider order (Threshold A, B)


PREPROCESSORS: dict[str, Preprocessor] = {
    "none": Preprocessor(passthrough, {}),
    "canny": Preprocessor(canny, {"low": DEFAULT_LOW, "high": DEFAULT_HIGH}),
    "invert": Preprocessor(invert, {}),
}

# which of A1111's sliders holds each parameter, as the unit's infotext names them
_SLIDERS = {"canny": {"low": "Threshold A", "high": "Threshold B"}}


def describe(name: str, params: dict | None = None) -> dict[str, str]:
    """The preprocessor's entries of A1111's ControlNet infotext unit, in its order: "Module" first, then
    the slider values ("Threshold A", "Threshold B"); missing parameters are the defaults. Modules
    without sliders write none (the extension's newer versions write its hidden sliders' 0.5 there,
    which mean nothing and are ignored when read back)."""
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown ControlNet preprocessor {name!r}; known: {', '.join(PREPROCESSORS)}")
    defaults = PREPROCESSORS[name].defaults
    params = dict(params or {})
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"preprocessor {name!r} takes {', '.join(defaults) or 'no parameters'}; "
                         f"not {', '.join(sorted(map(str, unknown)))}")
    values = defaults | params
    return {"Module": name, **{slider: str(_threshold(values[p], p))
                               for p, slider in _SLIDERS.get(name, {}).items()}}


# ---- the steps of cv2.Canny ------------------------------------------------------------------------------

def _gradient(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dx, dy (3x3 Sobel, replicated border) and m = |dx| + |dy| of the channel where m is largest. int32 [H,W]."""
    p = np.pad(rgb.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = (p[:-2, 2:] - p[:-2, :-2]) + 2 * (p[1:-1, 2:] - p[1:-1, :-2]) + (p[2:, 2:] - p[2:, :-2])
    dy = (p[2:, :-2] - p[:-2, :-2]) + 2 * (p[2:, 1:-1] - p[:-2, 1:-1]) + (p[2:, 2:] - p[:-2, 2:])
    m = np.abs(dx) + np.abs(dy)
    pick = np.argmax(m, axis=2)[:, :, None]          # argmax takes the first of equals, as OpenCV's strict >
    take = lambda a: np.take_along_axis(a, pick, axis=2)[:, :, 0]   # noqa: E731
    return take(dx), take(dy), take(m)


def _non_maximum(dx: np.ndarray, dy: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Where m is a maximum across the edge, by OpenCV's sector tests and its strict / non-strict comparisons."""
    z = np.pad(m, 1)                                   # magnitude 0 outside the image, as OpenCV's buffers
    left, right = z[1:-1, :-2], z[1:-1, 2:]
    above, below = z[:-2, 1:-1], z[2:, 1:-1]
    x = np.abs(dx)
    y = np.abs(dy) << 15
    tg22x = x * TG22
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg22x + (x << 16))
    same_sign = (dx ^ dy) >= 0                         # the gradient points down-right or up-left
    diagonal = np.where(same_sign, (m > z[:-2, :-2]) & (m > z[2:, 2:]),       # above-left, below-right
                        (m > z[:-2, 2:]) & (m > z[2:, :-2]))                  # above-right, below-left
    return np.where(horizontal, (m > left) & (m >= right),
                    np.where(vertical, (m > above) & (m >= below), diagonal))


def _hysteresis(candidate: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The candidates 8-connected (through candidates) to a strong one: what OpenCV's stack walk reaches.

    Connected components by union-find over whole arrays: nodes are the candidates in row-major order,
    each horizontal run starts as one tree (its first node the root), then every round hooks the larger
    of two adjacent roots onto the smaller and compresses paths, until no edge joins two trees."""
    h, w = candidate.shape
    n = int(candidate.sum())
    if n == 0:
        return candidate
    ids = np.full((h, w), -1, np.int64)
    ids[candidate] = np.arange(n)
    flat = np.flatnonzero(candidate)
    run_start = np.ones(n, bool)
    run_start[1:] = (flat[1:] != flat[:-1] + 1) | (flat[1:] % w == 0)
    parent = np.maximum.accumulate(np.where(run_start, np.arange(n), 0))
    # edges to the row below: below-left, below, below-right (the row's own neighbours are its runs)
    us, vs = [], []
    for a, b in (((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))),
                 ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
                 ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(1, None)))):
        both = candidate[a] & candidate[b]
        us.append(ids[a][both])
        vs.append(ids[b][both])
    u, v = np.concatenate(us), np.concatenate(vs)
    while u.size:
        pu, pv = parent[u], parent[v]
        apart = pu != pv
        u, v, pu, pv = u[apart], v[apart], pu[apart], pv[apart]   # joined edges stay joined: drop them
        if not u.size:
            break
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:                                    # parent[i] <= i always, so this ends at the roots
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    reached = np.zeros(n, bool)
    reached[parent[ids[strong]]] = True
    out = np.zeros((h, w), bool)
    out[candidate] = reached[parent]
    return out


# ---- arguments ---------------------------------------------------------------------------------------------

def _rgb_array(image, what: str) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise ValueError(f"{what} takes a PIL image, got {type(image).__name__} (open files with PIL.Image.open, "
                         f"or use a Control, which accepts paths and tensors)")
    return np.asarray(to_rgb(image), dtype=np.uint8)


def _threshold(value, name: str) -> int:
    """A threshold as OpenCV uses it: a non-negative number, floored (cvFloor)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"canny {name} threshold must be a finite number such as {DEFAULT_LOW}, got {value!r}")
    if value < 0:
        raise ValueError(f"canny {name} threshold must be >= 0 (a gradient magnitude), got {value}")
    return math.floor(value)

