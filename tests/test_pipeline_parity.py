"""End-to-end parity: `sd15.Pipeline` against diffusers' StableDiffusion(Img2Img)Pipeline (docs/architecture.md, "Parity").

Our side is what users run: `sd15.load(file)` on a tiny random-weight .safetensors written to disk by
tools.make_checkpoint, then `txt2img` / `img2img` with a seed. The reference side is diffusers'
pipelines built from `reference.reference_models` on the same original-layout tensors (diffusers' own
LDM converters), with a *real* transformers `CLIPTokenizer` whose vocab.json / merges.txt are derived
from our bundled merges file (tools/make_tokenizer_golden.py), so the prompts go through both
tokenizers, not through shared token ids. Schedulers are configured as users configure them for SD1.5:
DDIMScheduler(SD1.5 values) and `X.from_config(ddim.config)` (+ use_karras_sigmas), as in test_samplers.

Both sides get `torch.Generator().manual_seed(seed)` and nothing else in common.

What is compared, per case:
  - the latents after every step (our progress callback vs diffusers' callback_on_step_end), relative
    error max|ours - ref| / max|ref|;
  - the decoded float images before clamping (both VAEs on the final latents), relative error;
  - the uint8 pixels of the PIL images each pipeline returns: fraction identical, max |diff|, PSNR.

Measured on the test CPU (torch 2.13, diffusers 0.42.1, one intra-op thread), tiny configs, 64x64,
10 steps txt2img / 8 steps img2img, CFG 7.5, over every case below: latents rel err <= 2.9e-6, decoded
rel err <= 2.5e-6; pixels max |diff| <= 1 (a rounding flip of (x/2+0.5)·255 where the float lands
within ~1e-6 of .5), >= 99.978% identical, PSNR >= 84.8 dB; about half the cases are bit-identical.
Full SD1.5 size, fp32, DPM++ 2M Karras, 2 steps, 64x64: latents 6.7e-7, decoded 2.6e-6, pixels identical (2026-12-01;
an earlier session measured 1.0e-7 and 7.9e-7 on another build of the same code path).
Bounds, a little looser: latents and decoded 1e-5; pixels max diff <= 1, >= 99.5% identical, >= 60 dB.
`pytest -s` prints the figures of each case.
"""

import copy
import gc

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTokenizer as ReferenceTokenizer

import sd15
from reference import (FULL, SCHEDULERS, diffusers_steps, engine_models, pixel_stats, pipeline_components,
                       reference_models, rel_err)
from sd15.models.latents import LATENT_SCALE
from sd15.conditioning.tokenizer import CLIPTokenizer
from tools.make_checkpoint import random_full_state_dict

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

LATENT_TOL = 1e-5
PIXEL_MAX_DIFF = 1          # one rounding flip of (x/2+0.5)·255 at most
PIXEL_IDENTICAL = 0.995     # fraction of uint8 values that must be exactly equal
PIXEL_PSNR = 60.0           # dB

PROMPT = "a lighthouse at dusk, oil painting"
NEGATIVE = "blurry, low quality"


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ours(tiny_ckpt_file):
    """Our pipeline, loaded from a real tiny checkpoint file on disk."""
    return sd15.load(tiny_ckpt_file, device="cpu")


@pytest.fixture(scope="module")
def tokenizer(reference_tokenizer_files):
    """transformers' CLIPTokenizer with the hub's openai/clip-vit-large-patch14 vocab, derived locally."""
    return ReferenceTokenizer(*reference_tokenizer_files, model_max_length=77)


@pytest.fixture(scope="module")
def reference(tiny_models, tokenizer):
    """Components for diffusers' pipelines; the scheduler is added per call."""
    return pipeline_components(tiny_models[0], tokenizer)


# ---- running both sides --------------------------------------------------------------------------

def run_ours(pipe, method, sampler, seed, **kwargs):
    steps = []
    images = getattr(pipe, method)(sampler=sampler, seed=seed, progress=lambda i, n, x: steps.append(x.clone()),
                                   **kwargs)
    return images, steps


def run_reference(components, cls, sampler, seed, **kwargs):
    out, steps = diffusers_steps(cls, components, sampler, seed, **({"output_type": "pil"} | kwargs))
    return out.images, steps, components["vae"]


