"""A1111's generation JSON <-> sd15: request bodies with A1111's names and defaults, their mapping onto
`Request`s (one per batch), and the `info` / `parameters` of the answer.

    body = Txt2ImgBody.model_validate(json)           # unknown keys ignored, null means the default
    gen = plan(body, "txt2img", context)              # ValueError (-> 422) for anything that cannot run
    answer = response(gen, outcome, encode_png)       # {"images", "parameters", "info"}

The mapping is one function per concern (`MAPPINGS`), each returning `Request` keyword arguments shared
by every batch; a later feature adds a function, or, for an `alwayson_scripts` entry (ControlNet's
units), a mapping in `ALWAYSON` under the script's title. Batches
(A1111's n_iter) differ only in prompts and seeds, which `plan` sets: image i of the whole job has
seed + i, as A1111 numbers them (`seed_mode="a1111"`). Where A1111 and sd15 differ:
- defaults are A1111's API defaults (Euler, 50 steps, CFG 7, 512x512), not sd15's;
- an unknown sampler or schedule type is a 422 naming the valid ones (A1111 silently uses Euler);
- `eta` and `s_noise` become the sampler's options where it has them, else they are ignored (webuiapi
  always sends eta=1); a schedule type for a sampler that walks its own timesteps is ignored, as A1111;
- fields that ask for something sd15 does not do (face restoration, tiling, styles, a refiner, scripts'
  settings) are named in `info["ignored"]`, not silently dropped; a script by name is a 422.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, model_validator

from ..pipeline.hires import Hires, target
from ..pipeline.images import to_rgb
from ..pipeline.masks import Inpaint
from ..pipeline.request import ModelInfo, Request, random_seed
from ..sampling.registry import SAMPLERS, SamplerSpec, resolve_sampler, resolve_schedule_type
from ..sampling.schedule_types import SCHEDULE_TYPES
from . import controlnet
from .generation import Generation, Outcome
from ..pipeline.only_masked import resize_crop
from .images import decode_image, to_unit_tensor
from .limits import Limits

A1111_DEFAULT_SAMPLER = "Euler"          # the API's sampler_index default: what runs when none is named
A1111_FILLS = ("fill", "original", "latent noise", "latent nothing")    # inpainting_fill 0..3
RESIZE_MODES = {0: "Just resize", 1: "Crop and resize"}


class _Body(BaseModel):
    """Fields common to txt2img and img2img (A1111's StableDiffusionProcessing; its API defaults)."""
    model_config = ConfigDict(extra="ignore")       # unknown keys are ignored, as A1111's models do

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """A1111's fields are all Optional: null means "the default"."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    prompt: str | list[str] = ""
    negative_prompt: str | list[str] = ""
    styles: list[str] = []
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = A1111_DEFAULT_SAMPLER
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] = {}
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgBody(_Body):
    enable_hr: bool = False
    denoising_strength: float | None = None
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstpass_image: str | None = None


class Img2ImgBody(_Body):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


def _no_controlnets(name: str):
    raise ValueError(f"ControlNet unit with model {name!r}: this server has no ControlNets (start it with "
                     "--controlnet-dir DIR)")


@dataclass
class Context:
    """What the mapping needs besides the body: the server's settings and where to note ignored fields."""
    limits: Limits
    clip_skip: int = 1                   # the options' CLIP_stop_at_last_layers
    noise_seed_delta: int = 0            # the options' eta_noise_seed_delta
    model_aliases: Callable[[str], bool] = lambda name: True    # does a model name mean the loaded one?
    can_save: bool = False               # an output folder is configured (save_images)
    ignored: list[str] = field(default_factory=list)
    batch_size: int = 1                  # after A1111's init-image rule (img2img)
    controlnet: Callable[[str], Any] = lambda name: _no_controlnets(name)   # a model name -> a loaded ControlNet
    pixels_spent: int = 0                # by the request's images so far (spend)

    def spend(self, pixels: int, what: str) -> None:
        """Charge an uploaded image to the request's pixel budget, before it is decoded."""
        self.pixels_spent += pixels
        if self.pixels_spent > self.limits.max_request_pixels:
            raise ValueError(f"{what}: the request's images add up to more than {self.limits.max_request_pixels} "
                             "pixels; send fewer or smaller images")

    def ignore(self, name: str) -> None:
        if name not in self.ignored:
            self.ignored.append(name)


# ---- one function per concern, each returning Request keyword arguments --------------------------------

def sampler_fields(body: _Body, ctx: Context) -> dict:
    spec = resolve_a1111_sampler(body.sampler_name or body.sampler_index or A1111_DEFAULT_SAMPLER, body.scheduler)
    options = {}
    for option in spec.options:
        if option.infotext in ("Eta", "Eta DDIM") and body.eta is not None:    # A1111's eta: DDIM's or ancestral
            options["eta"] = body.eta
        elif option.name == "s_noise" and body.s_noise is not None:
            options["s_noise"] = body.s_noise
    if body.eta not in (None, 0) and "eta" not in options:
        ctx.ignore("eta")
    if body.s_noise not in (None, 1) and "s_noise" not in options:
        ctx.ignore("s_noise")
    for name in ("s_churn", "s_tmin", "s_tmax", "s_min_uncond"):      # k-diffusion's churn: not in sd15
        if getattr(body, name) not in (None, 0):
            ctx.ignore(name)
    return {"sampler": spec.full_name, "sampler_options": options}


def resolve_a1111_sampler(name: str, scheduler: str | None) -> SamplerSpec:
    """A1111's get_sampler_and_scheduler: a schedule type at the end of the name wins over `scheduler`;
    "automatic" is the sampler's own default; samplers that walk their own timesteps ignore it."""
    base, named = _split_schedule(name)
    try:
        resolve_sampler(base)
    except ValueError:
        labels = ", ".join(s.label for s in SAMPLERS.values())
        raise ValueError(f"unknown sampler {name!r}; this server has: {labels} (GET /sdapi/v1/samplers; the "
                         f"schedule type goes in 'scheduler': Automatic, "
                         f"{', '.join(s.label for s in SCHEDULE_TYPES.values())})") from None
    schedule = named or (resolve_schedule_type(scheduler) if scheduler is not None else None)
    if schedule is None:
        return resolve_sampler(base)
    spec = resolve_sampler(base)
    if schedule not in spec.accepted_schedules and spec.accepted_schedules == ("uniform",) and not named:
        return spec                  # DDIM, PLMS, UniPC, ...: A1111 ignores the scheduler for these too
    return resolve_sampler(base, SCHEDULE_TYPES[schedule].label)


def _split_schedule(name: str) -> tuple[str, str | None]:
    """("DPM++ 2M", "karras") from "DPM++ 2M Karras"; (name, None) when no schedule type ends it."""
    if not isinstance(name, str):
        raise ValueError(f"sampler_name must be a string such as 'Euler a', got {name!r}")
    spellings = sorted(((s, key) for key, st in SCHEDULE_TYPES.items() for s in (st.label, key)),
                       key=lambda p: -len(p[0]))
    text = name.strip()
    for spelled, key in spellings:
        for sep in (" ", "_"):
            if text.lower().endswith(sep + spelled.lower()) and len(text) > len(spelled) + 1:
                base = text[: -len(spelled) - 1]
                try:
                    resolve_sampler(base)
                    return base, key
                except ValueError:
                    pass
    return text, None


def guidance_fields(body: _Body, ctx: Context) -> dict:
    return {"steps": body.steps, "guidance_scale": body.cfg_scale}


def size_fields(body: _Body, ctx: Context) -> dict:
    if body.width * body.height > ctx.limits.max_pixels and body.width > 0 and body.height > 0:
        raise ValueError(f"{body.width}x{body.height} is {body.width * body.height} pixels; this server generates at "
                         f"most {ctx.limits.max_pixels} per image")
    return {"width": body.width, "height": body.height}


def text_fields(body: _Body, ctx: Context) -> dict:
    """Clip skip and ENSD: the options' values, or override_settings' for this request."""
    overrides = dict(body.override_settings)
    clip_skip = overrides.pop("CLIP_stop_at_last_layers", ctx.clip_skip)
    ensd = overrides.pop("eta_noise_seed_delta", ctx.noise_seed_delta)
    model = overrides.pop("sd_model_checkpoint", None)
    if model is not None and not ctx.model_aliases(model):
        raise ValueError(f"override_settings asks for model {model!r}, which is not the loaded one; switch models "
                         "first with POST /sdapi/v1/options {\"sd_model_checkpoint\": ...}")
    for key in overrides:
        ctx.ignore(f"override_settings.{key}")
    return {"clip_skip": clip_skip, "noise_seed_delta": ensd}


def seed_fields(body: _Body, ctx: Context) -> dict:
    """The variation seed settings; the seeds themselves are set per batch (`plan`)."""
    resize = None
    if body.seed_resize_from_w > 0 and body.seed_resize_from_h > 0:
        resize = (body.seed_resize_from_w, body.seed_resize_from_h)
    return {"seed_mode": "a1111", "subseed_strength": body.subseed_strength, "seed_resize_from": resize}


def unsupported_fields(body: _Body, ctx: Context) -> dict:
    if body.script_name not in (None, "", "None"):
        raise ValueError(f"script {body.script_name!r} not found: this server has no scripts (GET /sdapi/v1/scripts)")
    flags = {"restore_faces": body.restore_faces, "tiling": body.tiling, "styles": body.styles,
             "refiner_checkpoint": body.refiner_checkpoint, "disable_extra_networks": body.disable_extra_networks,
             "infotext": body.infotext}
    for name, value in flags.items():
        if value:
            ctx.ignore(name)
    if body.save_images and not ctx.can_save:
        ctx.ignore("save_images")
    return {}


# alwayson_scripts title (lower case, as A1111 matches them) -> its mapping: (the script's {"args": [...]}
# entry, context) -> Request keyword arguments. ControlNet's units plug in here.
ALWAYSON: dict[str, Callable[[Any, Context], dict]] = {"controlnet": controlnet.units}


def alwayson_fields(body: _Body, ctx: Context) -> dict:
    """The always-on scripts sd15 has a mapping for; the others are named in info["ignored"] (A1111 would
    answer 422, but clients such as webuiapi send the scripts they detected, empty, on every request)."""
    out: dict[str, Any] = {}
    for title, entry in body.alwayson_scripts.items():
        mapping = ALWAYSON.get(title.lower())
        if mapping is None:
            ctx.ignore(f"alwayson_scripts.{title}")
        else:
            out |= mapping(entry, ctx)
    return out


def hires_fields(body: Txt2ImgBody, ctx: Context) -> dict:
    if body.firstphase_width or body.firstphase_height:
        ctx.ignore("firstphase_width")
    if not body.enable_hr:
        return {}
    if body.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        ctx.ignore("hr_checkpoint_name")
    kwargs: dict[str, Any] = {"upscaler": body.hr_upscaler or "Latent", "steps": body.hr_second_pass_steps,
                              "prompt": body.hr_prompt or None, "negative_prompt": body.hr_negative_prompt or None}
    if body.denoising_strength is not None:
        kwargs["denoising_strength"] = body.denoising_strength
    if body.hr_resize_x or body.hr_resize_y:
        kwargs["resize"] = (body.hr_resize_x, body.hr_resize_y)         # a resize wins over the scale, as A1111
    else:
        kwargs["scale"] = body.hr_scale
    same_sampler = body.hr_sampler_name in (None, "", "Use same sampler")
    same_schedule = body.hr_scheduler in (None, "", "Use same scheduler")
    if not (same_sampler and same_schedule):
        name = body.sampler_name or body.sampler_index if same_sampler else body.hr_sampler_name
        schedule = body.scheduler if same_schedule else body.hr_scheduler
        kwargs["sampler"] = resolve_a1111_sampler(name, schedule).full_name
    hires = Hires(**kwargs)
    w, h = target(body.width, body.height, hires).size
    if w * h > ctx.limits.max_pixels:
        raise ValueError(f"the hires fix would make {w}x{h} images; this server generates at most "
                         f"{ctx.limits.max_pixels} pixels per image (lower hr_scale or hr_resize)")
    return {"hires": hires}


def init_fields(body: Img2ImgBody, ctx: Context) -> dict:
    """init_images (resized as resize_mode says), denoising_strength and the inpainting mask."""
    sources = body.init_images
    if not sources:
        raise ValueError("img2img needs init_images: a list of base64 images")
    if len(sources) > ctx.limits.max_init_images:
        raise ValueError(f"{len(sources)} init images; this server takes at most {ctx.limits.max_init_images}")
    if body.resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode {body.resize_mode} is not supported; sd15 has "
                         f"{', '.join(f'{k} ({v})' for k, v in RESIZE_MODES.items())}")
    size = (body.width, body.height)
    if body.width <= 0 or body.height <= 0:           # before the resizes below divide by them
        raise ValueError(f"width and height must be positive, got {body.width}x{body.height}")
    images = [to_rgb(decode_image(s, f"init_images[{i}]", ctx.limits.max_image_pixels, ctx.spend)) for i, s in enumerate(sources)]
    if body.resize_mode == 1:
        images = [resize_crop(img, *size) for img in images]       # A1111's resize mode 1
    if len(images) == 1:
        init = images[0]                             # the request resizes it (Lanczos: A1111's "Just resize")
    else:                                            # one tensor for the batch, each image at the size first
        init = torch.stack([to_unit_tensor(img if img.size == size else img.resize(size, resample=Image.LANCZOS))
                            for img in images])
    if body.initial_noise_multiplier not in (None, 1):
        ctx.ignore("initial_noise_multiplier")
    out = {"init_image": init, "strength": body.denoising_strength, "width": body.width, "height": body.height}
    if body.mask is not None:
        out["inpaint"] = inpaint_of(body, ctx)
    return out


