"""Inpainting: `sd15` against diffusers' StableDiffusionInpaintPipeline by seed, and A1111's mask handling.

Both sides are what users run: `sd15.load(file)` on tiny random weights written to disk in the original
layout, and diffusers' pipeline over models filled from the same tensors by diffusers' own LDM converters,
with transformers' CLIPTokenizer (see test_pipeline_parity). Two checkpoints: the ordinary tiny one (a
4-channel UNet: diffusers' per-step latent blend) and the same tensors with a 9-channel first convolution
(an inpainting UNet: noisy latents, mask, masked image's latents). Both sides get the same PIL image and
mask and `torch.Generator().manual_seed(seed)`, nothing else in common; our mask blur is 0 (diffusers does
not blur). Compared: the latents after every step (our progress callback vs callback_on_step_end) and the
decoded images of the final latents, i.e. before our paste-back, which diffusers does not do (without
padding_mask_crop). Relative error max|ours − ref| / max|ref| <= 1e-5.

Measured (torch 2.13 CPU, diffusers 0.42.1, one thread; 64x48, batch 2, CFG 7.5, 6 steps; `pytest -s`
prints them): latents <= 5.2e-6 and decoded <= 3.9e-6 over the 4- and 9-channel cases; a 9-channel
img2img without a mask 5.9e-6 / 5.4e-6; a 9-channel txt2img 4.7e-7 / 1.0e-6 off the CPU fast path (6.6e-5
on it: our channels-last GroupNorm on the flat grey image, see that test).
Full SD1.5 size (random weights, fp32, 64x48, batch 1, 2 denoising steps; section 6): 4-channel, Euler a,
strength 1: latents 9.4e-7, decoded 3.0e-6, pixels identical; 9-channel (the same tensors, first
convolution widened), DPM++ 2M Karras, strength 0.6: latents 7.3e-7, decoded 2.9e-6, pixels 99.978%
identical, max diff 1, PSNR 84.8 dB. Bounds there: 1e-5, and test_pipeline_parity's pixel bounds (max
diff <= 1, >= 99.5% identical, >= 60 dB) between diffusers' PIL image and our decode before paste-back.

A draw diffusers makes that is easy to miss: it VAE-encodes the masked image, a posterior sample from the
generator, for a 4-channel UNet too, where the result is unused; sd15 draws that noise (without the encode)
so the ancestral samplers' noise that follows is the same.

Then what diffusers has no counterpart for, from A1111's published processing.py: the paste-back through the
overlay mask (original pixels exactly where it is 0), the x0 blend ("a1111") for 4-channel UNets, and the
mask blur, which must equal OpenCV's cv2.GaussianBlur bit for bit (A1111 calls it on the 8-bit mask).
"""

import dataclasses
import gc
import logging

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image
from transformers import CLIPTokenizer as ReferenceTokenizer

import sd15
from reference import (FULL, diffusers_steps, engine_models, pixel_stats, reference_models, reference_scheduler,
                       reference_unet, rel_err)
from sd15.conditioning.tokenizer import CLIPTokenizer
from sd15.models.demo import PREFIX
from sd15.models.latents import LATENT_SCALE
from sd15.models.loading import unet_config_from_shapes
from sd15.pipeline import stages
from sd15.pipeline.images import pil_to_tensor, tensor_to_pil
from sd15.pipeline.masks import Inpaint, gaussian_blur, paste_back
from sd15.pipeline.request import Request
from sd15.sampling import predicted_x0
from tools.make_checkpoint import random_full_state_dict

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore:TF32 acceleration:UserWarning"),
              pytest.mark.usefixtures("one_thread")]

TOL = 1e-5
PROMPT, NEGATIVE = "a red door in a white wall", "blurry, low quality"
W, H = 64, 48
CONV_IN = PREFIX["unet"] + "input_blocks.0.0.weight"


# ---- images, models ------------------------------------------------------------------------------

def picture(width=W, height=H) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin(x / 3) * np.cos(y / 4)], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), mode="RGB")