def check(pipe, ours_out, ref_out, latent_tol=LATENT_TOL):
    (our_images, our_steps), (ref_images, ref_steps, ref_vae) = ours_out, ref_out
    assert len(our_steps) == len(ref_steps) > 0
    for i, (a, b) in enumerate(zip(our_steps, ref_steps)):
        assert a.shape == b.shape
        assert rel_err(a, b) <= latent_tol, f"latents differ after step {i + 1}"
    with torch.inference_mode():
        decoded_ours = pipe.decode(our_steps[-1])
        decoded_ref = ref_vae.decode(ref_steps[-1] / LATENT_SCALE).sample
    assert rel_err(decoded_ours, decoded_ref) <= latent_tol
    assert [im.size for im in our_images] == [im.size for im in ref_images]
    assert all(im.mode == "RGB" for im in our_images)
    identical, max_diff, psnr = pixel_stats(our_images, ref_images)
    assert max_diff <= PIXEL_MAX_DIFF and identical >= PIXEL_IDENTICAL and psnr >= PIXEL_PSNR, \
        f"identical {identical:.5f}, max diff {max_diff}, PSNR {psnr:.1f} dB"
    assert float(np.asarray(our_images[0]).std()) > 5      # a real picture of noise, not a flat image
    print(f"latents {max(rel_err(a, b) for a, b in zip(our_steps, ref_steps)):.1e}, decoded "
          f"{rel_err(decoded_ours, decoded_ref):.1e}, identical {identical:.5f}, max diff {max_diff}, "
          f"PSNR {psnr:.1f} dB")             # the figures in the module docstring (pytest -s shows them)


# ---- txt2img: every sampler ----------------------------------------------------------------------

TXT2IMG = [(name, 0.0) for name in SCHEDULERS] + [("ddim", 0.5), ("ddim", 1.0)]


@pytest.mark.parametrize("sampler,eta", TXT2IMG, ids=[f"{n}-eta{e}" if e else n for n, e in TXT2IMG])
def test_txt2img_every_sampler(ours, reference, sampler, eta):
    common = dict(negative_prompt=NEGATIVE, guidance_scale=7.5, width=64, height=64)
    check(ours,
          run_ours(ours, "txt2img", sampler, 1234, prompt=PROMPT, steps=10, eta=eta or None, **common),  # own default
          run_reference(reference, StableDiffusionPipeline, sampler, 1234, prompt=PROMPT, num_inference_steps=10,
                        eta=eta, **common))


def test_callback_latents_are_the_output_latents(ours, reference):
    """The per-step latents compared everywhere are what diffusers returns with output_type="latent"."""
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, width=64, height=64)
    out, steps, _ = run_reference(reference, StableDiffusionPipeline, "euler_a", 4, num_inference_steps=4,
                                  output_type="latent", **common)
    assert torch.equal(out, steps[-1])
    _, ours_steps = run_ours(ours, "txt2img", "euler_a", 4, steps=4, **common)
    assert rel_err(ours_steps[-1], out) <= LATENT_TOL


# ---- img2img: samplers x strengths, odd-sized and RGBA init images -------------------------------

