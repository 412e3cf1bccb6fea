"""`Request`: one generation, as every front end states it (Python API, CLI, infotexts, the coming
server and batch files), validated once when it is made.

    req = Request("a lighthouse at dusk", negative_prompt="blurry", steps=25, seed=42)
    req = Request("the same in winter", init_image="in.png", strength=0.6)   # img2img: an init image
    images = pipe.generate(req)
    text = req.infotext(model=pipe.model_info)               # what the PNG's parameters chunk holds
    back = Request.from_infotext(text)                       # ... and back: back.request == req

A request is frozen: derive variants with `dataclasses.replace(req, seed=7)`, which validates again.
A feature that adds an input (mask, control images, adapters, a hires pass) adds a field here with its
check in `__post_init__`, an entry in `INFOTEXT` (how it is written and read back), and a stage.
"""

import dataclasses
import secrets
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..adapters.library import LoraSpec
from ..conditioning.prompts import EMPHASES, SYNTAXES
from ..models.config import VAEConfig
from ..sampling import SAMPLERS, SamplerSpec, kept_steps, resolve_sampler
from . import validation
from .hires import Hires
from .hires import check as hires_check
from .hires import describe as describe_hires
from .control import Control, check_controls
from .images import Pixels
from .masks import Inpaint
from .infotext import format_infotext, parse_infotext

# What SD1.5 users expect today: DPM++ 2M Karras converges in 20-30 steps (A1111's and ComfyUI's
# usual choice); diffusers' own default (PNDM, 50 steps) is twice the work for no visible gain.
DEFAULT_SAMPLER = "DPM++ 2M Karras"
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5          # the value SD 1.5 was tuned around
DEFAULT_SIZE = 512              # SD 1.5's training size
DEFAULT_STRENGTH = 0.75         # img2img, as A1111's and diffusers' default
SEED_MODES = ("diffusers", "a1111")
SD1_DOWNSCALE = VAEConfig().downscale    # pixels per latent pixel; the pipeline re-checks its own VAE's


def random_seed() -> int:
    return secrets.randbits(32)


@dataclass(frozen=True)
class ModelInfo:
    """What the infotext says about the model: A1111's "Model", "Model hash" and "VAE" fields."""
    name: str | None = None
    hash: str | None = None
    vae: str | None = None


