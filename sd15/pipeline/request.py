"""`Request`: one generation, as every front end states it (Python API, CLI, infotexts, the coming
server and batch files), validated once when it is made.

    req = Request("a lighthouse at dusk", negative_prompt="blurry", steps=25, seed=42)
    req = Request("the same in winter", init_image="in.png", strength=0.6)   # img2img: an init image
    images = pipe.generate(req)
    text = req.infotext(model=pipe.model_info)               # what the PNG's parameters chunk holds
    back = Request.from_infotext(text)                       # ... and back: back.request == req

A request is frozen: derive variants with `dataclasses.replace(req, seed=7)`, which validates again.
Sibling features add their inputs (mask, control images, adapters, hires fix) as fields here, each with
its check in `__post_init__`, its infotext keys in `_fields_for_infotext` / `from_infotext`, and a stage.
"""

import dataclasses
import secrets
import types
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..models.config import VAEConfig
from ..sampling import SamplerSpec, kept_steps, resolve_sampler
from . import validation
from .images import Pixels
from .infotext import format_infotext, parse_infotext

# What SD1.5 users expect today: DPM++ 2M Karras converges in 20-30 steps (A1111's and ComfyUI's
# usual choice); diffusers' own default (PNDM, 50 steps) is twice the work for no visible gain.
DEFAULT_SAMPLER = "DPM++ 2M Karras"
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5          # the value SD 1.5 was tuned around
DEFAULT_SIZE = 512              # SD 1.5's training size
DEFAULT_STRENGTH = 0.75         # img2img, as A1111's and diffusers' default
SD1_DOWNSCALE = VAEConfig().downscale    # pixels per latent pixel; the pipeline re-checks its own VAE's