def init_image(width=70, height=53, mode="RGB") -> Image.Image:
    """A smooth gradient with some texture; sides not multiples of 8, so both sides must resize."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin(x / 3) * np.cos(y / 4)], axis=-1)
    if mode == "RGBA":
        alpha = 255 * (x + y) / (width + height)      # varying alpha: colours under it must survive
        rgb = np.concatenate([rgb, alpha[..., None]], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), mode=mode)


IMG2IMG = [("ddim", 0.3), ("euler_a", 0.75), ("dpmpp_2m_karras", 1.0), ("ddpm", 0.75), ("euler_karras", 0.3),
           ("dpmpp_2m_uniform", 0.75)]


@pytest.mark.parametrize("sampler,strength", IMG2IMG, ids=[f"{n}-{s}" for n, s in IMG2IMG])
def test_img2img(ours, reference, sampler, strength):
    image = init_image()
    common = dict(negative_prompt=NEGATIVE, guidance_scale=7.5, strength=strength)
    result = run_ours(ours, "img2img", sampler, 77, image=image, prompt=PROMPT, steps=8, **common)
    check(ours, result, run_reference(reference, StableDiffusionImg2ImgPipeline, sampler, 77, image=image,
                                      prompt=PROMPT, num_inference_steps=8, **common))
    assert result[0][0].size == (64, 48)            # 70x53 rounded down to multiples of 8
    assert len(result[1]) == int(8 * strength)


def test_img2img_rgba(ours, reference):
    """diffusers' SD image processor does not convert RGBA (its VAE would get 4 channels): users pass
    .convert("RGB"), which drops alpha and keeps the colours under it; we do that ourselves."""
    image = init_image(mode="RGBA")
    common = dict(guidance_scale=7.5, strength=0.75)
    check(ours, run_ours(ours, "img2img", "euler", 5, image=image, prompt=PROMPT, steps=6, **common),
          run_reference(reference, StableDiffusionImg2ImgPipeline, "euler", 5, image=image.convert("RGB"),
                        prompt=PROMPT, num_inference_steps=6, **common))


def test_img2img_batch(ours, reference):
    """Two images from one init image: the posterior sample is drawn once and repeated, as diffusers does."""
    image = init_image(64, 40)
    common = dict(negative_prompt=NEGATIVE, guidance_scale=5.0, strength=0.6)
    check(ours, run_ours(ours, "img2img", "euler_a", 9, image=image, prompt=PROMPT, steps=5, batch_size=2, **common),
          run_reference(reference, StableDiffusionImg2ImgPipeline, "euler_a", 9, image=image, prompt=PROMPT,
                        num_inference_steps=5, num_images_per_prompt=2, **common))


# ---- batches, sizes, guidance 1, user latents ----------------------------------------------------

def test_batch_size_two(ours, reference):
    common = dict(negative_prompt=NEGATIVE, guidance_scale=7.5, width=64, height=64)
    check(ours, run_ours(ours, "txt2img", "euler_a", 3, prompt=PROMPT, steps=4, batch_size=2, **common),
          run_reference(reference, StableDiffusionPipeline, "euler_a", 3, prompt=PROMPT, num_inference_steps=4,
                        num_images_per_prompt=2, **common))


def test_prompt_lists_with_negative_lists(ours, reference):
    """Two prompts, two negative prompts, two images each: order p0, p0, p1, p1 on both sides."""
    prompts, negatives = [PROMPT, "a red fox in snow"], ["blurry", "watermark, text"]
    common = dict(guidance_scale=6.0, width=64, height=64)
    ours_out = run_ours(ours, "txt2img", "ddim", 11, prompt=prompts, negative_prompt=negatives, steps=4,
                        batch_size=2, **common)
    check(ours, ours_out, run_reference(reference, StableDiffusionPipeline, "ddim", 11, prompt=prompts,
                                        negative_prompt=negatives, num_inference_steps=4,
                                        num_images_per_prompt=2, **common))
    assert [im.info["parameters"].splitlines()[0] for im in ours_out[0]] == [p for p in prompts for _ in (0, 1)]


@pytest.mark.parametrize("width,height", [(64, 96), (72, 40)], ids=["64x96", "72x40-odd-latent"])
def test_non_square_sizes(ours, reference, width, height):
    """72x40 pixels is a 9x5 latent: odd sizes the tiny UNet's two downsamplings must round-trip."""
    common = dict(negative_prompt=NEGATIVE, guidance_scale=7.5, width=width, height=height)
    ours_out = run_ours(ours, "txt2img", "dpmpp_2m_karras", 21, prompt=PROMPT, steps=4, **common)
    check(ours, ours_out, run_reference(reference, StableDiffusionPipeline, "dpmpp_2m_karras", 21, prompt=PROMPT,
                                        num_inference_steps=4, **common))
    assert ours_out[0][0].size == (width, height)


def test_guidance_one_is_the_conditional_model(ours, reference):
    """At exactly 1.0 both skip the unconditional pass (diffusers: do_classifier_free_guidance is scale > 1)."""
    common = dict(negative_prompt=NEGATIVE, guidance_scale=1.0, width=64, height=64)
    check(ours, run_ours(ours, "txt2img", "euler", 8, prompt=PROMPT, steps=4, **common),
          run_reference(reference, StableDiffusionPipeline, "euler", 8, prompt=PROMPT, num_inference_steps=4,
                        **common))


def test_user_latents(ours, reference):
    """User-supplied starting noise: both scale it by the sampler's initial σ (Euler's ≈14.6)."""
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2024))
    common = dict(guidance_scale=7.5, width=64, height=64)
    check(ours, run_ours(ours, "txt2img", "euler", 0, prompt=PROMPT, steps=4, latents=latents.clone(), **common),
          run_reference(reference, StableDiffusionPipeline, "euler", 0, prompt=PROMPT, num_inference_steps=4,
                        latents=latents.clone(), **common))


# ---- fp16 models: our float32 sampler against diffusers' fp16 pipeline ---------------------------

# 40x40 pixels: a 5x5 latent, 100 values per draw. CPU randn in fp16 is not fp32 randn rounded for such
# sizes (the last 16 values of a draw whose size is not a multiple of 16 differ), so the initial latents
# and every step's noise must be drawn in fp16 as diffusers draws them. diffusers keeps fp16 latents
# between steps and we keep float32: measured per-step rel err <= 6.5e-3 over euler_a / ddpm / ddim /
# DPM++ 2M Karras at 40x40 and 64x64; with the per-step noise drawn in float32 instead, 0.39 (euler_a)
# and 0.44 (ddpm) at 40x40.
FP16_LATENT_TOL = 0.02


