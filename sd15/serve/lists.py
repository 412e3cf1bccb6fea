"""The answers of A1111's list endpoints, built from what sd15 has (empty lists where it has nothing:
clients such as SillyTavern fail on any non-2xx answer, so an empty list is better than a 404).

    samplers()      # [{"name": "DPM++ 2M", "aliases": ["dpmpp_2m", "k_dpmpp_2m"], "options": {...}}, ...]
    png_info(img)   # {"info": infotext, "items": {other chunks}, "parameters": {"Prompt": ..., "Steps": "20"}}

Paths are never absolute: a LoRA's `path` is relative to its folder (A1111 sends the full path).
"""

import re

from PIL import Image

from ..adapters.library import EXTENSIONS as LORA_EXTENSIONS
from ..pipeline.hires import LATENT_UPSCALERS, PIXEL_UPSCALERS
from ..pipeline.infotext import parse_infotext
from ..sampling.registry import SAMPLERS
from ..sampling.schedule_types import SCHEDULE_TYPES
from .images import text_chunks
from .models import contained_files

SIZE = re.compile(r"^(\d+)x(\d+)$")


def samplers() -> list[dict]:
    out = []
    for row in SAMPLERS.values():
        options = {}
        if row.default_schedule != "uniform":
            options["scheduler"] = row.default_schedule
        if row.discard_penultimate_sigma:
            options["discard_next_to_last_sigma"] = "True"
        out.append({"name": row.label, "aliases": [row.name, f"k_{row.name}"], "options": options})
    return out


def schedulers() -> list[dict]:
    rows = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}]
    for key, st in SCHEDULE_TYPES.items():
        rows.append({"name": key, "label": st.label, "aliases": None,
                     "default_rho": 7.0 if key == "karras" else -1, "need_inner_model": False})
    return rows


def upscalers() -> list[dict]:
    names = ["None", *PIXEL_UPSCALERS]
    return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4 if n != "None" else 1}
            for n in names]


def latent_upscale_modes() -> list[dict]:
    return [{"name": name} for name in LATENT_UPSCALERS]


def loras(folders) -> list[dict]:
    rows = []
    for folder in folders:
        for name, _ in contained_files(folder, LORA_EXTENSIONS):
            stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            rows.append({"name": stem, "alias": stem, "path": name, "metadata": {}})
    return rows


def embeddings(library, skipped: dict[str, str]) -> dict:
    """A1111's {"loaded": {name: {...}}, "skipped": {name: {...}}}."""
    loaded = {}
    for name in library.names():
        e = library[name]
        loaded[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                        "shape": int(e.vectors.shape[1]), "vectors": int(e.vectors.shape[0])}
    return {"loaded": loaded,
            "skipped": {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                               "vectors": None, "why": why} for name, why in skipped.items()}}


def scripts(controlnet: bool = False) -> dict:
    """A1111's script names, lower case; the ControlNet extension's when a ControlNet folder is served."""
    names = ["controlnet"] if controlnet else []
    return {"txt2img": list(names), "img2img": list(names)}


def png_info(img: Image.Image) -> dict:
    items = text_chunks(img)
    text = items.pop("parameters", "")
    return {"info": text, "items": items, "parameters": parsed_parameters(text) if text else {}}


def parsed_parameters(text: str) -> dict:
    """A1111's parse_generation_parameters, as far as clients rely on it: Prompt, Negative prompt, every
    field as text, WxH values also split into "<key>-1" and "<key>-2"."""
    parsed = parse_infotext(text)
    out: dict[str, str] = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt}
    for key, value in parsed.fields.items():
        m = SIZE.match(value.strip())
        if m:
            out[f"{key}-1"], out[f"{key}-2"] = m[1], m[2]
        else:
            out[key] = value
    return out


def memory() -> dict:
    """A1111's {"ram": {...}, "cuda": {...}} (psutil for RAM; torch for CUDA when it is there)."""
    out: dict = {}
    try:
        import psutil
        vm = psutil.virtual_memory()
        out["ram"] = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}
    except ImportError:
        out["ram"] = {"error": "psutil is not installed"}
    import torch
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        out["cuda"] = {"system": {"free": free, "used": total - free, "total": total},
                       "allocated": {"current": torch.cuda.memory_allocated(),
                                     "peak": torch.cuda.max_memory_allocated()},
                       "reserved": {"current": torch.cuda.memory_reserved(), "peak": torch.cuda.max_memory_reserved()}}
    else:
        out["cuda"] = {"error": "unavailable"}
    return out