@dataclass(frozen=True, eq=False)
class Request:
    """One txt2img or img2img generation. Every field is checked when the request is made."""
    prompt: str | tuple[str, ...]
    negative_prompt: str | tuple[str, ...] = ""
    width: int | None = None            # None: DEFAULT_SIZE, or (img2img) the init image's width; see `size`
    height: int | None = None
    steps: int = DEFAULT_STEPS
    sampler: str = DEFAULT_SAMPLER      # any spelling; kept as the canonical name ("dpmpp_2m_karras")
    sampler_options: Mapping[str, float] = dataclasses.field(default_factory=dict)  # {"eta": 0.5}; defaults dropped
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int | None = None             # None: a random seed, picked when the generation starts
    batch_size: int = 1                 # images per prompt
    init_image: Pixels | None = None    # img2img; a PIL image, path or tensor is converted (see Pixels)
    strength: float | None = None       # img2img: share of the schedule re-run; None: DEFAULT_STRENGTH (1 without image)
    latents: torch.Tensor | None = None  # txt2img: replaces the seeded initial noise, [images, 4, height/8, width/8]
    clip_skip: int = 1                  # A1111's numbering: 1 = the text encoder's last layer, 2 = the one before
    prompt_syntax: str = "a1111"        # "a1111": emphasis, BREAK, prompt editing, AND, tags; "plain": literal text
    emphasis: str = "original"          # A1111's emphasis mode: "original", or "none" (brackets and BREAK as text)
    loras: tuple[LoraSpec, ...] = ()     # besides the prompt's <lora:...> tags: (name or path, w) or (.., te, unet)
    seed_mode: str = "diffusers"        # "diffusers": one generator for the batch; "a1111": image i is seed + i alone
    subseed: int | None = None          # A1111's variation seed (a1111 mode); None: a random one when strength > 0
    subseed_strength: float = 0.0       # 0: the seed's noise ... 1: the variation seed's (A1111's slerp)
    seed_resize_from: tuple[int, int] | None = None   # (width, height): the seed's noise as drawn at that size
    noise_seed_delta: int = 0           # A1111's ENSD: sampler noise from seed + delta (a1111 mode)
    hires: Hires | None = None          # txt2img: A1111's hires fix, a second pass over the upscaled first
    inpaint: Inpaint | None = None      # img2img: repaint where the mask is white (a mask, or Inpaint(mask, ...))
    control: tuple[Control, ...] = ()   # ControlNets, their residuals summed (see sd15.pipeline.control)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("prompt", validation.texts(self.prompt, "prompt"))
        set_("negative_prompt", validation.texts(self.negative_prompt, "negative_prompt"))
        if isinstance(self.negative_prompt, tuple) and len(self.negative_prompt) != len(self.prompts):
            raise ValueError(f"{len(self.negative_prompt)} negative prompts for {len(self.prompts)} prompts; "
                             "give one each, or one string for all")
        spec = resolve_sampler(self.sampler)
        set_("sampler", spec.full_name)
        if not isinstance(self.sampler_options, Mapping):
            raise ValueError(f"sampler_options must be a mapping such as {{'eta': 0.5}}, got {self.sampler_options!r}")
        set_("sampler_options", types.MappingProxyType(spec.check_options(self.sampler_options, keep_defaults=False)))
        validation.check_clip_skip(self.clip_skip)
        if self.prompt_syntax not in SYNTAXES:
            raise ValueError(f"prompt_syntax must be one of {', '.join(SYNTAXES)}, got {self.prompt_syntax!r}")
        if self.emphasis not in EMPHASES:
            raise ValueError(f"emphasis must be one of {', '.join(EMPHASES)}, got {self.emphasis!r}")
        if self.prompt_syntax == "plain":
            set_("emphasis", "none")               # literal text has no brackets to weigh
        if isinstance(self.loras, (str, LoraSpec)) or not isinstance(self.loras, (list, tuple)):
            raise ValueError(f"loras must be a list such as [('name', 0.8)], got {self.loras!r}")
        set_("loras", tuple(LoraSpec.of(spec) for spec in self.loras))
        validation.check_guidance(self.guidance_scale)
        set_("guidance_scale", float(self.guidance_scale))
        validation.check_seed(self.seed)
        validation.check_batch(self.batch_size)
        validation.check_batch(self.num_images, "images in one batch (prompts x batch size)")
        self._check_seed_mode(set_)
        if self.init_image is None and self.strength not in (None, 1, 1.0):
            raise ValueError(f"strength {self.strength} needs an init image; txt2img runs the whole schedule")
        if self.strength is None:      # inpainting, as diffusers': the masked area from pure noise
            set_("strength", 1.0 if self.init_image is None or self.inpaint is not None else DEFAULT_STRENGTH)
        kept_steps(self.steps, self.strength)               # steps and strength, before any image is read
        set_("strength", float(self.strength))
        if self.init_image is None:
            validation.check_size(*self.size, SD1_DOWNSCALE)
        elif (self.width is None) != (self.height is None):
            raise ValueError("give both width and height to resize the init image, or neither")
        elif self.width is not None:
            validation.check_size(self.width, self.height, SD1_DOWNSCALE)
        if self.init_image is not None:
            size = None if self.width is None else (self.width, self.height)
            set_("init_image", Pixels.of(self.init_image, size))
            if self.num_images % len(self.init_image):
                raise ValueError(f"{len(self.init_image)} init images cannot be spread over a batch of "
                                 f"{self.num_images} images")
        set_("inpaint", Inpaint.of(self.inpaint))
        if self.inpaint is not None and self.init_image is None:
            raise ValueError("inpainting repaints part of an image: give the image (init_image; CLI --init-image) "
                             "with the mask")
        set_("control", check_controls(self.control))
        if self.init_image is None and any(c.image is None for c in self.control):
            raise ValueError("a Control without an image takes the init image (img2img, inpainting); this request "
                             "has none: give the control image")
        set_("hires", Hires.of(self.hires))
        if self.hires is not None:
            if self.init_image is not None:
                raise ValueError("the hires fix is a txt2img second pass; an img2img request has its init image "
                                 "(upscale it, then run img2img at the size you want)")
            hires_check(self)
        if self.latents is not None:
            if not isinstance(self.latents, torch.Tensor):
                raise ValueError(f"latents must be a tensor, got {type(self.latents).__name__}")
            if self.init_image is not None:
                raise ValueError("latents replace txt2img's initial noise; img2img starts from its init image")
            set_("latents", self.latents.detach().clone())     # the request's own: the caller may reuse theirs

    def _check_seed_mode(self, set_) -> None:
        if self.seed_mode not in SEED_MODES:
            raise ValueError(f"seed_mode must be one of {', '.join(SEED_MODES)}, got {self.seed_mode!r}")
        validation.check_seed(self.subseed, "subseed")
        strength = self.subseed_strength
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 <= strength <= 1:
            raise ValueError(f"subseed_strength must be a number in [0, 1], got {strength!r}")
        set_("subseed_strength", float(strength))
        if self.seed_resize_from is not None:
            size = self.seed_resize_from
            if (not isinstance(size, (tuple, list)) or len(size) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= 16384 for v in size)):
                raise ValueError(f"seed_resize_from must be (width, height) in pixels, from 8 to 16384, got {size!r}")
            set_("seed_resize_from", (int(size[0]), int(size[1])))
        delta = self.noise_seed_delta
        if not isinstance(delta, int) or isinstance(delta, bool) or not 0 <= delta < 2**32:
            raise ValueError(f"noise_seed_delta (A1111's ENSD) must be an integer in [0, 2**32), got {delta!r}")
        a1111_only = [name for name, on in (("subseed_strength", self.subseed_strength != 0),
                                            ("seed_resize_from", self.seed_resize_from is not None),
                                            ("noise_seed_delta", self.noise_seed_delta != 0)) if on]
        if a1111_only and self.seed_mode != "a1111":
            raise ValueError(f"{', '.join(a1111_only)} shape A1111's per-image noise: set seed_mode='a1111' "
                             "(CLI: --seed-mode a1111)")
        if self.seed_mode == "a1111":       # image i's generator is seeded with seed + i (+ ENSD)
            for name, seeds in (("seed", self.all_seeds), ("subseed", self.all_subseeds)):
                top = max((s for s in seeds if s is not None), default=0) + (self.noise_seed_delta if name == "seed" else 0)
                if top >= 2**64:
                    raise ValueError(f"{name} {getattr(self, name)} is too large for a batch of {self.num_images} in "
                                     f"a1111 seed mode (seed + image index + ENSD must stay below 2**64)")

    # ---- derived --------------------------------------------------------------------------------------

    @property
    def all_seeds(self) -> list[int | None]:
        """Each image's seed: the request's for all in diffusers mode; seed + i in a1111 mode (A1111 keeps one
        seed for all and steps the variation seed instead when subseed_strength is set)."""
        step = self.seed_mode == "a1111" and self.subseed_strength == 0 and self.seed is not None
        return [self.seed + i if step else self.seed for i in range(self.num_images)]

    @property
    def all_subseeds(self) -> list[int | None]:
        return [None if self.subseed is None else self.subseed + i for i in range(self.num_images)]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) the generation runs at: as given, else the init image's, else DEFAULT_SIZE."""
        if self.init_image is not None:
            return self.init_image.size
        return (DEFAULT_SIZE if self.width is None else self.width, DEFAULT_SIZE if self.height is None else self.height)

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else self.prompt

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.batch_size

    @property
    def spec(self) -> SamplerSpec:
        return resolve_sampler(self.sampler)

    def per_image(self) -> tuple[list[str], list[str]]:
        """(prompt, negative prompt) of each image, in diffusers' order p0, p0, p1, p1, ..."""
        negatives = self.negative_prompt if isinstance(self.negative_prompt, tuple) else \
            (self.negative_prompt,) * len(self.prompts)
        reps = range(self.batch_size)
        return [p for p in self.prompts for _ in reps], [n for n in negatives for _ in reps]

    def with_seed(self) -> "Request":
        """This request with its seed fixed (a random one if it had none)."""
        picks = {}
        if self.seed is None:
            picks["seed"] = random_seed()
        if self.subseed is None and self.subseed_strength != 0:
            picks["subseed"] = random_seed()
        return dataclasses.replace(self, **picks) if picks else self

    def __eq__(self, other) -> bool:
        """Equal when they describe the same generation (an unset size equals the size it resolves to)."""
        if type(other) is not type(self):
            return NotImplemented
        return self.size == other.size and all(
            _same(getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self) if f.name not in ("width", "height"))

    __hash__ = None

    def __reduce__(self):
        # pickle (worker processes, Ray) through the constructor: checked again on arrival, and the
        # read-only options mapping travels as a plain dict
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _rebuild, (type(self), values | {"sampler_options": dict(self.sampler_options)})

    # ---- infotext -------------------------------------------------------------------------------------

    def infotext(self, index: int = 0, model: ModelInfo = ModelInfo(), extra: Mapping[str, object] = {}) -> str:
        """A1111's infotext of image `index` of this request (its own prompt; the batch position if > 1).
        `extra`: fields only the generation knows (e.g. "TI hashes"), written before the batch fields."""
        prompts, negatives = self.per_image()
        fields: dict[str, object] = {}
        for codec in INFOTEXT:
            fields |= codec.write(self, index, model)
        batch = {k: fields.pop(k) for k in ("Batch size", "Batch pos") if k in fields}
        return format_infotext(prompts[index], negatives[index], fields | dict(extra) | batch)

    @classmethod
    def from_infotext(cls, text: str, **overrides) -> "FromInfotext":
        """The request an infotext describes (`overrides` replace fields), and what it said besides.

        Reading is lenient where A1111 is: fields sd15 does not apply come back in `unsupported` for the
        caller to name in a warning (never silently dropped). A "Denoising strength" without an init
        image among the overrides cannot be honoured: it is reported and the request is txt2img.
        An A1111 image of a batch carries its own seed (A1111 seeds image i with seed + i), so it reads
        back as a single image; an sd15 one (sd15 writes no "Version") as the batch it came from, with
        `batch_pos` saying which of its images the text describes.
        """
        info = parse_infotext(text)
        fields = dict(info.fields)
        context = _ReadContext(overrides, fields.get("Version"))
        kwargs: dict[str, object] = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}
        for codec in INFOTEXT:
            kwargs |= codec.read(fields, context)
        request = cls(**(kwargs | overrides))
        return FromInfotext(request, context.model, context.batch_pos, context.version,
                            context.unsupported | fields, frozenset(info.fields), context.ti_hashes,
                            context.lora_hashes)


