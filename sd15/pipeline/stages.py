"""The stages of a generation. `Pipeline.generate` is their composition:

    run    = prepare(models, request)             the request checked against these models, seed fixed
    cond   = conditioning(models, run)            prompts -> text states (cond, uncond)
    start  = initial_latents(models, run)         noise, or an encoded init image and its noise
    x      = denoise(models, run, cond, start)    the sampler over the guided UNet
    x      = hires_pass(models, run, x)           (hires fix only) upscale, then a second run at the new size
    pixels = decode(models, x)                    latents -> images (float32 retry for a NaN)
    images = annotate(pixels, run, model info)    PIL images carrying the seed and the A1111 infotext

txt2img and img2img differ only in `initial_latents`; an inpainting mask, a ControlNet or a hires pass
is a new field of the request and a new stage (or a wrapper of the model inside `denoise`), not a new
method. Stages read the shared models and change none of them, so generations on several threads can
share one set of models (see docs/architecture.md, "Threads").

Seeds (docs/architecture.md, "Seeds"): the request's seed mode picks the noise source, diffusers' one CPU
generator per generation (img2img: the VAE posterior sample, then the initial noise, then whatever the
sampler draws per step) or A1111's generator per image (`noise_source`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..adapters.apply import Use
from ..adapters.library import TAG_KINDS, spec_from_tag
from ..adapters.names import module_index
from ..conditioning.prompts import Conditioning, PromptEncoder, encode_conditioning, split_tags
from ..models.latents import to_diffusion
from ..sampling import (GeneratorNoise, ModelCall, NoiseSource, Plan, guided, hires_schedule, make_plan, noised,
                        predicted_x0, sample)
from ..sampling.consistency import embedded_guidance
from ..sampling.guidance import guided_by_step, stack_padded
from ..sampling.seeds import A1111Noise
from . import control, hires, validation, vae_io
from .masks import a1111_fill
from .masks import paste_back as masks_paste_back
from .images import pil_to_tensor, tensor_to_pil
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
    concat: torch.Tensor | None = None  # an inpainting UNet's extra input: [B, 1 + 4, h, w] mask, masked latents
    blend: "LatentBlend | None" = None  # a 4-channel UNet inpainting: the known latents blended in per step


@dataclass(frozen=True, eq=False)
class LatentBlend:
    """Inpainting with an ordinary UNet: outside the mask the state follows the original image."""
    mask: torch.Tensor        # [B, 1, h, w], 1 = repaint
    known: torch.Tensor       # [B, 4, h, w] clean latents of the init image
    noise: torch.Tensor       # the initial noise, re-used to noise `known` to each step's σ (diffusers)
    formula: str              # "diffusers": blend the sampler's state; "a1111": blend the x0 prediction


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
    return Run(request, plan, noise_source(request, models.dtype, factor), shape)


def noise_source(request: Request, dtype: torch.dtype, downscale: int) -> NoiseSource:
    """The request's seed policy: diffusers' one generator (drawing in the models' dtype, as diffusers does),
    or A1111's generator per image."""
    if request.seed_mode == "a1111":
        return A1111Noise(request.all_seeds, subseeds=request.all_subseeds if request.subseed_strength else (),
                          subseed_strength=request.subseed_strength, resize_from=request.seed_resize_from,
                          seed_delta=request.noise_seed_delta, downscale=downscale)
    return GeneratorNoise.seeded(request.seed, dtype)


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
    if run.request.inpaint is not None:
        return inpaint_latents(models, run)
    if image is None:
        noise = run.request.latents if run.request.latents is not None else run.noise.first(run.latent_shape)
        start = Start(noise.to(models.device, state))
    else:
        # diffusers' order: the posterior sample first, then the forward-process noise.
        x0 = encode_sample(models, run, image.tensor.to(models.device, models.dtype))
        x0 = x0.repeat(run.latent_shape[0] // len(image), 1, 1, 1)
        start = Start(run.noise.first(tuple(x0.shape)).to(models.device, state), x0)
    if inpainting_unet(models):
        start = replace(start, concat=repaint_everything(models, run))
    return start


def repaint_everything(models: Models, run: Run) -> torch.Tensor:
    """An inpainting UNet's extra input with no mask: all of it repainted, over a grey image (A1111, diffusers)."""
    b, _, h, w = run.latent_shape
    f = models.vae.cfg.downscale
    grey = torch.zeros((1, 3, h * f, w * f), device=models.device, dtype=models.dtype)
    concat = torch.cat([torch.ones((1, 1, h, w), device=models.device, dtype=sampler_dtype(models.dtype)),
                        encode_sample(models, run, grey)], dim=1)
    return concat.repeat(b, 1, 1, 1)


def inpainting_unet(models: Models) -> bool:
    """An inpainting UNet takes the noisy latents, the mask and the masked image's latents: 4 + 1 + 4."""
    return models.unet.cfg.in_channels == 2 * models.vae.cfg.latent_channels + 1


def inpaint_latents(models: Models, run: Run) -> Start:
    """Masks, the start and what the UNet or the blend needs, in diffusers' draw order: the image's posterior
    sample (a 4-channel UNet, or strength < 1), the initial noise, the masked image's posterior sample
    (an inpainting UNet). Strength 1 starts from pure noise, as diffusers' inpainting does."""
    r, state, f = run.request, sampler_dtype(models.dtype), models.vae.cfg.downscale
    image = r.init_image
    reps = run.latent_shape[0] // len(image)
    masks = r.inpaint.processed(image.size)
    pixels = image.tensor
    if r.inpaint.fill == "fill":    # A1111 fills the hole in pixels first; both the start and the blend use it
        blurred = r.inpaint.blurred(image.size)
        pixels = torch.cat([pil_to_tensor(a1111_fill(im, blurred)) for im in tensor_to_pil(pixels)])
    pixels = pixels.to(models.device, models.dtype)
    nine = inpainting_unet(models)
    x0 = encode_sample(models, run, pixels).repeat(reps, 1, 1, 1) if (not nine or r.strength < 1) else None
    noise = run.noise.first(run.latent_shape).to(models.device, state)
    mask = masks.latent(f).to(models.device, state).repeat(run.latent_shape[0], 1, 1, 1)
    concat = None
    if nine:        # A1111's conditioning image: lerp(src, src·(1 − mask), weight); weight 1 is diffusers' hole
        binary = masks.binary.to(models.device, models.dtype)
        masked = pixels * (1 - r.inpaint.mask_weight * binary)
        concat = torch.cat([mask, encode_sample(models, run, masked).repeat(reps, 1, 1, 1)], dim=1)
    else:           # diffusers encodes the masked image for a 4-channel UNet too, unused: its draw, not its VAE
        run.noise.posterior((len(image), *run.latent_shape[1:]))
    if x0 is not None and r.inpaint.fill.startswith("latent"):     # A1111's masked content, in latent space
        hole = r.inpaint.fill == "latent noise"
        x0 = x0 * (1 - mask) + (run.noise.draw(tuple(x0.shape)).to(x0) * mask if hole else 0)
    blend = None if nine else LatentBlend(mask, x0, noise, r.inpaint.blend)
    return Start(noise, x0 if r.strength < 1 else None, concat, blend)


def encode_sample(models: Models, run: Run, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> clean diffusion latents: a sample of the VAE posterior (its noise from the run's
    source), in the sampler's dtype."""
    state = sampler_dtype(models.dtype)
    mean, logvar = vae_io.encode_distribution(models.vae, images)
    eps = run.noise.posterior(tuple(mean.shape)).to(models.device, state)
    mean, logvar = mean.to(state), logvar.to(state)
    return to_diffusion(mean + torch.exp(0.5 * logvar) * eps)


def denoise(models: Models, run: Run, cond: Conditioning, start: Start,
            progress: Progress | None = None) -> torch.Tensor:
    """The sampler over the guided UNet; `progress(step, total, latents)` after each step."""
    scale = run.request.guidance_scale
    controls = run.request.control
    if models.unet.cfg.time_cond_proj_dim:
        if controls:
            raise ValueError("ControlNet with an LCM-distilled UNet is not supported")
        model = lcm_distilled(models, run, cond)
    elif cond.simple:        # one text per image, no schedule: the batched path diffusers' parity is held to
        texts, untexts = cond.at(0)
        c = stack_padded([parts[0][1] for parts in texts])
        u = None if untexts is None else stack_padded(untexts)
        model = guided(with_controls(models, run), c, u, scale)
    else:
        model = guided_by_step(with_controls(models, run), cond.at, scale)
    if start.concat is not None:
        model = with_image_conditioning(model, start.concat)
    after_step = None
    if start.blend is not None:
        model, after_step = blended(model, start.blend, run.plan)
    x = None
    for i, x in enumerate(sample(run.plan, model, start.initial_noise, start.x0, source=run.noise,
                                 after_step=after_step), start=1):
        if progress is not None:
            progress(i, run.plan.num_steps, x)
    return x


def with_controls(models: Models, run: Run):
    """The UNet callable guidance drives, with the request's ControlNets (if any) adding their residuals;
    their hints are made once per pass, at its size."""
    r = run.request
    if not r.control:
        return models.unet
    f = models.vae.cfg.downscale
    width, height = run.latent_shape[3] * f, run.latent_shape[2] * f
    # An init image is at the generation size already (the request resized it); a hires pass has none.
    mask = r.inpaint.processed(r.init_image.size).binary if r.inpaint is not None else None
    hints = [c.hint(width, height, r.init_image, mask) for c in r.control]
    return control.controlled(models.unet, r.control, hints, models.vae.cfg.latent_channels)


def with_image_conditioning(model, concat: torch.Tensor):
    """An inpainting UNet's input: the (already scaled) noisy latents, then the mask and the masked image's
    latents unscaled; guidance batches and indexes the rows, so both halves of CFG see the same ones."""
    def conditioned(x: torch.Tensor, call: ModelCall) -> torch.Tensor:
        return model(torch.cat([x, concat.to(x.dtype)], dim=1), call)
    return conditioned


def blended(model, blend: LatentBlend, plan: Plan):
    """A 4-channel UNet inpainting: (model, after_step).

    diffusers (StableDiffusionInpaintPipeline): after each step the state outside the mask is the original's
    latents noised to the next σ with the initial noise, the clean latents after the last step.
    A1111: the x0 prediction is blended with the clean latents inside every model call, and the result once
    more after the last step."""
    keep = 1 - blend.mask
    last = plan.num_steps - 1

    def diffusers_step(x: torch.Tensor, step: int) -> torch.Tensor:
        known = blend.known if step == last else noised(plan, blend.known, blend.noise, float(plan.sigmas[step + 1]))
        return keep * known + blend.mask * x

    if blend.formula == "diffusers":
        return model, diffusers_step

    def a1111_x0(x_in: torch.Tensor, call: ModelCall) -> torch.Tensor:
        eps = model(x_in, call)
        x0 = blend.mask * predicted_x0(x_in, eps, call.sigma) + keep * blend.known
        return (x_in * math.sqrt(call.sigma ** 2 + 1) - x0) / call.sigma      # the ε that predicts that x0

    def a1111_last(x: torch.Tensor, step: int) -> torch.Tensor:
        return keep * blend.known + blend.mask * x if step == last else x
    return a1111_x0, a1111_last


def lcm_distilled(models: Models, run: Run, cond: Conditioning):
    """An LCM-distilled UNet takes the guidance scale as an input (its guidance embedding) and runs one
    conditional pass per step: no negative prompt, as in diffusers' LatentConsistencyModelPipeline."""
    if not replace(cond, uncond=None).simple:      # the negatives are never run: their syntax does not matter
        raise ValueError("this checkpoint is an LCM-distilled UNet (guidance embedding): prompt editing, "
                         "alternation and AND need classifier-free guidance, which it does not run; use a "
                         "plain prompt, or LCM-LoRA on an ordinary SD1.5 checkpoint")
    if any(run.request.per_image()[1]):
        log.warning("this checkpoint is an LCM-distilled UNet: it runs no negative-prompt pass, so the negative "
                    "prompt is not used")
    texts, _ = cond.at(0)
    return embedded_guidance(models.unet, stack_padded([parts[0][1] for parts in texts]), run.request.guidance_scale)


def hires_pass(models: Models, run: Run, latents: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
    """The upscale and the img2img pass over the first pass's final latents; returns the final latents."""
    request, factor = run.request, models.vae.cfg.downscale
    t = hires.target(*request.size, request.hires, factor)
    upscaler = request.hires.upscaler
    second = hires.second_pass_request(request, factor)
    total = hires_schedule(second.steps, request.hires.denoising_strength)
    plan = make_plan(second.spec, total, options=second.sampler_options, run=second.steps)
    run2 = Run(second, plan, noise_source(second, models.dtype, factor),
               (run.latent_shape[0], run.latent_shape[1], *reversed(t.latent_size)))
    state = latents.dtype
    if upscaler in hires.LATENT_UPSCALERS:
        x0 = hires.crop(hires.upscale_latents(latents, t, upscaler), t)
    else:
        pixels = hires.upscale_pixels(tensor_to_pil(decode(models, latents)), t, upscaler)
        x0 = hires.crop(encode_sample(models, run2, pixels.to(models.device, models.dtype)), t)
    start = Start(run2.noise.first(tuple(x0.shape)).to(models.device, state), x0.to(state))
    if inpainting_unet(models):
        start = replace(start, concat=repaint_everything(models, run2))
    cond = conditioning(models, run2)
    if request.hires.prompt is not None and request.prompt_syntax == "a1111":
        tags = [str(t) for t in split_tags(request.hires.prompt)[1] if t.kind in TAG_KINDS]
        if tags:
            log.warning("LoRA tags in the hires prompt are not applied (sd15 applies the first prompt's LoRAs to "
                        "both passes): %s", ", ".join(tags))
    done = run.plan.num_steps
    shifted = None if progress is None else (lambda i, n, x: progress(done + i, done + n, x))
    return denoise(models, run2, cond, start, shifted)


def decode(models: Models, latents: torch.Tensor) -> torch.Tensor:
    return vae_io.decode(models.vae, latents)


def paste_back(models: Models, run: Run, pixels: torch.Tensor) -> torch.Tensor:
    """Inpainting: the original pixels wherever the (blurred) mask is 0, so nothing outside it changes."""
    r = run.request
    if r.inpaint is None or not r.inpaint.paste_back:
        return pixels
    image = r.init_image
    masks = r.inpaint.processed(image.size)
    original = image.tensor.repeat(len(pixels) // len(image), 1, 1, 1)
    return masks_paste_back(pixels, original, masks)


def inpaint_mask_is_empty(run: Run) -> bool:
    r = run.request
    if r.inpaint is None or not r.inpaint.processed(r.init_image.size).empty:
        return False
    log.warning("the inpainting mask is empty (nothing to repaint): the image is returned unchanged")
    return True


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
        image.info["seed"] = run.request.all_seeds[i]
        image.info["parameters"] = run.request.infotext(i, model, extra)
    return images
