"""`sd15.Pipeline`: the loaded models, and generation as a composition of stages.

    pipe.generate(Request("a lighthouse", seed=42))           # the one way in
    pipe.txt2img("a lighthouse", seed=42)                     # conveniences that build the Request
    pipe.img2img("in.png", "the same in winter", strength=0.6)

Threads: `generate` (and the conveniences) may run on several threads at once on one pipeline; they
share the models read-only. Setting up is not thread-safe: `compile()`, replacing a model, or merging a
weight delta while a generation runs.

LoRAs in "merge" mode stay merged after their generation, as in A1111: the next generation with the same
set starts at once, and one with another set (or none) first puts the original weights back. Code that
reads the weights themselves does so inside `with pipe.original_weights():`.
"""

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..adapters import KeptMerge, Loras, Use, on_the_fly
from ..conditioning import CLIPTokenizer
from ..conditioning.embeddings import Embedding, Embeddings
from ..conditioning.prompts import Conditioning, PromptEncoder, encode_conditioning
from ..files.hashing import sha256_short
from ..models.blocks import active_deltas
from ..models.text_encoder import TextEncoder
from ..models.unet import UNet
from ..models.vae import VAE
from . import stages, vae_io
from .locks import SharedExclusive
from . import only_masked
from .infotext import parse_infotext
from .masks import Inpaint, outpaint_canvas
from .request import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, ModelInfo, Request
from .stages import Progress


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
    embeddings: Embeddings | None = None        # textual-inversion embeddings by trigger word (see add_embedding)
    loras: Loras | None = None                  # the LoRA folders <lora:name> tags are found in
    lora_mode: str = "merge"                    # "merge": into the weights (kept until the set changes); "on_the_fly"
    _hash: str | None = field(default=None, init=False, repr=False)
    _models_lock: SharedExclusive = field(default_factory=SharedExclusive, init=False, repr=False)
    _hash_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _kept: KeptMerge = field(init=False, repr=False)

    def __post_init__(self):
        self._kept = KeptMerge(self.text_encoder, self.unet)
        if self.embeddings is None:
            self.embeddings = Embeddings(self.tokenizer, self.text_encoder.cfg.width)
        if self.loras is None:
            self.loras = Loras()

    # ---- generation -------------------------------------------------------------------------------

    def generate(self, request: Request, progress: Progress | None = None) -> list[Image.Image]:
        """The images of `request`; each image's `.info` holds "seed" and the A1111 "parameters" text.

        progress(step, total, latents) is called after each sampler step (raise from it to stop).
        """
        if request.inpaint is not None and request.inpaint.only_masked:
            request = request.with_seed()
            inner, where = only_masked.inner_request(request)
            return self._pasted(request, only_masked.paste(self.generate(inner, progress), where,
                                                           request.inpaint.paste_back))
        run = stages.prepare(self, request)
        if stages.inpaint_mask_is_empty(run):
            image = run.request.init_image
            with self._models_for([], merge=False), torch.inference_mode():
                cond = stages.conditioning(self, run)
            return stages.annotate(image.tensor.repeat(run.latent_shape[0] // len(image), 1, 1, 1), run,
                                   self.model_info, cond, [])
        uses = stages.adapters(self, run)
        compiled = getattr(self.unet, "_compiled_call_impl", None) is not None
        unmerged = bool(uses) and (self.lora_mode == "on_the_fly")
        if compiled and (unmerged or set(active_deltas()) & set(self.unet.modules())):
            raise ValueError("a compiled UNet does not see on-the-fly weight deltas (torch.compile cannot "
                             "trace them): use lora_mode='merge', or do not compile")
        with self._models_for(uses, merge=not unmerged), torch.inference_mode():
            cond = stages.conditioning(self, run)
            start = stages.initial_latents(self, run)
            hires = run.request.hires
            first = progress
            if hires is not None and progress is not None:     # one count over both passes
                total = run.plan.num_steps + (hires.steps or run.request.steps)
                first = lambda i, n, x: progress(i, total, x)   # noqa: E731
            latents = stages.denoise(self, run, cond, start, first)
            if hires is not None:
                latents = stages.hires_pass(self, run, latents, progress)
            pixels = stages.paste_back(self, run, stages.decode(self, latents))
        return stages.annotate(pixels, run, self.model_info, cond, uses)

    @contextlib.contextmanager
    def _models_for(self, uses: list[Use], merge: bool):
        """The models as a generation needs them (`uses` merged, or the original weights with `uses` on the
        fly), held so until it ends: shared with other generations that need the same, alone to change."""
        wanted = uses if merge else []
        on_top = on_the_fly(self.text_encoder, self.unet, uses) if uses and not merge else contextlib.nullcontext()
        with self._models_lock.shared():
            if self._kept.holds(wanted):
                with on_top:
                    yield
                return
        with self._models_lock.exclusive():
            self._kept.switch(wanted)
            with on_top:
                yield

    @contextlib.contextmanager
    def original_weights(self):
        """The models with their original weights (any LoRA still merged from the last generation is taken
        out first), held so within the block: no generation changes or uses them meanwhile."""
        with self._models_lock.exclusive():
            self._kept.restore()
            yield

    def outpaint(self, image, prompt: str | list[str], *, left: int = 0, right: int = 0, top: int = 0,
                 bottom: int = 0, mask_blur: float = 4, **inpaint_options) -> list[Image.Image]:
        """Extend `image` by that many pixels on each side and paint the new margins (`inpaint` on a larger
        canvas: the margins start from the image's edge pixels and are masked; sides round up to multiples
        of 8 on the right and bottom). Other keywords are `inpaint`'s."""
        canvas, mask = outpaint_canvas(image, left, right, top, bottom)
        return self.inpaint(canvas, mask, prompt, mask_blur=mask_blur, **inpaint_options)

    def _pasted(self, request: Request, images: list[Image.Image]) -> list[Image.Image]:
        """Only-masked results carry the whole request's infotext (the crop's generation wrote its own)."""
        for i, image in enumerate(images):
            fields = parse_infotext(image.info["parameters"]).fields
            extra = {k: fields[k] for k in ("Lora hashes", "TI hashes") if k in fields}
            image.info["parameters"] = request.infotext(i, self.model_info, extra)
        return images

    def txt2img(self, prompt: str | list[str], *, negative_prompt: str | list[str] = "",
                steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                sampler: str = DEFAULT_SAMPLER, seed: int | None = None, width: int | None = None,
                height: int | None = None, batch_size: int = 1, eta: float | None = None,
                latents: torch.Tensor | None = None, clip_skip: int = 1, prompt_syntax: str = "a1111",
                emphasis: str = "original", seed_mode: str = "diffusers", hires=None, control=(),
                progress: Progress | None = None) -> list[Image.Image]:
        """Images from text (512x512 unless width and height are given). A list of prompts gives
        `batch_size` images for each prompt.

        `latents` replaces the seeded initial noise (shape [B, 4, height/8, width/8]). `eta`: the sampler's
        eta (DDIM's, 0 by default; the ancestral and SDE samplers', 1 by default); None keeps its default,
        and 0 is accepted by every sampler. clip_skip, prompt_syntax, emphasis, seed_mode, hires (a `Hires` or
        a dict of its fields), control (`Control`s: ControlNets): see Request.
        """
        return self.generate(Request(prompt, negative_prompt=negative_prompt, width=width, height=height,
                                     steps=steps, sampler=sampler,
                                     sampler_options={} if eta is None else {"eta": eta},
                                     guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                                     latents=latents, clip_skip=clip_skip, prompt_syntax=prompt_syntax,
                                     emphasis=emphasis, seed_mode=seed_mode, hires=hires, control=control),
                             progress)

    def img2img(self, image, prompt: str | list[str], *, strength: float | None = None,
                negative_prompt: str | list[str] = "", steps: int = DEFAULT_STEPS,
                guidance_scale: float = DEFAULT_GUIDANCE, sampler: str = DEFAULT_SAMPLER,
                seed: int | None = None, batch_size: int = 1, eta: float | None = None,
                width: int | None = None, height: int | None = None, clip_skip: int = 1,
                prompt_syntax: str = "a1111", emphasis: str = "original", seed_mode: str = "diffusers",
                control=(), progress: Progress | None = None) -> list[Image.Image]:
        """Re-draw `image` (PIL image, path, or [B,3,H,W] tensor in [0, 1]) guided by `prompt`.

        Any PIL mode is converted to RGB; sides that are not multiples of 8 are resized down to the
        nearest multiple with Lanczos, as diffusers does (or to width x height when given, as A1111's
        "Just resize"). The last int(steps·strength) steps run; strength defaults to 0.75.
        clip_skip, prompt_syntax, emphasis, seed_mode, control: see Request.
        """
        return self.generate(Request(prompt, negative_prompt=negative_prompt, width=width, height=height,
                                     steps=steps, sampler=sampler,
                                     sampler_options={} if eta is None else {"eta": eta},
                                     guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                                     init_image=image, strength=strength, clip_skip=clip_skip,
                                     prompt_syntax=prompt_syntax, emphasis=emphasis, seed_mode=seed_mode,
                                     control=control), progress)

    def inpaint(self, image, mask, prompt: str | list[str], *, strength: float = 1.0, mask_blur: float = 4,
                invert: bool = False, fill: str = "original", blend: str = "diffusers", mask_weight: float = 1.0,
                only_masked: bool = False, padding: int = 32,
                negative_prompt: str | list[str] = "", steps: int = DEFAULT_STEPS,
                guidance_scale: float = DEFAULT_GUIDANCE, sampler: str = DEFAULT_SAMPLER, seed: int | None = None,
                batch_size: int = 1, width: int | None = None, height: int | None = None,
                seed_mode: str = "diffusers", control=(), progress: Progress | None = None) -> list[Image.Image]:
        """Repaint `image` where `mask` is white (any image: L, RGB, or RGBA's alpha), guided by `prompt`.

        An inpainting checkpoint (9 input channels) sees the mask and the masked image; an ordinary one is
        blended with the original latents every step (`blend`: diffusers' formula or A1111's). strength 1
        (the default) repaints from pure noise. Outside the (blurred) mask the result is the original image,
        pixel for pixel. mask_blur, invert, fill, mask_weight, only_masked, padding: A1111's inpaint settings
        (see Inpaint); with only_masked, width x height is the size the crop around the mask is painted at.
        control: ControlNets (see Request); `Control(cn, preprocess="inpaint")` is the inpaint ControlNet's hint.
        """
        return self.generate(Request(prompt, negative_prompt=negative_prompt, width=width, height=height,
                                     steps=steps, sampler=sampler, guidance_scale=guidance_scale, seed=seed,
                                     batch_size=batch_size, init_image=image, strength=strength,
                                     seed_mode=seed_mode, inpaint=Inpaint(mask, blur=mask_blur, invert=invert,
                                                                          fill=fill, blend=blend,
                                                                          mask_weight=mask_weight,
                                                                          only_masked=only_masked,
                                                                          padding=padding),
                                     control=control), progress)

    # ---- building blocks --------------------------------------------------------------------------

    def conditioning(self, prompts: list[str], negative_prompts: list[str] | None = None, *, steps: int = 1,
                     clip_skip: int = 1, syntax: str = "a1111", emphasis: str = "original",
                     guidance_scale: float = 7.5) -> Conditioning:
        """The conditioning stage on its own, to inspect: per prompt its AND parts and, step by step, their
        states [77·k, width] (`.at(step)`), the negatives' (None for guidance 1), the embeddings used.
        (It replaces the earlier `encode_prompts`, which returned one tensor of cut prompts.)"""
        negatives = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        return encode_conditioning(PromptEncoder(self.tokenizer, self.text_encoder, self.embeddings), prompts,
                                   negatives, steps=steps, clip_skip=clip_skip, syntax=syntax, emphasis=emphasis,
                                   guidance_scale=guidance_scale)

    def add_embedding(self, path, name: str | None = None) -> Embedding:
        """Make a textual-inversion file's trigger word (its file name, or `name`) usable in prompts."""
        return self.embeddings.add_file(path, name)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents -> images in about [-1, 1]; large images are decoded in tiles, and a fp16 VAE
        that overflows to NaN (the well-known black image) is retried in float32."""
        return vae_io.decode(self.vae, latents)

    @property
    def model_info(self) -> ModelInfo:
        name = self.checkpoint_path.stem if self.checkpoint_path else None
        return ModelInfo(name, self.model_hash, self.vae_path.name if self.vae_path else None)

    @property
    def model_hash(self) -> str | None:
        """A1111's "Model hash": the first 10 hex digits of the file's sha256 (read once, on first use)."""
        if self.checkpoint_path is None:
            return None
        with self._hash_lock:
            if self._hash is None:
                self._hash = sha256_short(self.checkpoint_path)
            return self._hash

    def compile(self, mode: str | None = None) -> "Pipeline":
        """Opt in to `torch.compile` for the UNet (all but a few % of a txt2img); returns the pipeline.

        The first generation at each batch and image size compiles (minutes; later calls at that size
        reuse the kernels). mode: torch.compile's; by default "max-autotune" on CUDA (Triton kernels
        chosen by timing them, plus CUDA graphs, which replay a whole UNet step without launching its
        hundreds of small kernels one by one from Python) and "default" elsewhere. On CPU the engine's
        eager fast path measured faster than Inductor (BENCHMARKS.md), so there this is for experiments.
        Outputs match the eager UNet to rounding, not bit for bit (Inductor fuses and reorders).
        Each new batch size or image size compiles again; past torch's recompile limit (8) the UNet
        quietly runs uncompiled, so compile for a fixed size and batch. A compiled UNet sees no
        on-the-fly weight deltas (`models.blocks`): merge them instead.
        """
        if mode is None:
            mode = "max-autotune" if self.device.type == "cuda" else "default"
        if self.device.type == "cuda":
            # Keep the activations NHWC so cuDNN and Inductor pick their tensor-core conv layouts
            # without a transpose around every convolution.
            self.unet.to(memory_format=torch.channels_last)
        self.unet.compile(mode=mode, fullgraph=True, dynamic=False)
        return self