@dataclass(frozen=True)
class FromInfotext:
    request: Request
    model: ModelInfo                  # the model the infotext names (not necessarily the one loaded)
    batch_pos: int | None             # which image of the regenerated batch the infotext describes
    version: str | None               # the writer's "Version" field, e.g. A1111's "v1.10.1"
    unsupported: dict[str, str]       # fields sd15 does not apply to this request: warn about them
    found: frozenset[str] = frozenset()   # every key the settings line had (empty: no settings line)
    ti_hashes: dict[str, str] = dataclasses.field(default_factory=dict)   # embedding name -> hash the image used
    lora_hashes: dict[str, str] = dataclasses.field(default_factory=dict)  # LoRA name -> hash the image used


# ---- how each field is written and read back -------------------------------------------------------------

@dataclass
class _ReadContext:
    """What reading one infotext gathers besides the request's own fields."""
    overrides: Mapping[str, object]
    version: str | None
    model: ModelInfo = ModelInfo()
    sampler: str | None = None        # the sampler read (its options are read for it)
    first_pass: tuple[str | None, str | None] = (None, None)   # the "Sampler" and "Schedule type" fields as written
    seed_mode: str | None = None
    batch_pos: int | None = None
    ti_hashes: dict[str, str] = dataclasses.field(default_factory=dict)
    lora_hashes: dict[str, str] = dataclasses.field(default_factory=dict)
    unsupported: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def from_a1111(self) -> bool:
        return self.version is not None        # A1111 and its forks write "Version"; sd15 does not


