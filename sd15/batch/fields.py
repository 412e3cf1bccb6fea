"""The columns of a batch job file: the names people know from A1111 and our CLI, each with its parser,
and how a row's values become a `Request`.

    canonical = normalize({"prompt": "a cat", "cfg": "7", "negative_prompt": "blurry"})
    # -> {"prompt": "a cat", "cfg": 7.0, "negative": "blurry"}: canonical names, typed values
    request = request_of(canonical, base_dir=Path("jobs"))      # paths are relative to the job file

A value is one JSON value (JSONL) or one text cell (CSV); every parser takes both, so the same row gives the
same canonical values, and so the same id, from either format. Lists are grid axes (sd15.batch.grid) and are
split off before the parsers run; `loras` is a list by nature, its weights may be lists instead.
"""

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..adapters.library import Loras, LoraSpec


class RowError(ValueError):
    """A row (or one grid point of it) that cannot become a request: the message names the column and the fix."""


def _text(value, column: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{column} must be text, got {value!r}")
    return value


def _identifier(value, column: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)                  # a JSONL row's "id": 17
    return _text(value, column).strip()


def _integer(value, column: str) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise RowError(f"{column} must be a whole number, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RowError(f"{column} must be a whole number, got {value!r}")
    return value


def _number(value, column: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RowError(f"{column} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise RowError(f"{column} must be a finite number, got {value!r}")
    return float(value)


def _boolean(value, column: str) -> bool:
    if isinstance(value, bool):
        return value
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if isinstance(value, (str, int)) and str(value).strip().lower() in words:
        return words[str(value).strip().lower()]
    raise RowError(f"{column} must be true or false, got {value!r}")


def _size(value, column: str) -> str:
    """WIDTHxHEIGHT, kept as text ("512x768") so that "512 x 768" and "512X768" give the same id."""
    text = _text(value, column).strip().lower().replace(" ", "")
    width, sep, height = text.partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise RowError(f"{column} must be WIDTHxHEIGHT such as 512x768, got {value!r}")
    return f"{int(width)}x{int(height)}"


@dataclass(frozen=True)
class Column:
    name: str
    parse: Callable[[object, str], object]
    help: str
    aliases: tuple[str, ...] = ()


COLUMNS: tuple[Column, ...] = (
    Column("id", _identifier, "the row's stable id (letters, digits, . _ - = +); derived from the row when absent"),
    Column("prompt", _text, "what to draw (A1111 prompt syntax: (word:1.2), [a:b:10], <lora:name:w>, BREAK)"),
    Column("negative", _text, "the negative prompt", ("negative_prompt",)),
    Column("steps", _integer, "sampling steps (default 25)"),
    Column("sampler", _text, "any A1111 or sd15 sampler name: 'DPM++ 2M Karras', 'Euler a', euler_a_karras"),
    Column("schedule", _text, "schedule type: Karras, Exponential, Uniform, ... (default: the sampler's)",
           ("schedule_type", "scheduler")),
    Column("cfg", _number, "guidance scale (default 7.5)", ("cfg_scale", "guidance_scale")),
    Column("width", _integer, "pixels, a multiple of 8 (default 512)"),
    Column("height", _integer, "pixels, a multiple of 8 (default 512)"),
    Column("size", _size, "WIDTHxHEIGHT instead of width and height"),
    Column("seed", _integer, "the image's seed; absent: derived from the job seed and the row id"),
    Column("seed_mode", _text, "diffusers (default) or a1111"),
    Column("subseed", _integer, "A1111 variation seed (seed_mode a1111)"),
    Column("subseed_strength", _number, "A1111 variation strength 0..1 (seed_mode a1111)"),
    Column("init_image", _text, "img2img: the image to start from (a path; relative to the job file)"),
    Column("strength", _number, "img2img: share of the schedule re-run (default 0.75)", ("denoising_strength",)),
    Column("mask", _text, "inpainting: white is repainted (a path; relative to the job file; needs init_image)"),
    Column("mask_blur", _number, "inpainting: A1111's mask blur in pixels (default 4)"),
    Column("clip_skip", _integer, "A1111's clip skip (2 for anime fine-tunes)"),
    Column("eta", _number, "the sampler's eta (DDIM, ancestral and SDE samplers)"),
    Column("s_noise", _number, "the sampler's sigma noise (ancestral and SDE samplers)"),
    Column("order", _number, "the solver order (UniPC, DEIS)"),
    Column("loras", lambda v, c: v, "[[name, w]] or [[name, te, unet]], or text 'name:w, other:te:unet'"),
    Column("hires", _boolean, "A1111's hires fix (on when any hr_ column is given)", ("enable_hr",)),
    Column("hr_scale", _number, "hires: upscale factor (default 2)"),
    Column("hr_resize", _size, "hires: WIDTHxHEIGHT instead of hr_scale"),
    Column("hr_upscaler", _text, "hires: Latent (default), Lanczos, ... (see README, Hires fix)"),
    Column("hr_steps", _integer, "hires: second-pass steps (0: as the first pass)"),
    Column("hr_denoising_strength", _number, "hires: second-pass denoising strength (default 0.7)"),
    Column("hr_sampler", _text, "hires: the second pass's sampler (default: the first's)"),
    Column("hr_prompt", _text, "hires: the second pass's prompt (default: the first's)"),
    Column("hr_negative_prompt", _text, "hires: the second pass's negative prompt"),
)
BY_NAME = {c.name: c for c in COLUMNS}
ALIASES = {alias: c.name for c in COLUMNS for alias in c.aliases}
NOT_COLUMNS = {   # names people will try, with the reason they are not columns
    "batch_size": "a row makes one image: for several, give a list of seeds (\"seed\": [1, 2, 3])",
    "batch": "a row makes one image: for several, give a list of seeds (\"seed\": [1, 2, 3])",
    "n_iter": "a row makes one image: for several, give a list of seeds (\"seed\": [1, 2, 3])",
    "model": "the checkpoint is the job's (--ckpt), not a row's",
}


def canonical_name(written: str) -> str:
    """The column a name as written in a job file means, or a RowError naming the valid ones."""
    name = written.strip().lower().replace("-", "_").replace(" ", "_")
    if name in BY_NAME:
        return name
    if name in ALIASES:
        return ALIASES[name]
    if name in NOT_COLUMNS:
        raise RowError(f"column {written!r}: {NOT_COLUMNS[name]}")
    close = difflib.get_close_matches(name, [*BY_NAME, *ALIASES], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise RowError(f"unknown column {written!r}{hint}; the columns are: {', '.join(BY_NAME)}")


def parse_value(column: str, value) -> object:
    return BY_NAME[column].parse(value, column)


def lora_specs(value) -> list[list]:
    """`loras` as written -> [[name, w] or [name, te, unet], ...], each weight a number or (a grid axis) a list."""
    if isinstance(value, str):
        items = [_lora_text(item.strip()) for item in value.split(",") if item.strip()]
    elif isinstance(value, list):
        items = [_lora_item(item) for item in value]
    else:
        raise RowError(f"loras must be a list such as [[\"name\", 0.8]] or text such as 'name:0.8', got {value!r}")
    return items


def _lora_text(text: str) -> list:
    try:
        spec = LoraSpec.parse(text)
    except ValueError:
        raise RowError(f"loras: {text!r} is not NAME[:W[:UNET_W]]") from None
    return _collapsed([spec.name, spec.te, spec.unet])


def _lora_item(item) -> list:
    """[name, w] (w on both parts) or [name, te, unet]; a weight may be a list of numbers (a grid axis)."""
    if isinstance(item, str):
        return _lora_text(item)
    if not (isinstance(item, list) and len(item) in (2, 3) and isinstance(item[0], str) and item[0].strip()):
        raise RowError(f"loras: each LoRA is [name, w] or [name, te, unet] or 'name:w', got {item!r}")
    name, *weights = item

    def weight(w):
        if isinstance(w, list):
            if not w:
                raise RowError(f"loras: LoRA {name!r} has an empty list of weights")
            return [_number(v, f"loras ({name})") for v in w]
        return _number(w, f"loras ({name})")
    return _collapsed([name, *(weight(w) for w in weights)])


def _collapsed(spec: list) -> list:
    """[name, w, w] is [name, w]: one spelling per request, so one id."""
    if len(spec) == 3 and not isinstance(spec[1], list) and spec[1] == spec[2]:
        return spec[:2]
    return spec


# ---- canonical values -> Request -----------------------------------------------------------------------

def request_of(fields: dict, base_dir: Path):
    """The Request a row's canonical values (one grid point, seed fixed) describe; RowError/ValueError if none."""
    from ..pipeline.hires import Hires
    from ..pipeline.masks import Inpaint
    from ..pipeline.request import DEFAULT_SAMPLER, Request
    from ..sampling.registry import resolve_sampler

    if "prompt" not in fields:
        raise RowError("the row has no prompt (column 'prompt')")
    kwargs: dict[str, object] = {"prompt": fields["prompt"], "negative_prompt": fields.get("negative", "")}
    for column, field in (("steps", "steps"), ("cfg", "guidance_scale"), ("width", "width"), ("height", "height"),
                          ("seed", "seed"), ("seed_mode", "seed_mode"), ("subseed", "subseed"),
                          ("subseed_strength", "subseed_strength"), ("strength", "strength"),
                          ("clip_skip", "clip_skip")):
        if column in fields:
            kwargs[field] = fields[column]
    if "size" in fields:
        if "width" in fields or "height" in fields:
            raise RowError("give size or width and height, not both")
        kwargs["width"], kwargs["height"] = (int(v) for v in fields["size"].split("x"))
    sampler = fields.get("sampler", DEFAULT_SAMPLER)
    if "schedule" in fields:
        sampler = resolve_sampler(resolve_sampler(sampler).name, fields["schedule"]).full_name
    kwargs["sampler"] = sampler
    kwargs["sampler_options"] = {k: fields[k] for k in ("eta", "s_noise", "order") if k in fields}
    if "init_image" in fields:
        kwargs["init_image"] = _existing(base_dir, fields["init_image"], "init_image")
    if "mask" in fields:
        kwargs["inpaint"] = Inpaint(_existing(base_dir, fields["mask"], "mask"),
                                    **({"blur": fields["mask_blur"]} if "mask_blur" in fields else {}))
    elif "mask_blur" in fields:
        raise RowError("mask_blur sets up inpainting: give the mask (column 'mask') and init_image")
    kwargs["loras"] = [(_lora_name(base_dir, name), *weights) for name, *weights in fields.get("loras", [])]
    hires = {k.removeprefix("hr_"): v for k, v in fields.items() if k.startswith("hr_")}
    if "resize" in hires:
        hires["resize"] = tuple(int(v) for v in hires["resize"].split("x"))
    if hires and fields.get("hires") is False:
        raise RowError(f"hires is false but {', '.join('hr_' + k for k in hires)} set it up; drop one or the other")
    if hires or fields.get("hires"):
        kwargs["hires"] = Hires(**hires)
    return Request(**kwargs)


def _existing(base_dir: Path, written: str, column: str) -> Path:
    path = Path(written).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise RowError(f"{column} {written}: no such file ({path})")
    return path


def _lora_name(base_dir: Path, name: str) -> str:
    """A LoRA named by a relative path is relative to the job file; a bare name is looked up in --lora-dir."""
    looks_like_path = "/" in name or "\\" in name or Path(name).suffix.lower() in (".safetensors", ".pt", ".ckpt",
                                                                                    ".bin")
    if looks_like_path and not Path(name).expanduser().is_absolute():
        return str(base_dir / name)
    return name


def check_loras(request, library: Loras) -> None:
    """Every LoRA the request names is a file that is there (checked before anything runs)."""
    for spec in request.loras:
        library.find(spec.name, paths_allowed=True)