@pytest.fixture(scope="module")
def reference_fp16(reference):
    """diffusers' components in float16 (copies: the float32 ones are shared with the other tests)."""
    return reference | {name: copy.deepcopy(reference[name]).half() for name in ("vae", "text_encoder", "unet")}


@pytest.mark.parametrize("sampler", ["euler_a", "ddpm", "dpmpp_2m_karras"])
def test_fp16_txt2img_follows_diffusers_fp16(tiny_ckpt_file, reference_fp16, sampler):
    ours = sd15.load(tiny_ckpt_file, device="cpu", dtype=torch.float16)
    common = dict(negative_prompt=NEGATIVE, guidance_scale=7.5, width=40, height=40)
    _, our_steps = run_ours(ours, "txt2img", sampler, 1234, prompt=PROMPT, steps=10, **common)
    _, ref_steps, _ = run_reference(reference_fp16, StableDiffusionPipeline, sampler, 1234, prompt=PROMPT,
                                    num_inference_steps=10, **common)
    assert len(our_steps) == len(ref_steps) == 10
    assert all(a.dtype == torch.float32 and b.dtype == torch.float16 for a, b in zip(our_steps, ref_steps))
    errors = [rel_err(a, b) for a, b in zip(our_steps, ref_steps)]
    print(f"fp16 {sampler}: latents rel err <= {max(errors):.1e}")
    assert max(errors) <= FP16_LATENT_TOL


# ---- full SD1.5 size -----------------------------------------------------------------------------

def test_full_size_txt2img(tokenizer):
    """Full SD1.5 size (1.07 B random parameters, fp32), DPM++ 2M Karras, 2 steps, 64x64.

    Both sides share one in-memory state dict (4.3 GB once): ours through `sd15.files` into engine
    models (reference.engine_models, what sd15.load does after reading), the reference through
    diffusers' converters. No file: writing and re-reading 2-4 GB costs ~40 s on the test CPU, and the
    file path is covered by every tiny case above and by the loader's own tests.
    """
    sd = random_full_state_dict(seed=0)
    ref, engine = reference_models(sd, FULL), engine_models(sd, FULL)
    del sd
    pipe = sd15.Pipeline(tokenizer=CLIPTokenizer(), text_encoder=engine.text_encoder, unet=engine.unet,
                         vae=engine.vae, device=torch.device("cpu"), dtype=torch.float32)
    components = dict(vae=ref.vae, text_encoder=ref.text_encoder, unet=ref.unet, tokenizer=tokenizer,
                      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    common = dict(negative_prompt=NEGATIVE, guidance_scale=7.5, width=64, height=64)
    try:
        check(pipe, run_ours(pipe, "txt2img", "dpmpp_2m_karras", 42, prompt=PROMPT, steps=2, **common),
              run_reference(components, StableDiffusionPipeline, "dpmpp_2m_karras", 42, prompt=PROMPT,
                            num_inference_steps=2, **common),
              latent_tol=LATENT_TOL)
    finally:
        del pipe, components, ref, engine
        gc.collect()


def test_dpmpp_sde_brownian_tree_seeded_with_the_seed(ours, reference):
    """DPM++ SDE Karras draws from a Brownian tree: sd15 seeds it with the request's seed, which is diffusers'
    DPMSolverSDEScheduler with noise_sampler_seed=seed (its default would be a random tree)."""
    from diffusers import DDIMScheduler, DPMSolverSDEScheduler
    from reference import SD15_SCHEDULER
    scheduler = DPMSolverSDEScheduler.from_config(DDIMScheduler(**SD15_SCHEDULER).config, use_karras_sigmas=True,
                                                  noise_sampler_seed=321)
    pipe = StableDiffusionPipeline(**reference, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    steps = []
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, width=64, height=64,
               num_inference_steps=5, generator=torch.Generator().manual_seed(321),
               callback_on_step_end=lambda _p, _i, _t, tensors: steps.append(tensors["latents"].clone()) or {})
    ours_out = run_ours(ours, "txt2img", "DPM++ SDE Karras", 321, prompt=PROMPT, negative_prompt=NEGATIVE,
                        guidance_scale=7.5, width=64, height=64, steps=5)
    assert len(steps) == 9                      # 2N-1 scheduler steps: two per step, one for the last (to σ = 0)
    check(ours, ours_out, (out.images, steps[1:8:2] + steps[8:], pipe.vae))