class Codec(NamedTuple):
    """One request setting in the infotext: `write` gives its keys and values (None: left out), `read`
    pops the keys it knows from the parsed fields and returns Request keyword arguments."""
    write: Callable[[Request, int, ModelInfo], dict[str, object]]
    read: Callable[[dict[str, str], _ReadContext], dict[str, object]]


def _number(kind: type, key: str, value: str) -> int | float:
    try:
        return kind(value.strip())
    except ValueError:
        raise ValueError(f"infotext field {key}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None


def _plain(key: str, name: str, kind: type) -> Codec:
    """A field that is one number of the request."""
    return Codec(lambda r, i, m: {key: getattr(r, name)},
                 lambda f, c: {name: _number(kind, key, f.pop(key))} if key in f else {})


def _read_sampler(fields: dict[str, str], context: _ReadContext) -> dict[str, object]:
    label, schedule = fields.pop("Sampler", None), fields.pop("Schedule type", None)
    context.first_pass = (label, schedule)
    if label is None or "sampler" in context.overrides:
        return {}
    if schedule is None and _before_1_9(context.version):
        schedule = "Uniform"      # before 1.9 a plain "DPM++ 2M" ran k-diffusion's uniform schedule
    try:        # "DPM++ 2M" + "Karras", or a pre-1.9 "DPM++ 2M Karras" (+ a redundant "Karras")
        spec = _resolve_read(label, schedule)
    except ValueError:
        automatic = schedule is None or schedule.strip().lower() in ("", "automatic")
        shown = label if automatic else f"{label}, schedule type {schedule}"
        raise ValueError(f"the infotext's sampler ({shown}) is not one sd15 has; choose one with --sampler "
                         f"(Python: sampler=): {', '.join(SAMPLERS)}") from None
    context.sampler = spec.full_name
    return {"sampler": spec.full_name}


# A1111's timestep samplers ignore the schedule type it writes for them anyway (sd_samplers_timesteps.py)
A1111_TIMESTEP_SAMPLERS = ("ddim", "plms", "unipc")


def _resolve_read(label: str, schedule: str | None) -> SamplerSpec:
    """A sampler as an infotext names it: A1111 1.9+ writes every sampler's schedule type, also for the
    samplers that walk their own timesteps; pre-1.9 names carry the schedule in the name."""
    try:
        return resolve_sampler(label, schedule)
    except ValueError:
        if schedule is not None and (spec := _try_resolve(label)) and spec.name in A1111_TIMESTEP_SAMPLERS:
            return spec
        if schedule is not None and schedule.strip().lower() == "uniform" and (spec := _try_resolve(label)):
            return spec           # a pre-1.9 name that carries its schedule ("DPM++ 2M Karras"), read as such
        raise


def _try_resolve(label: str) -> SamplerSpec | None:
    try:
        return resolve_sampler(label)
    except ValueError:
        return None


def _before_1_9(version: str | None) -> bool:
    """An A1111 version (its "Version" field, e.g. "v1.6.0-2-g4afaaf8a") older than 1.9."""
    digits = (version or "").strip().lstrip("v").split("-")[0].split(".")
    try:
        return (int(digits[0]), int(digits[1])) < (1, 9)
    except (ValueError, IndexError):
        return False


def _read_options(fields: dict[str, str], context: _ReadContext) -> dict[str, object]:
    sampler = context.overrides.get("sampler") or context.sampler or DEFAULT_SAMPLER
    options = {}
    for option in resolve_sampler(sampler).options:
        if option.infotext in fields:
            options[option.name] = _number(float, option.infotext, fields.pop(option.infotext))
        elif option.legacy_infotext and option.legacy_infotext in fields:    # what older sd15 versions wrote
            options[option.name] = _number(float, option.legacy_infotext, fields.pop(option.legacy_infotext))
    return {"sampler_options": options} if options else {}


def _read_size(fields: dict[str, str], context: _ReadContext) -> dict[str, object]:
    if "Size" not in fields:
        return {}
    value = fields.pop("Size")
    width, sep, height = value.strip().partition("x")
    if not sep:
        raise ValueError(f"infotext field Size: {value!r} is not WIDTHxHEIGHT")
    return {"width": _number(int, "Size", width), "height": _number(int, "Size", height)}


def _read_model(fields: dict[str, str], context: _ReadContext) -> dict[str, object]:
    context.model = ModelInfo(fields.pop("Model", None), fields.pop("Model hash", None), fields.pop("VAE", None))
    fields.pop("VAE hash", None)
    fields.pop("Version", None)
    return {}


def _write_hires(r: Request, i: int, m: ModelInfo) -> dict[str, object]:
    h = r.hires
    if h is None:
        return {}
    fields: dict[str, object] = {"Denoising strength": h.denoising_strength, **describe_hires(h)}
    if h.sampler is not None and h.sampler != r.sampler:     # A1111 writes each only where it differs
        spec, first = resolve_sampler(h.sampler), r.spec
        fields |= {"Hires sampler": spec.label if spec.name != first.name else None,
                   "Hires schedule type": spec.schedule_type if spec.schedule_type != first.schedule_type else None}
    prompt = h.prompt if h.prompt != r.prompt else None
    negative = h.negative_prompt if h.negative_prompt != r.negative_prompt else None
    return fields | {"Hires prompt": prompt, "Hires negative prompt": negative}


def _write_inpaint(r: Request, i: int, m: ModelInfo) -> dict[str, object]:
    p = r.inpaint
    if p is None:
        return {}
    return {"Mask blur": int(p.blur) if p.blur == int(p.blur) else p.blur,
            "Inpaint area": "Only masked" if p.only_masked else "Whole picture",
            "Masked area padding": p.padding if p.only_masked else None,
            "Masked content": p.fill, "Mask mode": "Inpaint not masked" if p.invert else None,
            "Conditional mask weight": p.mask_weight if p.mask_weight != 1 else None,
            "Inpaint blend": "a1111" if p.blend == "a1111" else None}


def _write_control(r: Request, i: int, m: ModelInfo) -> dict[str, object]:
    return {f"ControlNet {k}": c.describe() for k, c in enumerate(r.control)}


def _read_control(fields: dict[str, str], context: _ReadContext) -> dict[str, object]:
    """A ControlNet needs its model and image, which no infotext holds: reported unless given (control=...)."""
    found = {key: fields.pop(key) for key in [k for k in fields if k.startswith("ControlNet ")]}
    if found and "control" not in context.overrides:
        context.unsupported |= found
    return {}


INPAINT_KEYS = ("Mask blur", "Inpaint area", "Masked content", "Mask mode", "Conditional mask weight",
                "Inpaint blend", "Masked area padding")


def _read_inpaint(fields: dict[str, str], context: _ReadContext) -> dict[str, object]:
    """The mask itself is not in the infotext: without one given (inpaint=...), its fields are reported."""
    found = {key: fields.pop(key) for key in INPAINT_KEYS if key in fields}
    if found and "inpaint" not in context.overrides:
        context.unsupported |= found
    return {}


HIRES_KEYS = ("Hires upscale", "Hires resize", "Hires upscaler", "Hires steps")


def _read_hires(fields: dict[str, str], context: _ReadContext) -> dict[str, object]:
    if not any(key in fields for key in HIRES_KEYS) or context.overrides.get("init_image") is not None:
        return {}
    raw = {k: fields[k] for k in (*HIRES_KEYS, "Denoising strength", "Hires sampler", "Hires schedule type",
                                  "Hires prompt", "Hires negative prompt") if k in fields}
    try:
        return {"hires": _hires_fields(fields, context)}
    except ValueError:          # e.g. an upscaler sd15 does not have (ESRGAN): named, and the pass left out
        for key in raw:
            fields.pop(key, None)
        context.unsupported |= raw
        return {}


def _hires_fields(fields: dict[str, str], context: _ReadContext) -> Hires:
    kwargs: dict[str, object] = {}
    if "Hires upscale" in fields:
        kwargs["scale"] = _number(float, "Hires upscale", fields.pop("Hires upscale"))
    if "Hires resize" in fields:
        value = fields.pop("Hires resize")
        w, _, h = value.partition("x")
        kwargs["resize"] = (_number(int, "Hires resize", w), _number(int, "Hires resize", h))
    if "Hires upscaler" in fields:
        kwargs["upscaler"] = fields.pop("Hires upscaler").strip()
    if "Hires steps" in fields:
        kwargs["steps"] = _number(int, "Hires steps", fields.pop("Hires steps"))
    if "Denoising strength" in fields:
        kwargs["denoising_strength"] = _number(float, "Denoising strength", fields.pop("Denoising strength"))
    # A1111's get_hr_sampler_and_scheduler: each of the two that is missing (or "Use same ...") is the first pass's
    label, schedule = fields.pop("Hires sampler", None), fields.pop("Hires schedule type", None)
    same_label = label is None or label.strip().lower() == "use same sampler"
    same_schedule = schedule is None or schedule.strip().lower() == "use same scheduler"
    if not (same_label and same_schedule):
        first_label, first_schedule = context.first_pass
        label = first_label if same_label else label
        schedule = first_schedule if same_schedule else schedule
        kwargs["sampler"] = _resolve_read(label or DEFAULT_SAMPLER, schedule).full_name
    for key, name in (("Hires prompt", "prompt"), ("Hires negative prompt", "negative_prompt")):
        if key in fields:
            kwargs[name] = fields.pop(key)
    return Hires(**kwargs)


def _read_strength(fields: dict[str, str], context: _ReadContext) -> dict[str, object]:
    if "Denoising strength" not in fields:
        return {}
    value = fields.pop("Denoising strength")
    if context.overrides.get("init_image") is None:
        context.unsupported["Denoising strength"] = value      # img2img without its image: cannot be honoured
        return {}
    return {"strength": _number(float, "Denoising strength", value)}


def _write_seed_mode(r: Request, i: int, m: ModelInfo) -> dict[str, object]:
    if r.seed_mode != "a1111":
        return {}
    variation = r.subseed_strength != 0
    return {"Seed mode": "a1111",
            "Variation seed": r.all_subseeds[i] if variation else None,
            "Variation seed strength": r.subseed_strength if variation else None,
            "Seed resize from": None if r.seed_resize_from is None else "{}x{}".format(*r.seed_resize_from),
            "ENSD": r.noise_seed_delta or None}


def _read_seed_mode(fields: dict[str, str], context: _ReadContext) -> dict[str, object]:
    """"Seed mode" is sd15's field; an A1111 image (it writes "Version") was seeded per image, A1111's way."""
    mode = fields.pop("Seed mode", None)
    mode = mode.strip() if mode is not None else ("a1111" if context.from_a1111 else None)
    context.seed_mode = context.overrides.get("seed_mode", mode)
    if mode is None:
        return {}
    out: dict[str, object] = {"seed_mode": mode}
    if "Variation seed" in fields:
        out["subseed"] = _number(int, "Variation seed", fields.pop("Variation seed"))
    if "Variation seed strength" in fields:
        out["subseed_strength"] = _number(float, "Variation seed strength", fields.pop("Variation seed strength"))
    if "Seed resize from" in fields:
        value = fields.pop("Seed resize from")
        w, _, h = value.partition("x")
        size = (_number(int, "Seed resize from", w), _number(int, "Seed resize from", h))
        if size[0] > 0 and size[1] > 0:            # A1111 writes -1x-1 for "off" in some versions
            out["seed_resize_from"] = size
    if "ENSD" in fields:
        out["noise_seed_delta"] = _number(int, "ENSD", fields.pop("ENSD"))
    return out


def _read_batch(fields: dict[str, str], context: _ReadContext) -> dict[str, object]:
    size, pos = fields.pop("Batch size", None), fields.pop("Batch pos", None)
    if size is None or context.from_a1111 or context.seed_mode == "a1111":   # each image's seed is its own: alone
        return {}
    context.batch_pos = int(pos) if pos is not None and pos.strip().isdigit() else None
    return {"batch_size": _number(int, "Batch size", size)}


def _hashes(value: str | None) -> dict[str, str]:
    """A1111's "name: hash, name: hash" (names without ":" and ",")."""
    pairs = (item.partition(":") for item in (value or "").split(","))
    return {name.strip(): h.strip() for name, _, h in pairs if name.strip()}


def _read_hashes(fields: dict[str, str], context: _ReadContext) -> dict[str, object]:
    context.ti_hashes = _hashes(fields.pop("TI hashes", None))
    context.lora_hashes = _hashes(fields.pop("Lora hashes", None))
    return {}


def _read_loras(fields: dict[str, str], context: _ReadContext) -> dict[str, object]:
    value = fields.pop("Loras", None)            # ours: the request's own LoRAs (the prompt's tags stay in it)
    if not value:
        return {}
    return {"loras": [LoraSpec.parse(item.strip()) for item in value.split(",") if item.strip()]}


def _read_syntax(fields: dict[str, str], context: _ReadContext) -> dict[str, object]:
    kwargs: dict[str, object] = {}
    if fields.get("Emphasis", "").strip() in ("None", "Original"):     # other A1111 modes stay unsupported
        kwargs["emphasis"] = fields.pop("Emphasis").strip().lower()
    if fields.get("Prompt syntax", "").strip() in SYNTAXES:
        kwargs["prompt_syntax"] = fields.pop("Prompt syntax").strip()
    return kwargs


def _write_sampler(r: Request, i: int, m: ModelInfo) -> dict[str, object]:
    spec = r.spec
    return {"Sampler": spec.label, "Schedule type": spec.schedule_type}


def _write_options(r: Request, i: int, m: ModelInfo) -> dict[str, object]:
    return {option.infotext: r.sampler_options.get(option.name) for option in r.spec.options}


def _write_batch(r: Request, i: int, m: ModelInfo) -> dict[str, object]:
    return {"Batch size": r.num_images, "Batch pos": i} if r.num_images > 1 else {}


# In the order A1111 writes its fields.
INFOTEXT: tuple[Codec, ...] = (
    _plain("Steps", "steps", int),
    Codec(_write_sampler, _read_sampler),
    _plain("CFG scale", "guidance_scale", float),
    Codec(lambda r, i, m: {"Seed": r.all_seeds[i]}, lambda f, c: {"seed": _number(int, "Seed", f.pop("Seed"))}
          if "Seed" in f else {}),
    Codec(_write_seed_mode, _read_seed_mode),
    Codec(lambda r, i, m: {"Size": "{}x{}".format(*r.size)}, _read_size),
    Codec(lambda r, i, m: {"Model hash": m.hash, "Model": m.name, "VAE": m.vae}, _read_model),
    Codec(_write_hires, _read_hires),
    Codec(_write_inpaint, _read_inpaint),
    Codec(lambda r, i, m: {"Denoising strength": r.strength} if r.init_image is not None else {}, _read_strength),
    Codec(lambda r, i, m: {"Clip skip": r.clip_skip if r.clip_skip != 1 else None},
          lambda f, c: {"clip_skip": _number(int, "Clip skip", f.pop("Clip skip"))} if "Clip skip" in f else {}),
    Codec(lambda r, i, m: {"Emphasis": "None" if r.emphasis == "none" else None,
                           "Prompt syntax": "plain" if r.prompt_syntax == "plain" else None}, _read_syntax),
    Codec(lambda r, i, m: {"Loras": ", ".join(spec.text() for spec in r.loras) or None}, _read_loras),
    Codec(_write_control, _read_control),
    Codec(lambda r, i, m: {}, _read_hashes),
    Codec(_write_options, _read_options),
    Codec(_write_batch, _read_batch),
)


def _rebuild(cls: type[Request], values: dict) -> Request:
    return cls(**values)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return dict(a) == dict(b)
    return a == b
