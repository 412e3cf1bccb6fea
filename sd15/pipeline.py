"""txt2img and img2img over the engine's models: the `sd15.Pipeline` users hold.

Seeds follow diffusers (DESIGN.md §5): one CPU `torch.Generator` seeded once per call; the initial
latents for the whole batch are drawn first, then whatever the sampler draws per step, so the same seed
and settings give the same image as diffusers' StableDiffusion(Img2Img)Pipeline.
"""

import logging
import os
import secrets
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from tokenizer import CLIPTokenizer

from . import validation
from .guidance import cfg_eps_model
from .images import init_image_tensor, tensor_to_pil
from .latents import to_diffusion, to_vae
from .png import a1111_parameters
from .samplers import sample
from .text_encoder import TextEncoder
from .unet import UNet
from .vae import VAE
from .vae_tiling import decode_tiled, encode_distribution_tiled, should_tile

log = logging.getLogger("sd15")

# What SD1.5 users expect today: DPM++ 2M Karras converges in 20-30 steps (A1111's and ComfyUI's
# usual choice); diffusers' own default (PNDM, 50 steps) is twice the work for no visible gain.
DEFAULT_SAMPLER = "DPM++ 2M Karras"
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5

Progress = Callable[[int, int, torch.Tensor], None]   # (step, total, latents after that step)