def inpaint_of(body: Img2ImgBody, ctx: Context) -> Inpaint:
    blur_x, blur_y = (body.mask_blur, body.mask_blur) if body.mask_blur is not None else (body.mask_blur_x,
                                                                                            body.mask_blur_y)
    if blur_x != blur_y:
        raise ValueError(f"mask_blur_x {blur_x} and mask_blur_y {blur_y} differ; sd15 blurs masks alike both ways "
                         "(give mask_blur)")
    if body.inpainting_fill not in range(len(A1111_FILLS)):
        raise ValueError(f"inpainting_fill must be 0 to 3 ({', '.join(A1111_FILLS)}), got {body.inpainting_fill}")
    if body.inpainting_mask_invert not in (0, 1):
        raise ValueError(f"inpainting_mask_invert must be 0 or 1, got {body.inpainting_mask_invert}")
    if not body.mask_round:
        ctx.ignore("mask_round")
    mask = decode_image(body.mask, "mask", ctx.limits.max_image_pixels, ctx.spend)
    return Inpaint(mask, blur=blur_x, fill=A1111_FILLS[body.inpainting_fill], blend="a1111",
                   only_masked=body.inpaint_full_res, padding=body.inpaint_full_res_padding,
                   invert=bool(body.inpainting_mask_invert))


