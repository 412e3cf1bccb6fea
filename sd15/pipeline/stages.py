"""The stages of a generation. `Pipeline.generate` is their composition:

    run    = prepare(models, request)             the request checked against these models, seed fixed
    cond   = conditioning(models, run)            prompts -> text states (cond, uncond)
    start  = initial_latents(models, run)         noise, or an encoded init image and its noise
    x      = denoise(models, run, cond, start)    the sampler over the guided UNet
    pixels = decode(models, x)                    latents -> images (float32 retry for a NaN)
    images = annotate(pixels, run, model info)    PIL images carrying the seed and the A1111 infotext

txt2img and img2img differ only in `initial_latents`; an inpainting mask, a ControlNet or a hires pass
is a new field of the request and a new stage (or a wrapper of the model inside `denoise`), not a new
method. Stages read the shared models and change none of them, so generations on several threads can
share one set of models (see docs/architecture.md, "Threads").

Seeds follow diffusers (docs/architecture.md, "Seeds"): one CPU generator per generation; the initial
noise for the whole batch is drawn first (img2img: the VAE posterior sample, then the forward noise),
then whatever the sampler draws per step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..adapters.apply import Use
from ..adapters.library import TAG_KINDS, spec_from_tag
from ..adapters.names import module_index
from ..conditioning.prompts import Conditioning, PromptEncoder, encode_conditioning, split_tags
from ..models.latents import to_diffusion
from ..sampling import GeneratorNoise, NoiseSource, Plan, guided, make_plan, sample
from ..sampling.guidance import guided_by_step, stack_padded
from . import validation, vae_io
from .images import tensor_to_pil
from .request import ModelInfo, Request

if TYPE_CHECKING:
    from .pipeline import Pipeline as Models     # the stages use its models, device and dtype only

log = logging.getLogger("sd15")
Progress = Callable[[int, int, torch.Tensor], None]   # (step, total, latents after that step)


def ti_name(name: str) -> str:
    """An embedding's name as A1111's "TI hashes" field spells it."""
    return name.replace(":", "").replace(",", "")


def sampler_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The sampler's state and arithmetic stay in float32 (float64 for float64 models) whatever the
    models' dtype: a fp16 UNet's predictions are cast up before guidance and the update, and x is cast
    down only as the UNet's input. diffusers keeps fp16 latents between steps; this loses less."""
    return torch.promote_types(model_dtype, torch.float32)


@dataclass(frozen=True, eq=False)
class Run:
    """A request on its way through the stages: seed fixed, plan made, noise source built."""
    request: Request
    plan: Plan
    noise: NoiseSource
    latent_shape: tuple[int, int, int, int]     # [images, VAE latent channels, height / f, width / f]


@dataclass(frozen=True, eq=False)
class Start:
    initial_noise: torch.Tensor         # on the device, in the sampler's dtype
    x0: torch.Tensor | None = None      # img2img: the clean latents of the init image