# The sampler's state and arithmetic stay in float32 (float64 for float64 models) whatever the models'
# dtype: a fp16 UNet's predictions are cast up before guidance and the update, and x is cast down only
# as the UNet's input. diffusers keeps fp16 latents between steps; this loses less, for a few
# elementwise ops per step.
def sampler_dtype(model_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(model_dtype, torch.float32)


def random_seed() -> int:
    return secrets.randbits(32)


@dataclass(eq=False)
class Pipeline:
    tokenizer: CLIPTokenizer
    text_encoder: TextEncoder
    unet: UNet
    vae: VAE
    device: torch.device
    dtype: torch.dtype
    checkpoint_path: Path | None = None
    vae_path: Path | None = None
    quirks: list[str] = field(default_factory=list)

    # ---- building blocks --------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text states [B, 77, 768]; prompts past CLIP's 75 tokens are cut, and the log says what was cut."""
        for prompt in prompts:
            cut = self.tokenizer.truncation(prompt)
            if cut:
                log.warning("prompt is longer than CLIP's 77 tokens; this part was ignored: %r", cut)
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in about [-1, 1]; large images are decoded in tiles.

        A fp16 VAE can overflow to NaN (the well-known black image): then decode again in fp32.
        """
        z = to_vae(latents).to(self.dtype)
        images = self._decode_raw(z)
        if self.dtype != torch.float32 and not torch.isfinite(images).all():
            log.warning("the VAE produced NaNs in %s (black-image failure); decoding again in float32",
                        str(self.dtype).removeprefix("torch."))
            self.vae.float()
            try:
                images = self._decode_raw(z.float())
            finally:
                self.vae.to(self.dtype)
        return images

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        if self._needs_tiles(z.shape[0], 8 * z.shape[-2], 8 * z.shape[-1], z.element_size()):
            return decode_tiled(self.vae, z)
        return self.vae.decode(z)

    def _encode_distribution(self, images: torch.Tensor):
        if self._needs_tiles(images.shape[0], *images.shape[-2:], images.element_size()):
            return encode_distribution_tiled(self.vae, images)
        return self.vae.encode_distribution(images)

    def _needs_tiles(self, batch: int, height: int, width: int, element_size: int) -> bool:
        """Tile the VAE only when an untiled pass would not fit in half the free memory: tiling costs
        several times the time. Where free memory cannot be read, vae_tiling's fixed budget decides."""
        budget = {}
        if self.device.type == "cuda":  # free on the device plus what torch holds cached but unused
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            budget = {"budget_bytes": (torch.cuda.mem_get_info(self.device)[0] + cached) // 2}
        elif self.device.type == "cpu" and hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
            budget = {"budget_bytes": os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2}
        return should_tile(height, width, batch, cfg=self.vae.cfg, element_size=element_size, **budget)

    def compile(self, mode: str | None = None) -> "Pipeline":
        """Opt in to `torch.compile` for the UNet (all but a few % of a txt2img); returns the pipeline.

        The first generation at each batch and image size compiles (minutes; later calls at that size
        reuse the kernels). mode: torch.compile's; by default "max-autotune" on CUDA (Triton kernels
        chosen by timing them, plus CUDA graphs, which replay a whole UNet step without launching its
        hundreds of small kernels one by one from Python) and "default" elsewhere. On CPU the engine's
        eager fast path measured faster than Inductor (BENCHMARKS.md), so there this is for experiments.
        Outputs match the eager UNet to rounding, not bit for bit (Inductor fuses and reorders).
        Each new batch size or image size compiles again; past torch's recompile limit (8) the UNet
        quietly runs uncompiled, so compile for a fixed size and batch.
        """
        if mode is None:
            mode = "max-autotune" if self.device.type == "cuda" else "default"
        if self.device.type == "cuda":
            # Keep the activations NHWC so cuDNN and Inductor pick their tensor-core conv layouts
            # without a transpose around every convolution.
            self.unet.to(memory_format=torch.channels_last)
        self.unet.compile(mode=mode, fullgraph=True, dynamic=False)
        return self

    @cached_property
    def model_hash(self) -> str | None:
        """A1111's "Model hash": the first 10 hex digits of the file's sha256 (read once, on first use)."""
        from weights_map.hashing import sha256_short
        return sha256_short(self.checkpoint_path) if self.checkpoint_path else None

    # ---- generation -------------------------------------------------------------------------------

    def txt2img(self, prompt: str | list[str], *, negative_prompt: str | list[str] = "",
                steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                sampler: str = DEFAULT_SAMPLER, seed: int | None = None, width: int = 512, height: int = 512,
                batch_size: int = 1, eta: float = 0.0, latents: torch.Tensor | None = None,
                progress: Progress | None = None) -> list[Image.Image]:
        """Images from text. A list of prompts gives `batch_size` images for each prompt.

        `latents` replaces the seeded initial noise (shape [B, 4, height/8, width/8]).
        Each image's `.info` holds "seed" and the A1111 "parameters" text.
        """
        validation.check_size(width, height)
        spec, plan, prompts, negatives, seed = self._prepare(
            prompt, negative_prompt, steps, guidance_scale, sampler, seed, batch_size, eta, strength=1.0)
        shape = (len(prompts), 4, height // 8, width // 8)
        generator = torch.Generator().manual_seed(seed)
        if latents is None:
            noise = torch.randn(shape, generator=generator, dtype=self.dtype)  # diffusers draws in this dtype
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for this request, got {tuple(latents.shape)}")
        else:
            noise = latents
        with torch.inference_mode():
            eps_model = self._guided_model(prompts, negatives, guidance_scale)
            state = noise.to(self.device, sampler_dtype(self.dtype))
            final = self._run(plan, eps_model, state, None, generator, progress)
            images = tensor_to_pil(self.decode(final))
        settings = self._settings(spec, steps, guidance_scale, seed, width, height, eta)
        return self._annotate(images, prompts, negatives, settings, seed)

    def img2img(self, image, prompt: str | list[str], *, strength: float = 0.75,
                negative_prompt: str | list[str] = "", steps: int = DEFAULT_STEPS,
                guidance_scale: float = DEFAULT_GUIDANCE, sampler: str = DEFAULT_SAMPLER,
                seed: int | None = None, batch_size: int = 1, eta: float = 0.0,
                progress: Progress | None = None) -> list[Image.Image]:
        """Re-draw `image` (PIL image, path, or [B,3,H,W] tensor in [0, 1]) guided by `prompt`.

        Any PIL mode is converted to RGB; sides that are not multiples of 8 are resized down to the
        nearest multiple with Lanczos, as diffusers does. The last int(steps·strength) steps run.
        """
        validation.check_strength(strength)
        pixels = init_image_tensor(image)            # fails on a bad image before any model work
        spec, plan, prompts, negatives, seed = self._prepare(
            prompt, negative_prompt, steps, guidance_scale, sampler, seed, batch_size, eta, strength)
        total = len(prompts)
        if total % len(pixels):
            raise ValueError(f"{len(pixels)} init images cannot be spread over a batch of {total} images")
        generator = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            # diffusers' order: the posterior sample first, then the forward-process noise.
            mean, logvar = self._encode_distribution(pixels.to(self.device, self.dtype))
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            state_dtype = sampler_dtype(self.dtype)
            mean, logvar, eps = mean.to(state_dtype), logvar.to(state_dtype), eps.to(state_dtype)
            x0 = to_diffusion(mean + torch.exp(0.5 * logvar) * eps).repeat(total // len(pixels), 1, 1, 1)
            noise = torch.randn(x0.shape, generator=generator, dtype=self.dtype).to(self.device, state_dtype)
            eps_model = self._guided_model(prompts, negatives, guidance_scale)
            final = self._run(plan, eps_model, noise, x0, generator, progress)
            images = tensor_to_pil(self.decode(final))
        height, width = pixels.shape[-2:]
        settings = self._settings(spec, steps, guidance_scale, seed, width, height, eta)
        settings["Denoising strength"] = strength
        return self._annotate(images, prompts, negatives, settings, seed)

    # ---- internals --------------------------------------------------------------------------------

    def _prepare(self, prompt, negative_prompt, steps, guidance_scale, sampler, seed, batch_size, eta, strength):
        """Validate everything cheap first, then expand prompts to one per image."""
        spec, plan = validation.check_sampling(steps, guidance_scale, batch_size, eta, seed, sampler, strength)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts + negatives):
            raise ValueError("prompt and negative_prompt must be strings or non-empty lists of strings")
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one each")
        # diffusers' num_images_per_prompt order: p0, p0, p1, p1, ...
        prompts = [p for p in prompts for _ in range(batch_size)]
        negatives = [n for n in negatives for _ in range(batch_size)]
        validation.check_batch(len(prompts))
        return spec, plan, prompts, negatives, random_seed() if seed is None else seed

    def _guided_model(self, prompts, negatives, guidance_scale):
        cond = self.encode_prompts(prompts)
        uncond = None if guidance_scale == 1 else self.encode_prompts(negatives)
        return cfg_eps_model(self.unet, cond, uncond, guidance_scale)

    def _run(self, plan, eps_model, noise, x0, generator, progress):
        x = None
        for i, x in enumerate(sample(plan, eps_model, noise, x0, generator, noise_dtype=self.dtype), start=1):
            if progress is not None:
                progress(i, plan.num_steps, x)
        return x

    def _settings(self, spec, steps, guidance_scale, seed, width, height, eta) -> dict:
        name = self.checkpoint_path.stem if self.checkpoint_path else None
        settings = {"Steps": steps, "Sampler": spec.label, "Schedule type": spec.schedule_type,
                    "CFG scale": guidance_scale, "Seed": seed, "Size": f"{width}x{height}",
                    "Model hash": self.model_hash, "Model": name}
        if eta:
            settings["Eta"] = eta
        if self.vae_path:
            settings["VAE"] = self.vae_path.name
        return settings

    def _annotate(self, images, prompts, negatives, settings, seed):
        batch = len(images)
        for i, (img, p, n) in enumerate(zip(images, prompts, negatives)):
            extra = {"Batch size": batch, "Batch pos": i} if batch > 1 else {}
            img.info["seed"] = seed
            img.info["parameters"] = a1111_parameters(p, n, settings | extra)
        return images