def mask_picture(width=W, height=H) -> Image.Image:
    """A white rectangle, and a strip of greys 100..160 across 127/128, where both binarise at >= 0.5."""
    m = np.zeros((height, width), dtype=np.uint8)
    m[height // 6: height * 3 // 4, width // 4: width * 11 // 16] = 255
    m[-8:, :] = np.linspace(100, 160, width).round().astype(np.uint8)
    return Image.fromarray(m, mode="L")


@pytest.fixture(scope="module")
def tokenizer(reference_tokenizer_files):
    return ReferenceTokenizer(*reference_tokenizer_files, model_max_length=77)


# ---- running both sides --------------------------------------------------------------------------

def run_ours(pipe, request: Request):
    steps = []
    images = pipe.generate(request, progress=lambda i, n, x: steps.append(x.clone()))
    return images, steps


def run_reference(components, sampler, seed, **kwargs):
    return diffusers_steps(StableDiffusionInpaintPipeline, components, sampler, seed, output_type="latent", **kwargs)[1]


def compare(pipe, ref_vae, ours_steps, ref_steps) -> tuple[float, float, torch.Tensor]:
    """(max latent rel err over the steps, decoded rel err, our decoded final latents)."""
    assert len(ours_steps) == len(ref_steps) > 0
    errs = []
    for i, (a, b) in enumerate(zip(ours_steps, ref_steps)):
        assert a.shape == b.shape
        errs.append(rel_err(a, b))
        assert errs[-1] <= TOL, f"latents differ after step {i + 1}: {errs[-1]:.2e}"
    with torch.inference_mode():
        decoded = pipe.decode(ours_steps[-1])
        reference = ref_vae.decode(ref_steps[-1] / LATENT_SCALE).sample
    dec = rel_err(decoded, reference)
    assert dec <= TOL, f"decoded images differ: {dec:.2e}"
    return max(errs), dec, decoded


def common(**kw):
    return dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, **kw)


# ---- 1. parity: 4- and 9-channel UNets, strengths, samplers --------------------------------------

CASES = [(ch, sampler, strength) for ch in (4, 9) for sampler in ("euler_a", "dpmpp_2m_karras")
         for strength in (1.0, 0.6)] + [(4, "ddim", 0.6), (9, "ddim", 1.0)]


@pytest.mark.parametrize("channels,sampler,strength", CASES, ids=[f"{c}ch-{s}-{t}" for c, s, t in CASES])
def test_inpaint_matches_diffusers(inpaint_models, channels, sampler, strength):
    pipe, components = inpaint_models[channels]
    image, mask, steps, seed = picture(), mask_picture(), 6, 1000 + channels
    ours_images, ours_steps = run_ours(pipe, Request(
        sampler=sampler, seed=seed, steps=steps, batch_size=2, init_image=image, strength=strength,
        inpaint=Inpaint(mask, blur=0), **common()))
    ref_steps = run_reference(components, sampler, seed, image=image, mask_image=mask, height=H, width=W,
                              strength=strength, num_inference_steps=steps, num_images_per_prompt=2,
                              **common())
    lat, dec, decoded = compare(pipe, components["vae"], ours_steps, ref_steps)
    assert len(ours_steps) == int(steps * strength) and ours_steps[-1].shape == (2, 4, H // 8, W // 8)
    # What generate returned is that decode, pasted back through the overlay mask (blur 0: the binary mask).
    masks = Inpaint(mask, blur=0).processed((W, H))
    expected = tensor_to_pil(paste_back(decoded, pil_to_tensor(image).repeat(2, 1, 1, 1), masks))
    assert [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours_images, expected)] == [True, True]
    assert not torch.equal(ours_steps[-1][0], ours_steps[-1][1])         # two images, not one twice
    print(f"{channels}ch {sampler} strength {strength}: latents {lat:.1e}, decoded {dec:.1e}")