def prepare(models: Models, request: Request) -> Run:
    """Check what depends on these models (latent size), fix the seed, make the plan. No model work."""
    request = request.with_seed()
    factor, channels = models.vae.cfg.downscale, models.vae.cfg.latent_channels
    width, height = request.size
    validation.check_size(width, height, factor)
    shape = (request.num_images, channels, height // factor, width // factor)
    if request.latents is not None and tuple(request.latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape} for this request, got {tuple(request.latents.shape)}")
    plan = make_plan(request.spec, request.steps, request.strength, request.sampler_options)
    return Run(request, plan, GeneratorNoise.seeded(request.seed, models.dtype), shape)


def adapters(models: Models, run: Run) -> list[Use]:
    """The LoRAs of a generation: the request's own (names or paths), then the <lora:...> tags of its
    first prompt (A1111 reads extra networks from the first prompt of a batch; names only)."""
    r = run.request
    index = module_index(models.unet.cfg, models.text_encoder.cfg)
    specs = [(spec, True) for spec in r.loras]
    if r.prompt_syntax == "a1111":
        tags = split_tags(r.prompts[0])[1]
        specs += [(spec_from_tag(t.args), False) for t in tags if t.kind in TAG_KINDS]
        later = {str(t) for p in r.prompts[1:] for t in split_tags(p)[1] if t.kind in TAG_KINDS} - set(map(str, tags))
        if later:
            log.warning("LoRA tags are read from the first prompt of a batch only (as in A1111); not used: %s",
                        ", ".join(sorted(later)))
    uses = []
    for spec, paths_allowed in specs:
        adapter = models.loras.load(spec, index, paths_allowed)
        if adapter.unmatched:
            log.warning("LoRA %s: %d of its modules match none of this model's and are skipped: %s%s",
                        adapter.name, len(adapter.unmatched), ", ".join(adapter.unmatched[:6]),
                        " ..." if len(adapter.unmatched) > 6 else "")
        uses.append(Use(adapter, spec.te, spec.unet, spec.dyn))
    return uses


def conditioning(models: Models, run: Run) -> Conditioning:
    """The prompts' states per image and step (A1111's prompt language unless the request says "plain")."""
    r = run.request
    prompts, negatives = r.per_image()
    cond = encode_conditioning(PromptEncoder(models.tokenizer, models.text_encoder, models.embeddings), prompts,
                               negatives, steps=r.steps, clip_skip=r.clip_skip, syntax=r.prompt_syntax,
                               emphasis=r.emphasis, guidance_scale=r.guidance_scale)
    for tag in cond.tags:
        if tag.kind not in TAG_KINDS:
            log.warning("%s: this kind of extra network is not supported; the tag was removed from the prompt", tag)
    return cond


def initial_latents(models: Models, run: Run) -> Start:
    state = sampler_dtype(models.dtype)
    image = run.request.init_image
    if image is None:
        noise = run.request.latents if run.request.latents is not None else run.noise.draw(run.latent_shape)
        return Start(noise.to(models.device, state))
    # diffusers' order: the posterior sample first, then the forward-process noise.
    mean, logvar = vae_io.encode_distribution(models.vae, image.tensor.to(models.device, models.dtype))
    eps = run.noise.draw(tuple(mean.shape)).to(models.device, state)
    mean, logvar = mean.to(state), logvar.to(state)
    x0 = to_diffusion(mean + torch.exp(0.5 * logvar) * eps).repeat(run.latent_shape[0] // len(image), 1, 1, 1)
    return Start(run.noise.draw(tuple(x0.shape)).to(models.device, state), x0)


def denoise(models: Models, run: Run, cond: Conditioning, start: Start,
            progress: Progress | None = None) -> torch.Tensor:
    """The sampler over the guided UNet; `progress(step, total, latents)` after each step."""
    scale = run.request.guidance_scale
    if cond.simple:        # one text per image, no schedule: the batched path diffusers' parity is held to
        texts, untexts = cond.at(0)
        model = guided(models.unet, stack_padded([parts[0][1] for parts in texts]),
                       None if untexts is None else stack_padded(untexts), scale)
    else:
        model = guided_by_step(models.unet, cond.at, scale)
    x = None
    for i, x in enumerate(sample(run.plan, model, start.initial_noise, start.x0, source=run.noise), start=1):
        if progress is not None:
            progress(i, run.plan.num_steps, x)
    return x


def decode(models: Models, latents: torch.Tensor) -> torch.Tensor:
    return vae_io.decode(models.vae, latents)


def annotate(pixels: torch.Tensor, run: Run, model: ModelInfo, cond: Conditioning,
             uses: list[Use] = ()) -> list[Image.Image]:
    """PIL images, each with `.info["seed"]` and `.info["parameters"]` (its A1111 infotext)."""
    images = tensor_to_pil(pixels)
    extra = {}
    if uses:                        # A1111's form too: "name: hash, ..."
        extra["Lora hashes"] = ", ".join(dict.fromkeys(f"{ti_name(u.adapter.name)}: {u.adapter.hash}" for u in uses))
    if cond.embeddings:             # A1111's form: "name: hash, name: hash", names without ":" and ","
        extra["TI hashes"] = ", ".join(f"{ti_name(e.name)}: {e.hash}" for e in cond.embeddings)
    for i, image in enumerate(images):
        image.info["seed"] = run.request.seed
        image.info["parameters"] = run.request.infotext(i, model, extra)
    return images