# What each kind of request maps; a feature that adds fields adds its function here.
MAPPINGS: dict[str, list[Callable[[Any, Context], dict]]] = {
    "txt2img": [unsupported_fields, sampler_fields, guidance_fields, size_fields, text_fields, seed_fields,
                hires_fields, alwayson_fields],
    "img2img": [unsupported_fields, sampler_fields, guidance_fields, size_fields, text_fields, seed_fields,
                init_fields, alwayson_fields],
}


def _per_image(value: str | list[str], total: int, name: str) -> list[str]:
    if isinstance(value, str):
        return [value] * total
    if len(value) == 1:
        return list(value) * total
    if len(value) != total:
        raise ValueError(f"{name} is a list of {len(value)}; give one, or one per image ({total}: batch_size x n_iter)")
    return list(value)


def _batch_size(body: _Body, kind: str) -> int:
    """A1111's img2img rule: n init images with n <= batch_size make the batch n; more is an error."""
    n = len(body.init_images or ()) if kind == "img2img" else 0
    if n > 1:
        if n > body.batch_size:
            raise ValueError(f"{n} init images for a batch of {body.batch_size}: give at most batch_size images")
        return n
    return body.batch_size


def plan(body: _Body, kind: str, ctx: Context) -> Generation:
    """The job's Requests, one per batch, all validated now (ValueError for anything that cannot run)."""
    batch = _batch_size(body, kind)
    if not 1 <= body.n_iter or not 1 <= batch:
        raise ValueError(f"batch_size and n_iter must be at least 1, got {body.batch_size} and {body.n_iter}")
    total = batch * body.n_iter
    if total > ctx.limits.max_images:
        raise ValueError(f"batch_size x n_iter = {total} images; this server makes at most {ctx.limits.max_images} "
                         "per request")
    ctx.batch_size = batch
    prompts = _per_image(body.prompt, total, "prompt")
    negatives = _per_image(body.negative_prompt, total, "negative_prompt")
    longest = max(len(t) for t in prompts + negatives)
    if longest > ctx.limits.max_prompt_chars:
        raise ValueError(f"a prompt of {longest} characters; this server takes at most {ctx.limits.max_prompt_chars}")
    shared: dict[str, Any] = {}
    for mapping in MAPPINGS[kind]:
        shared |= mapping(body, ctx)
    seed = random_seed() if body.seed == -1 else body.seed
    subseed = random_seed() if body.subseed == -1 else body.subseed
    requests = []
    for n in range(body.n_iter):
        ps, ns = prompts[n * batch:(n + 1) * batch], negatives[n * batch:(n + 1) * batch]
        if len(set(ps)) == 1 and len(set(ns)) == 1:
            texts = {"prompt": ps[0], "negative_prompt": ns[0], "batch_size": batch}
        else:
            texts = {"prompt": tuple(ps), "negative_prompt": tuple(ns), "batch_size": 1}
        step = n * batch if shared["subseed_strength"] == 0 else 0     # A1111: the seed stays, the subseed moves
        requests.append(Request(**shared, **texts, seed=seed + step, subseed=subseed + n * batch))
        if "init_image" in shared:                                     # converted once, shared by the batches
            shared["init_image"] = requests[-1].init_image
    echo = body.model_dump()
    if kind == "img2img" and not body.include_init_images:            # A1111 leaves them out of the echo
        echo["init_images"], echo["mask"] = None, None
    return Generation(kind, tuple(requests), echo, tuple(ctx.ignored), body.send_images,
                      body.save_images and ctx.can_save, tuple(body.styles))


