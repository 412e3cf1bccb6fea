"""A1111's ControlNet extension over HTTP: `alwayson_scripts.ControlNet.args` units -> `Control`s, and the
extension's own list routes.

    library = ControlNetLibrary(Path("controlnets"))        # --controlnet-dir; None: no ControlNets
    units(entry, ctx)                                       # {"args": [unit, ...]} -> {"control": (...)}
    GET /controlnet/model_list  {"model_list": ["control_v11p_sd15_canny [d14c016b]", ...]}

A unit is what `webuiapi.ControlNetUnit.to_dict()` (and A1111's API) sends: module, model, weight, image
(raw base64, a data URL, or {"image": ..., "mask": ...}), resize_mode, threshold_a/b, guidance_start/end,
control_mode, pixel_perfect, processor_res, hr_option, enabled. Models are found by name only inside the
ControlNet folder (A1111's title "name [hash]", the file's name, or, as A1111 does, the shortest name that
contains the one asked for); a model is loaded for the pipeline being served and kept (the last two).
Modules sd15 runs: none, canny (threshold_a/b: its low and high thresholds), invert, and the inpaint
hint; others are a 422 naming these. A unit without an image uses the img2img init image, as A1111.
What a unit asks that sd15 does not do (hr_option other than Both, its own mask, a preprocessor resolution
other than the generation's) is named in `info["ignored"]`.
"""

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files.hashing import legacy_hash
from ..pipeline.control import Control, ControlNetFile, load_controlnet
from .images import decode_image
from .models import contained_files

EXTENSIONS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
# A1111's module names -> sd15's preprocessors
MODULES = {"none": "none", "canny": "canny", "invert": "invert", "invert (from white bg & black line)": "invert",
           "inpaint": "inpaint", "inpaint_only": "inpaint", "inpaint_global_harmonious": "inpaint"}
CONTROL_MODES = {0: "balanced", 1: "prompt", 2: "controlnet", "balanced": "balanced",
                 "my prompt is more important": "prompt", "controlnet is more important": "controlnet"}
RESIZE_MODES = {0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill", "just resize": "Just Resize",
                "crop and resize": "Crop and Resize", "resize and fill": "Resize and Fill",
                "scale to fit (inner fit)": "Crop and Resize", "envelope (outer fit)": "Resize and Fill"}
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,10}\]$")


class ControlNetLibrary:
    """The ControlNet files of one folder, found by A1111's names, loaded on demand and kept."""

    def __init__(self, folder: Path | None, keep: int = 2):
        self.folder = Path(folder).resolve() if folder is not None else None
        self.keep = keep
        self._loaded: OrderedDict[tuple, ControlNetFile] = OrderedDict()
        self._hashes: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def files(self) -> list[tuple[str, Path]]:
        return contained_files(self.folder, EXTENSIONS) if self.folder is not None else []

    def _hash(self, path: Path) -> str:
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in self._hashes:
            self._hashes[key] = legacy_hash(path)
        return self._hashes[key]

    def titles(self) -> list[str]:
        """A1111's model list: "name [hash]", hash its short hash of the file."""
        return [f"{Path(name).stem} [{self._hash(real)}]" for name, real in self.files()]

    def find(self, name: str) -> Path:
        if self.folder is None:
            raise ValueError("ControlNet units need a ControlNet folder: start the server with --controlnet-dir DIR")
        files = self.files()
        wanted = _HASH_SUFFIX.sub("", name.strip()).lower()
        by_stem = {Path(n).stem.lower(): real for n, real in files}
        if wanted in by_stem:
            return by_stem[wanted]
        containing = sorted((stem for stem in by_stem if wanted and wanted in stem), key=len)
        if containing:                       # A1111's fallback: the shortest name containing the one asked for
            return by_stem[containing[0]]
        known = ", ".join(self.titles()) or "none (the folder is empty)"
        raise ValueError(f"ControlNet model {name!r} not found in the ControlNet folder; available: {known}")

    def load(self, name: str, pipe) -> ControlNetFile:
        path = self.find(name)
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size, id(pipe))
        with self._lock:                     # one load at a time: each is ~1.4 GB in float32
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            model = load_controlnet(path, pipe)
            self._loaded[key] = model
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
            return model