def test_a_mask_of_another_size_is_resized_as_diffusers_does(inpaint_models):
    """A 32x24 mask for a 64x48 image: resized (Lanczos, after the blur) to the image, then >= 0.5, exactly
    what diffusers' mask processor does with it, so the runs still agree."""
    pipe, components = inpaint_models[4]
    image, small = picture(), mask_picture(W // 2, H // 2)
    masks = Inpaint(small, blur=0).processed((W, H))
    resized = np.asarray(small.resize((W, H), resample=Image.LANCZOS), dtype=np.float32) / 255
    assert masks.binary.shape == (1, 1, H, W)
    assert torch.equal(masks.binary[0, 0], torch.from_numpy((resized >= 0.5).astype(np.float32)))
    _, ours_steps = run_ours(pipe, Request(sampler="euler", seed=5, steps=5, init_image=image, strength=0.6,
                                           inpaint={"mask": small, "blur": 0}, **common()))
    ref_steps = run_reference(components, "euler", 5, image=image, mask_image=small, height=H, width=W,
                              strength=0.6, num_inference_steps=5, **common())
    lat, dec, _ = compare(pipe, components["vae"], ours_steps, ref_steps)
    print(f"32x24 mask: latents {lat:.1e}, decoded {dec:.1e}")


# ---- 2. a 9-channel UNet without a mask ----------------------------------------------------------

def test_inpainting_model_txt2img_is_diffusers_with_a_grey_image_and_a_white_mask(inpaint_models):
    """txt2img with a 9-channel UNet: the mask all ones over a grey image. In diffusers the masked image is
    image·(mask < 0.5) = 0 everywhere, grey in [-1, 1] whatever the image, so a mid-grey image and an
    all-white mask at strength 1 is the same generation, with the same draws (noise, then the masked image's
    posterior sample)."""
    pipe, components = inpaint_models[9]
    grey, white = torch.full((1, 3, H, W), 0.5), Image.new("L", (W, H), 255)

    def both():
        _, ours_steps = run_ours(pipe, Request(sampler="euler_a", seed=21, steps=5, width=W, height=H, batch_size=2,
                                               **common()))
        ref_steps = run_reference(components, "euler_a", 21, image=grey, mask_image=white, height=H, width=W,
                                  strength=1.0, num_inference_steps=5, num_images_per_prompt=2, **common())
        return ours_steps, ref_steps

    # Exact off the CPU fast path: the same draws, the same UNet inputs.
    with torch.backends.mkldnn.flags(enabled=False):
        lat, dec, _ = compare(pipe, components["vae"], *both())
    # On it, our VAE encodes the flat grey image less exactly: PyTorch's channels-last CPU GroupNorm loses
    # ~5e-4 (relative) on a per-channel-constant input, where the contiguous one (diffusers') is at 2e-7;
    # the grey latents are then off by ~3e-4 and the result by 6.6e-5 (measured). Not inpainting's doing.
    ours_steps, ref_steps = both()
    fast = max(rel_err(a, b) for a, b in zip(ours_steps, ref_steps))
    assert fast <= 5e-4
    print(f"9ch txt2img: latents {lat:.1e}, decoded {dec:.1e} (CPU fast path: latents {fast:.1e})")


def test_inpainting_model_img2img_is_diffusers_with_a_white_mask(inpaint_models):
    """img2img (no mask) with a 9-channel UNet: diffusers' inpainting with an all-white mask (its draws: the
    image's posterior sample, the noise, the masked, i.e. grey, image's)."""
    pipe, components = inpaint_models[9]
    image, white = picture(), Image.new("L", (W, H), 255)
    _, ours_steps = run_ours(pipe, Request(sampler="dpmpp_2m_karras", seed=22, steps=6, init_image=image,
                                           strength=0.6, **common()))
    ref_steps = run_reference(components, "dpmpp_2m_karras", 22, image=image, mask_image=white, height=H, width=W,
                              strength=0.6, num_inference_steps=6, **common())
    lat, dec, _ = compare(pipe, components["vae"], ours_steps, ref_steps)
    print(f"9ch img2img: latents {lat:.1e}, decoded {dec:.1e}")


# ---- paste-back ----------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [4, 9])
def test_paste_back_keeps_every_pixel_outside_the_overlay_mask(inpaint_models, channels):
    """A1111's blur 4: outside the overlay mask (0) the returned pixels are the input's, exactly; where it is
    1 they are the decoded generation's; inside the mask the picture changed."""
    pipe, _ = inpaint_models[channels]
    image, mask = picture(), Image.new("L", (W, H), 0)
    mask.paste(255, (24, 16, 44, 34))
    request = Request(PROMPT, sampler="euler_a", seed=3, steps=4, batch_size=2, init_image=image, strength=0.6,
                      inpaint=Inpaint(mask, blur=4))
    images, steps = run_ours(pipe, request)
    overlay = request.inpaint.processed((W, H)).overlay[0, 0].numpy()
    outside, full = overlay == 0, overlay == 1
    assert outside.mean() > 0.3 and full.mean() > 0.05 and ((overlay > 0) & (overlay < 1)).any()
    original = np.asarray(image)
    with torch.inference_mode():
        generated = [np.asarray(im) for im in tensor_to_pil(pipe.decode(steps[-1]))]
    for out, gen in zip(images, generated):
        out = np.asarray(out)
        assert np.array_equal(out[outside], original[outside])
        assert np.array_equal(out[full], gen[full])
        assert np.abs(out[full].astype(int) - original[full]).mean() > 10       # repainted
        assert not np.array_equal(gen[outside], original[outside])             # the VAE alone would change it


# ---- 3. A1111's mask blur: OpenCV, bit for bit -----------------------------------------------------

def a1111_blur(mask: np.ndarray, blur: float) -> np.ndarray:
    """modules/processing.py, StableDiffusionProcessingImg2Img.init: one (k, 1) then one (1, k) cv2 blur."""
    cv2 = pytest.importorskip("cv2")
    k = 2 * int(2.5 * blur + 0.5) + 1
    mask = np.asarray(Image.fromarray(cv2.GaussianBlur(mask, (k, 1), blur)))
    return np.asarray(Image.fromarray(cv2.GaussianBlur(mask, (1, k), blur)))


def blur_cases():
    rng = np.random.default_rng(4)
    rect = np.zeros((48, 64), dtype=np.uint8)
    rect[10:30, 20:50] = 255
    return [("rect", rect), ("noise", rng.integers(0, 256, (48, 64), dtype=np.uint8)),
            ("tall", rng.integers(0, 2, (61, 7), dtype=np.uint8) * 255),
            ("row", rng.integers(0, 256, (1, 9), dtype=np.uint8))]


@pytest.mark.parametrize("blur", [0.5, 1, 2.5, 4, 7, 16, 64])
def test_mask_blur_is_opencv_bit_for_bit(blur):
    """Including kernels far wider than the mask (blur 64: 321 taps on 7 or 9 pixels), where the reflected
    border (reflect-101) wraps more than once."""
    for name, mask in blur_cases():
        ours = np.asarray(gaussian_blur(Image.fromarray(mask), blur))
        assert np.array_equal(ours, a1111_blur(mask, blur)), f"{name}: max diff " \
            f"{np.abs(ours.astype(int) - a1111_blur(mask, blur)).max()}"


def test_mask_blur_is_a_gaussian_with_reflected_borders():
    """Without OpenCV: the documented kernel (sigma, k = 2·int(2.5σ + 0.5) + 1 taps, exp(−x²/2σ²) normalised)
    and BORDER_REFLECT_101 (…dcb|abcd|cba…), in float. OpenCV's fixed point (taps in 1/256, 8 bits after each
    pass) stays within 2.5 levels of it (measured 1.86)."""
    worst = 0.0
    for blur in (1.0, 4.0, 9.0):
        k = 2 * int(2.5 * blur + 0.5) + 1
        taps = np.exp(-((np.arange(k) - k // 2) ** 2) / (2 * blur * blur))
        taps /= taps.sum()
        for _, mask in blur_cases()[:3]:
            a = mask.astype(np.float64)
            for axis in (1, 0):
                n = a.shape[axis]
                index = np.arange(-(k // 2), n + k // 2) % max(2 * (n - 1), 1)   # reflect-101: period 2(n-1)
                index = np.where(index > n - 1, 2 * (n - 1) - index, index)        # ...dcb|abcd|cba...
                a = np.tensordot(np.take(a, np.lib.stride_tricks.sliding_window_view(index, k), axis=axis), taps,
                                 axes=([axis + 1], [0]))
            ours = np.asarray(gaussian_blur(Image.fromarray(mask), blur)).astype(np.float64)
            worst = max(worst, np.abs(ours - a).max())
    assert worst <= 2.5
    print(f"mask blur vs a float Gaussian: max {worst:.2f} levels")
    mask = Image.fromarray(blur_cases()[0][1])
    assert gaussian_blur(mask, 0) is mask


# ---- 4. the a1111 blend: the x0 prediction follows the image outside the mask -------------------

@pytest.mark.parametrize("sampler,strength", [("euler_a", 0.6), ("ddim", 1.0), ("dpmpp_2m_karras", 0.6)])
def test_a1111_blend_keeps_the_clean_latents_outside_the_mask(inpaint_models, monkeypatch, sampler, strength):
    pipe, components = inpaint_models[4]
    image, mask = picture(), mask_picture()
    calls, seen = [], {}
    real = stages.blended

    def recording(model, blend, plan):
        seen["blend"] = blend

        def raw(x, call):
            eps = model(x, call)
            calls.append({"x": x, "raw": eps, "sigma": call.sigma})
            return eps
        blended_model, after_step = real(raw, blend, plan)

        def outer(x, call):
            eps = blended_model(x, call)
            calls[-1]["eps"] = eps
            return eps
        return outer, after_step

    monkeypatch.setattr(stages, "blended", recording)
    request = Request(PROMPT, sampler=sampler, seed=8, steps=5, batch_size=2, init_image=image, strength=strength,
                      inpaint=Inpaint(mask, blur=0, blend="a1111"))
    _, steps = run_ours(pipe, request)
    blend = seen["blend"]
    assert blend.formula == "a1111" and len(calls) >= len(steps) == int(5 * strength)
    # The clean latents are the image's posterior sample, the generator's first draw (diffusers' VAE here).
    with torch.inference_mode():
        posterior = components["vae"].encode(pil_to_tensor(image)).latent_dist
        clean = posterior.sample(generator=torch.Generator().manual_seed(8)) * LATENT_SCALE
    assert rel_err(blend.known, clean.repeat(2, 1, 1, 1)) <= TOL
    keep = (1 - blend.mask).bool().expand_as(blend.known)
    assert keep.any() and (~keep).any()
    for c in calls:
        x0 = predicted_x0(c["x"], c["eps"], c["sigma"])
        own = predicted_x0(c["x"], c["raw"], c["sigma"])
        assert rel_err(x0[keep], blend.known[keep]) <= TOL        # outside: the clean latents
        assert rel_err(x0[~keep], own[~keep]) <= TOL              # inside: the model's own prediction
    assert torch.equal(steps[-1][keep], blend.known[keep])        # and the result outside is exactly them
    assert not torch.equal(steps[-1][~keep], blend.known[~keep])


# ---- 5. errors and edge cases --------------------------------------------------------------------

def test_inpainting_needs_an_init_image():
    with pytest.raises(ValueError, match="init_image"):
        Request(PROMPT, inpaint=mask_picture())


@pytest.mark.parametrize("field,value,words", [
    ("fill", "smear", "masked content"), ("fill", "noise", "masked content"), ("blend", "comfy", "blend"),
    ("blur", -1, "mask blur"), ("blur", 65, "mask blur"), ("blur", True, "mask blur"), ("blur", "4", "mask blur"),
    ("mask_weight", 1.5, "mask_weight"), ("mask_weight", -0.1, "mask_weight"), ("mask_weight", True, "mask_weight"),
    ("invert", 1, "invert")])
def test_bad_inpaint_settings_are_refused(field, value, words):
    with pytest.raises(ValueError, match=words):
        Inpaint(mask_picture(), **{field: value})
    with pytest.raises(ValueError, match=words):      # also through a Request's dict
        Request(PROMPT, init_image=picture(), inpaint={"mask": mask_picture(), field: value})


def test_the_forms_of_inpaint_agree():
    mask = mask_picture()
    a = Request(PROMPT, init_image=picture(), inpaint=mask).inpaint
    b = Request(PROMPT, init_image=picture(), inpaint={"mask": mask}).inpaint
    c = Request(PROMPT, init_image=picture(), inpaint=Inpaint(mask.convert("RGB"))).inpaint
    assert a == b == c and a.blur == 4.0 and a.fill == "original" and a.blend == "diffusers"


@pytest.mark.parametrize("channels", [4, 9])
def test_an_empty_mask_returns_the_image_unchanged_with_a_warning(inpaint_models, channels, caplog):
    pipe, _ = inpaint_models[channels]
    image = picture()
    calls = []
    with caplog.at_level(logging.WARNING, "sd15"):
        images = pipe.generate(Request(PROMPT, seed=1, steps=4, batch_size=2, init_image=image,
                                       inpaint=Image.new("L", (W, H), 0)), progress=lambda *a: calls.append(a))
    assert len(images) == 2 and not calls
    assert all(np.array_equal(np.asarray(im), np.asarray(image)) for im in images)
    assert [im.info["seed"] for im in images] == [1, 1]            # diffusers' seed mode: one generator
    assert any("mask is empty" in r.getMessage() for r in caplog.records if r.name == "sd15")
    # A mask the >= 0.5 threshold empties (greys below 128) is empty too, blur 0 or not.
    assert Inpaint(Image.new("L", (W, H), 127), blur=0).processed((W, H)).empty


# ---- 6. full SD1.5 size --------------------------------------------------------------------------

FULL_CASES = [(4, "euler_a", 1.0, 2), (9, "dpmpp_2m_karras", 0.6, 4)]    # (channels, sampler, strength, steps)
PIXEL_MAX_DIFF, PIXEL_IDENTICAL, PIXEL_PSNR = 1, 0.995, 60.0             # test_pipeline_parity's bounds


@pytest.fixture(scope="module")
def full_size(tokenizer):
    """{4: (ours, reference components), 9: (...)} at full SD1.5 size (1.07 B random parameters, fp32).

    One random state dict (4.3 GB) for everything, as test_pipeline_parity's full-size case: ours through
    `sd15.files` into engine models (reference.engine_models, what sd15.load does after reading; the file
    path is the tiny cases' above), the reference through diffusers' converters, both sharing its tensors.
    The 9-channel UNet is the same tensors with the first convolution widened (the 4 channels kept, 5
    random ones added), its config read from the shapes as sd15.load reads it; the VAE and the text
    encoders are shared by both checkpoints. Each test takes its entry out; the rest goes with the module.
    """
    sd = random_full_state_dict(seed=0)
    weight = sd[CONV_IN]
    extra = torch.randn((weight.shape[0], 5, 3, 3), generator=torch.Generator().manual_seed(9)) / (4 * 9) ** 0.5
    nine = dict(sd) | {CONV_IN: torch.cat([weight, extra], dim=1) * (4 / 9) ** 0.5}   # fan-in 81 now: rescaled
    unet9 = unet_config_from_shapes({k[len(PREFIX["unet"]):]: tuple(v.shape) for k, v in nine.items()
                                     if k.startswith(PREFIX["unet"])})
    assert unet9 == dataclasses.replace(FULL.unet, in_channels=9)
    ref, engine = reference_models(sd, FULL), engine_models(sd, FULL)
    configs9 = dataclasses.replace(FULL, unet=unet9)
    ref_unet9, engine_unet9 = reference_unet(nine, unet9), engine_models(nine, configs9).unet
    del sd, nine, weight, extra
    out = {}
    for channels, ours_unet, ref_unet in ((4, engine.unet, ref.unet), (9, engine_unet9, ref_unet9)):
        pipe = sd15.Pipeline(tokenizer=CLIPTokenizer(), text_encoder=engine.text_encoder, unet=ours_unet,
                             vae=engine.vae, device=torch.device("cpu"), dtype=torch.float32)
        assert pipe.unet.cfg.in_channels == channels == ref_unet.config.in_channels
        out[channels] = pipe, dict(vae=ref.vae, text_encoder=ref.text_encoder, unet=ref_unet, tokenizer=tokenizer,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    del ref, engine, ref_unet9, engine_unet9, pipe, ours_unet, ref_unet
    yield out
    out.clear()             # pytest keeps the fixture's value: empty it so the 4.3 GB goes now
    gc.collect()


@pytest.mark.parametrize("channels,sampler,strength,steps", FULL_CASES,
                         ids=[f"{c}ch-{s}-{t}" for c, s, t, _ in FULL_CASES])
def test_full_size_inpaint_matches_diffusers(full_size, channels, sampler, strength, steps):
    """Full SD1.5 size, fp32, 64x48, batch 1, CFG 7.5, 2 denoising steps (4 at strength 0.6: int(4·0.6) = 2).
    Latents per step and the decoded image before paste-back within 1e-5; diffusers' PIL images (no
    paste-back) against our decode's within test_pipeline_parity's pixel bounds; what generate returned is
    that decode pasted back, exactly."""
    # Taken out of the fixture: its models go when this test ends (the UNet's tensors are shared with the
    # other checkpoint's, but its oneDNN-prepacked weights, +2.4 GB, are its own).
    pipe, components = full_size.pop(channels)
    image, mask, seed = picture(), mask_picture(), 2000 + channels
    ours_images, ours_steps = run_ours(pipe, Request(
        sampler=sampler, seed=seed, steps=steps, init_image=image, strength=strength,
        inpaint=Inpaint(mask, blur=0), **common()))
    reference = StableDiffusionInpaintPipeline(**components, scheduler=reference_scheduler(sampler))
    reference.set_progress_bar_config(disable=True)
    ref_steps = []
    ref_images = reference(
        image=image, mask_image=mask, height=H, width=W, strength=strength, num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed), output_type="pil", **common(),
        callback_on_step_end=lambda _p, _i, _t, tensors: ref_steps.append(tensors["latents"].clone()) or {}).images
    lat, dec, decoded = compare(pipe, components["vae"], ours_steps, ref_steps)
    assert len(ours_steps) == int(steps * strength) == 2 and ours_steps[-1].shape == (1, 4, H // 8, W // 8)
    identical, max_diff, psnr = pixel_stats(tensor_to_pil(decoded), ref_images)
    assert max_diff <= PIXEL_MAX_DIFF and identical >= PIXEL_IDENTICAL and psnr >= PIXEL_PSNR, \
        f"identical {identical:.5f}, max diff {max_diff}, PSNR {psnr:.1f} dB"
    masks = Inpaint(mask, blur=0).processed((W, H))
    expected = tensor_to_pil(paste_back(decoded, pil_to_tensor(image), masks))
    assert len(ours_images) == 1 and np.array_equal(np.asarray(ours_images[0]), np.asarray(expected[0]))
    assert float(np.asarray(ref_images[0]).std()) > 5       # a picture (of noise), not a flat image
    print(f"full size {channels}ch {sampler} strength {strength}: latents {lat:.1e}, decoded {dec:.1e}, "
          f"identical {identical:.5f}, max diff {max_diff}, PSNR {psnr:.1f} dB")