# Infotext keys that describe the model or the image, not a setting: read back as information.
INFORMATIONAL = ("Model", "Model hash", "VAE", "VAE hash", "Batch pos", "Version")


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
    width: int | None = None            # None: DEFAULT_SIZE, or the init image's width
    height: int | None = None
    steps: int = DEFAULT_STEPS
    sampler: str = DEFAULT_SAMPLER      # any spelling; kept as the canonical name ("dpmpp_2m_karras")
    sampler_options: Mapping[str, float] = dataclasses.field(default_factory=dict)  # {"eta": 0.5}; defaults dropped
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int | None = None             # None: a random seed, picked when the generation starts
    batch_size: int = 1                 # images per prompt
    init_image: Pixels | None = None    # img2img; a PIL image, path or tensor is converted (see Pixels)
    strength: float | None = None       # img2img: share of the schedule re-run; None: DEFAULT_STRENGTH (1 without image)
    latents: torch.Tensor | None = None  # replaces the seeded initial noise, [images, 4, height/8, width/8]

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("prompt", validation.texts(self.prompt, "prompt"))
        set_("negative_prompt", validation.texts(self.negative_prompt, "negative_prompt"))
        if isinstance(self.negative_prompt, tuple) and len(self.negative_prompt) != len(self.prompts):
            raise ValueError(f"{len(self.negative_prompt)} negative prompts for {len(self.prompts)} prompts; "
                             "give one each, or one string for all")
        spec = resolve_sampler(self.sampler)
        set_("sampler", spec.name)
        if not isinstance(self.sampler_options, Mapping):
            raise ValueError(f"sampler_options must be a mapping such as {{'eta': 0.5}}, got {self.sampler_options!r}")
        checked = spec.check_options(self.sampler_options)
        defaults = {o.name: o.default for o in spec.options}
        set_("sampler_options", types.MappingProxyType({k: v for k, v in checked.items() if v != defaults[k]}))
        validation.check_guidance(self.guidance_scale)
        set_("guidance_scale", float(self.guidance_scale))
        validation.check_seed(self.seed)
        validation.check_batch(self.batch_size)
        validation.check_batch(self.num_images, "images in one batch (prompts x batch size)")

        if self.init_image is None:
            set_("strength", 1.0 if self.strength is None else self.strength)
            kept_steps(self.steps, self.strength)
            if self.strength != 1:
                raise ValueError(f"strength {self.strength} needs an init image; txt2img runs the whole schedule")
            set_("width", DEFAULT_SIZE if self.width is None else self.width)
            set_("height", DEFAULT_SIZE if self.height is None else self.height)
            validation.check_size(self.width, self.height, SD1_DOWNSCALE)
        else:
            set_("strength", DEFAULT_STRENGTH if self.strength is None else self.strength)
            kept_steps(self.steps, self.strength)          # steps and strength before reading the image
            size = None
            if self.width is not None or self.height is not None:
                if self.width is None or self.height is None:
                    raise ValueError("give both width and height to resize the init image, or neither")
                validation.check_size(self.width, self.height, SD1_DOWNSCALE)
                size = (self.width, self.height)
            set_("init_image", Pixels.of(self.init_image, size))
            set_("width", self.init_image.size[0])
            set_("height", self.init_image.size[1])
            if self.num_images % len(self.init_image):
                raise ValueError(f"{len(self.init_image)} init images cannot be spread over a batch of "
                                 f"{self.num_images} images")
        set_("strength", float(self.strength))
        if self.latents is not None and not isinstance(self.latents, torch.Tensor):
            raise ValueError(f"latents must be a tensor, got {type(self.latents).__name__}")

    # ---- derived --------------------------------------------------------------------------------------

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
        return self if self.seed is not None else dataclasses.replace(self, seed=random_seed())

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))

    __hash__ = None

    # ---- infotext -------------------------------------------------------------------------------------

    def infotext(self, index: int = 0, model: ModelInfo = ModelInfo()) -> str:
        """A1111's infotext of image `index` of this request (its own prompt; the batch position if > 1)."""
        prompts, negatives = self.per_image()
        return format_infotext(prompts[index], negatives[index], self._fields_for_infotext(index, model))

    def _fields_for_infotext(self, index: int, model: ModelInfo) -> dict[str, object]:
        spec = self.spec
        fields = {"Steps": self.steps, "Sampler": spec.label, "Schedule type": spec.schedule_type,
                  "CFG scale": self.guidance_scale, "Seed": self.seed, "Size": f"{self.width}x{self.height}",
                  "Model hash": model.hash, "Model": model.name, "VAE": model.vae}
        if self.init_image is not None:
            fields["Denoising strength"] = self.strength
        for option in spec.options:
            fields[option.infotext] = self.sampler_options.get(option.name)
        if self.num_images > 1:
            fields |= {"Batch size": self.num_images, "Batch pos": index}
        return fields

    @classmethod
    def from_infotext(cls, text: str, **overrides) -> "FromInfotext":
        """The request an infotext describes (`overrides` replace fields), and what it said besides.

        Reading is lenient where A1111 is: fields sd15 does not use are returned in `unsupported` for
        the caller to name in a warning. A "Denoising strength" with no init image among the overrides
        cannot be honoured: it is returned in `unsupported` and the request is txt2img.
        """
        info = parse_infotext(text)
        fields = dict(info.fields)
        kwargs: dict[str, object] = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}
        known = {"Steps": ("steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
                 "Batch size": ("batch_size", int)}
        for key, (name, kind) in known.items():
            if key in fields:
                kwargs[name] = _parse(key, fields.pop(key), kind)
        if "Size" in fields:
            kwargs["width"], kwargs["height"] = _parse_size(fields.pop("Size"))
        if "Sampler" in fields:
            label, schedule = fields.pop("Sampler"), fields.pop("Schedule type", "Automatic")
            kwargs["sampler"] = label if schedule.strip().lower() in ("automatic", "") else f"{label} {schedule}"
        unsupported: dict[str, str] = {}
        sampler = overrides.get("sampler", kwargs.get("sampler", DEFAULT_SAMPLER))
        options = {}
        for option in resolve_sampler(sampler).options:
            if option.infotext in fields:
                options[option.name] = _parse(option.infotext, fields.pop(option.infotext), float)
        if options:
            kwargs["sampler_options"] = options
        if "Denoising strength" in fields:
            strength = fields.pop("Denoising strength")
            if overrides.get("init_image") is not None:
                kwargs["strength"] = _parse("Denoising strength", strength, float)
            else:
                unsupported["Denoising strength"] = strength
        extra = {k: fields.pop(k) for k in INFORMATIONAL if k in fields}
        unsupported |= fields
        request = cls(**(kwargs | overrides))
        pos = extra.get("Batch pos")
        return FromInfotext(request, ModelInfo(extra.get("Model"), extra.get("Model hash"), extra.get("VAE")),
                            int(pos) if pos is not None and pos.isdigit() else None, extra.get("Version"),
                            unsupported)


@dataclass(frozen=True)
class FromInfotext:
    request: Request
    model: ModelInfo                  # the model the infotext names (not necessarily the one loaded)
    batch_pos: int | None             # which image of the regenerated batch the infotext describes
    version: str | None               # the writer's "Version" field, e.g. A1111's "v1.10.1"
    unsupported: dict[str, str]       # fields sd15 does not apply: warn about them


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return dict(a) == dict(b)
    return a == b


def _parse(key: str, value: str, kind: type) -> int | float:
    try:
        return kind(value) if kind is not int else int(value.strip())
    except ValueError:
        raise ValueError(f"infotext field {key}: {value!r} is not a {kind.__name__}") from None


def _parse_size(value: str) -> tuple[int, int]:
    width, sep, height = value.strip().partition("x")
    if not sep:
        raise ValueError(f"infotext field Size: {value!r} is not WIDTHxHEIGHT")
    return _parse("Size", width, int), _parse("Size", height, int)