def _lookup(table: dict, value, what: str):
    key = value.lower().strip() if isinstance(value, str) else value
    if isinstance(key, bool) or not isinstance(key, (str, int)) or key not in table:     # [1], {}: no 500
        names = [k for k in table if isinstance(k, str)]
        raise ValueError(f"{what}: {value!r} is not one of {', '.join(map(repr, names))} (or their numbers)")
    return table[key]


def _unit_image(unit: dict, where: str, ctx) -> tuple[object, bool]:
    """(the unit's image or None, whether it brought a mask of its own)."""
    image = unit.get("image", unit.get("input_image"))
    mask = unit.get("mask") or unit.get("mask_image")
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask") or mask
    if image in (None, ""):
        return None, bool(mask)
    return decode_image(image, f"{where}.image", ctx.limits.max_image_pixels, ctx.spend).convert("RGB"), bool(mask)


def unit_control(unit: Any, where: str, ctx, load: Callable[[str], ControlNetFile]) -> Control | None:
    """One unit as a Control; None for a unit that is off (enabled false, or model "None")."""
    if not isinstance(unit, dict):
        raise ValueError(f"{where}: a ControlNet unit is an object (module, model, image, weight, ...), got "
                         f"{type(unit).__name__}")
    if not unit.get("enabled", True) or str(unit.get("model") or "None").strip() in ("None", ""):
        return None
    module = str(unit.get("module") or "none")
    preprocess = _lookup(MODULES, module, f"{where}.module")
    params = {}
    if preprocess == "canny":
        for key, name in (("threshold_a", "low"), ("threshold_b", "high")):
            value = unit.get(key)
            if value not in (None, -1):
                params[name] = value
    mode = _lookup(CONTROL_MODES, unit.get("control_mode", 0), f"{where}.control_mode")
    if unit.get("guessmode"):                # the deprecated flag: A1111's "ControlNet is more important"
        mode = "controlnet"
    image, own_mask = _unit_image(unit, where, ctx)
    if own_mask:
        ctx.ignore(f"{where}.mask (the request's inpainting mask is the one used)")
    if str(unit.get("hr_option", "Both")) != "Both":
        ctx.ignore(f"{where}.hr_option (the ControlNet runs in both passes)")
    if preprocess not in ("none", "inpaint") and not unit.get("pixel_perfect", False):
        ctx.ignore(f"{where}.processor_res (sd15 preprocesses at the generation size, as pixel perfect)")
    return Control(load(str(unit["model"])), image, strength=unit.get("weight", 1.0),
                   start=unit.get("guidance_start", 0.0), end=unit.get("guidance_end", 1.0), mode=mode,
                   preprocess=preprocess, params=params,
                   resize_mode=_lookup(RESIZE_MODES, unit.get("resize_mode", 1), f"{where}.resize_mode"))


def units(entry: Any, ctx) -> dict:
    """`alwayson_scripts.ControlNet` ({"args": [unit, ...]}) -> {"control": (Control, ...)}."""
    args = entry.get("args", []) if isinstance(entry, dict) else entry
    if not isinstance(args, list):
        raise ValueError("alwayson_scripts.ControlNet must be {\"args\": [unit, ...]}")
    controls = [unit_control(unit, f"alwayson_scripts.ControlNet.args[{i}]", ctx, ctx.controlnet)
                for i, unit in enumerate(args)]
    controls = tuple(c for c in controls if c is not None)
    return {"control": controls} if controls else {}


def routes(app, library: ControlNetLibrary) -> None:
    """The extension's routes clients call (webuiapi's controlnet_model_list / module_list / version)."""
    @app.get("/controlnet/model_list")
    def model_list():
        return {"model_list": library.titles()}

    @app.get("/controlnet/module_list")
    def module_list():
        return {"module_list": list(MODULES), "module_detail": {}}

    @app.get("/controlnet/version")
    def version():
        return {"version": 2}