# ---- the answer ---------------------------------------------------------------------------------------------

def version() -> str:
    try:
        return f"sd15 {metadata.version('sd15')}"
    except metadata.PackageNotFoundError:
        return "sd15"


def info(gen: Generation, out: Outcome) -> dict:
    """A1111's Processed.js() for the images made (plus sd15's n_iter, interrupted and ignored)."""
    first = gen.requests[0]
    texts = [r.per_image() for r in out.requests]
    prompts = [t[0][i] for t, i in zip(texts, out.index_in_request)]
    negatives = [t[1][i] for t, i in zip(texts, out.index_in_request)]
    seeds = [r.all_seeds[i] for r, i in zip(out.requests, out.index_in_request)]
    subseeds = [r.all_subseeds[i] for r, i in zip(out.requests, out.index_in_request)]
    first_prompts, first_negatives = first.per_image()
    model = out.model or ModelInfo()
    strength = first.strength if gen.kind == "img2img" else (first.hires.denoising_strength if first.hires else None)
    return {
        "prompt": first_prompts[0], "all_prompts": prompts,
        "negative_prompt": first_negatives[0], "all_negative_prompts": negatives,
        "seed": seeds[0] if seeds else first.seed, "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else first.subseed, "all_subseeds": subseeds,
        "subseed_strength": first.subseed_strength, "width": first.size[0], "height": first.size[1],
        "sampler_name": first.spec.label, "cfg_scale": first.guidance_scale, "steps": first.steps,
        "batch_size": first.num_images, "n_iter": len(gen.requests),
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model.name, "sd_model_hash": model.hash, "sd_vae_name": model.vae, "sd_vae_hash": None,
        "seed_resize_from_w": first.seed_resize_from[0] if first.seed_resize_from else -1,
        "seed_resize_from_h": first.seed_resize_from[1] if first.seed_resize_from else -1,
        "denoising_strength": strength,
        "extra_generation_params": {"Schedule type": first.spec.schedule_type},
        "index_of_first_image": 0,
        "infotexts": [image.info.get("parameters", "") for image in out.images],
        "styles": list(gen.styles), "job_timestamp": out.job_timestamp, "clip_skip": first.clip_skip,
        "is_using_inpainting_conditioning": bool(out.inpainting_model and first.inpaint is not None),
        "version": version(),
        "interrupted": out.interrupted, "ignored": list(gen.ignored),
    }


def response(gen: Generation, out: Outcome, encode: Callable[[Image.Image, str | None], str]) -> dict:
    images = [encode(image, image.info.get("parameters")) for image in out.images] if gen.send_images else []
    return {"images": images, "parameters": gen.echo, "info": json.dumps(info(gen, out), ensure_ascii=False)}
