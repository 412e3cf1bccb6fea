"""The hires fix: txt2img, upscale, img2img, against diffusers run the way its users chain them
(StableDiffusionPipeline → resize → StableDiffusionImg2ImgPipeline, diffusers having no hires pipeline), and
A1111's arithmetic (targets, crops, exactly `hires steps` steps) from its published processing.py.

The reference's second pass gets a generator seeded again with the seed: A1111 re-seeds for the hires pass,
and sd15 does too. Numbers are chosen so that A1111's step arithmetic and diffusers' get_timesteps agree
(hires steps 4 at denoising 0.5: an 8-step schedule, its last 4 steps), which makes the whole run comparable.
"""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from transformers import CLIPTokenizer as ReferenceTokenizer

import sd15
from reference import pipeline_components, reference_scheduler, rel_err
from sd15.pipeline import hires
from sd15.pipeline.hires import Hires
from sd15.pipeline.request import Request
from sd15.sampling import hires_schedule, make_plan, resolve_sampler

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]
PROMPT, NEGATIVE = "a lighthouse at dusk, oil painting", "blurry"


@pytest.fixture(scope="module")
def ours(tiny_ckpt_file):
    return sd15.load(tiny_ckpt_file, device="cpu")


@pytest.fixture(scope="module")
def components(tiny_models, reference_tokenizer_files):
    return pipeline_components(tiny_models[0], ReferenceTokenizer(*reference_tokenizer_files, model_max_length=77))


def reference_hires(components, sampler, seed, upscale, steps, hires_steps, strength, size=(32, 32)):
    """diffusers txt2img, `upscale` of its latents or image, diffusers img2img with the generator seeded again."""
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.0)
    first = StableDiffusionPipeline(**components, scheduler=reference_scheduler(sampler))
    second = StableDiffusionImg2ImgPipeline(**components, scheduler=reference_scheduler(sampler))
    for p in (first, second):
        p.set_progress_bar_config(disable=True)
    kind = "latent" if upscale[0] == "latent" else "pil"
    out = first(width=size[0], height=size[1], num_inference_steps=steps, output_type=kind,
                generator=torch.Generator().manual_seed(seed), **common).images
    image = upscale[1](out)
    total = int(hires_steps / strength)
    assert int(total * strength) == hires_steps            # the case's arithmetic agrees with A1111's
    result = second(image=image, strength=strength, num_inference_steps=total, output_type="latent",
                    generator=torch.Generator().manual_seed(seed), **common).images
    return result, second.vae


def our_latents(pipe, request):
    steps = []
    images = pipe.generate(request, lambda i, n, x: steps.append((i, n, x.clone())))
    return images, steps


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras", "ddim"])
def test_latent_hires_equals_diffusers_txt2img_interpolate_img2img(ours, components, sampler):
    request = Request(PROMPT, negative_prompt=NEGATIVE, width=32, height=32, steps=5, sampler=sampler, seed=21,
                      guidance_scale=7.0, hires=Hires(scale=2, upscaler="Latent", steps=4, denoising_strength=0.5))
    images, steps = our_latents(ours, request)
    upscale = ("latent", lambda z: torch.nn.functional.interpolate(z, size=(8, 8), mode="bilinear"))
    ref, _ = reference_hires(components, sampler, 21, upscale, 5, 4, 0.5)
    assert [(i, n) for i, n, _ in steps] == [(i, 9) for i in range(1, 10)]      # 5 + exactly 4 steps
    assert steps[-1][2].shape == (1, 4, 8, 8) and images[0].size == (64, 64)
    assert rel_err(steps[-1][2], ref) <= 1e-5


def test_pixel_hires_equals_diffusers_txt2img_lanczos_img2img(ours, components):
    request = Request(PROMPT, negative_prompt=NEGATIVE, width=32, height=32, steps=4, sampler="euler", seed=5,
                      guidance_scale=7.0, hires=Hires(scale=2, upscaler="Lanczos", steps=3, denoising_strength=0.75))
    images, steps = our_latents(ours, request)
    upscale = ("pil", lambda ims: [im.resize((64, 64), resample=Image.LANCZOS) for im in ims])
    ref, _ = reference_hires(components, "euler", 5, upscale, 4, 3, 0.75)
    # Between the passes the image is 8-bit (PIL, as in A1111 and diffusers): float-rounding differences
    # of the first pass (~1e-7, as the latent test above shows) can flip a pixel by one level, which the
    # encoder carries into the second pass: measured 3.1e-5 with the GEGLU's halves as two matmuls, <1e-5
    # with one. A wrong upscaler, strength or step count moves it by 1e-2 or more.
    assert rel_err(steps[-1][2], ref) <= 1e-4


def test_a1111_step_arithmetic():
    assert hires_schedule(20, 0.7) == 28                      # A1111's example: 28-step schedule, last 20 run
    plan = make_plan(resolve_sampler("euler"), 28, run=20)
    full = make_plan(resolve_sampler("euler"), 28)
    assert plan.num_steps == 20 and torch.equal(plan.sigmas, full.sigmas[8:])
    assert hires_schedule(10, 1.0) == 10                      # min(d, 0.999): the whole schedule
    with pytest.raises(ValueError, match="more than the 1000 training timesteps"):
        hires_schedule(150, 0.1)


@pytest.mark.parametrize("size,settings,upscale_to,crop,final", [
    ((512, 512), dict(scale=2), (1024, 1024), (0, 0), (1024, 1024)),
    ((512, 768), dict(scale=1.5), (768, 1152), (0, 0), (768, 1152)),
    ((512, 768), dict(resize=(1024, 0)), (1024, 1536), (0, 0), (1024, 1536)),
    ((512, 768), dict(resize=(0, 1024)), (682, 1024), (0, 0), (680, 1024)),
    ((512, 768), dict(resize=(1024, 1024)), (1024, 1536), (0, 64), (1024, 1024)),
    ((768, 512), dict(resize=(1024, 1024)), (1536, 1024), (64, 0), (1024, 1024)),
])
def test_targets_as_a1111_computes_them(size, settings, upscale_to, crop, final):
    t = hires.target(*size, Hires(**settings))
    assert (t.upscale_to, t.crop, t.size) == (upscale_to, crop, final)


def test_crop_is_centred():
    z = torch.arange(2 * 4 * 12 * 8, dtype=torch.float32).reshape(2, 4, 12, 8)
    t = hires.Target((64, 96), (0, 5), 8)
    assert torch.equal(hires.crop(z, t), z[:, :, 2:12 - 3, :])


def test_resize_with_crop_through_the_pipeline(ours):
    out = ours.generate(Request(PROMPT, width=32, height=48, steps=2, seed=1,
                                hires=Hires(resize=(64, 64), steps=2, upscaler="Latent (nearest)")))
    assert out[0].size == (64, 64)
    text = out[0].info["parameters"]
    assert "Size: 32x48" in text and "Hires resize: 64x64" in text and "Hires upscaler: Latent (nearest)" in text


def test_every_upscaler_runs_and_differs(ours):
    """Each upscaler through the pipeline; their own outputs all differ, but one pair: when enlarging,
    torch's antialiased bilinear filter is the plain bilinear one (the antialias widens it only to shrink),
    so "Latent" and "Latent (antialiased)" agree to float rounding, in A1111 as here."""
    images = {}
    for name in hires.UPSCALERS:
        img = ours.generate(Request(PROMPT, width=32, height=32, steps=2, seed=3, sampler="euler",
                                    hires=Hires(scale=1.5, upscaler=name, steps=2)))[0]
        assert img.size == (48, 48), name
        images[name] = np.asarray(img, dtype=np.int16)
    assert np.abs(images["Latent"] - images["Latent (nearest)"]).max() > 16
    assert np.abs(images["Latent"] - images["Lanczos"]).max() > 16
    t = hires.target(32, 32, Hires(scale=1.5))
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    pattern = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    out = {name: hires.upscale_latents(latents, t, name) for name in hires.LATENT_UPSCALERS}
    out |= {name: hires.upscale_pixels([pattern], t, name) for name in hires.PIXEL_UPSCALERS}
    assert all(o.shape[-2:] == (6, 6) for n, o in out.items() if n.startswith("Latent"))
    assert torch.allclose(out["Latent"], out["Latent (antialiased)"], atol=1e-6)
    for kind in ([n for n in hires.LATENT_UPSCALERS if n != "Latent (antialiased)"], list(hires.PIXEL_UPSCALERS)):
        for i, a in enumerate(kind):
            for b in kind[i + 1:]:
                assert (out[a].float() - out[b].float()).abs().max() > 1e-2, (a, b)


def test_hires_sampler_and_prompts_are_the_second_pass_own(ours):
    base = dict(width=32, height=32, steps=3, seed=4, sampler="euler")
    plain = ours.generate(Request(PROMPT, hires=Hires(steps=2), **base))[0]
    other = ours.generate(Request(PROMPT, hires=Hires(steps=2, sampler="DPM++ 2M Karras", prompt="a red barn",
                                                      negative_prompt="fog"), **base))[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(other))
    text = other.info["parameters"]
    for field in ("Hires sampler: DPM++ 2M", "Hires schedule type: Karras", "Hires prompt: a red barn",
                  "Hires negative prompt: fog", "Denoising strength: 0.7", "Hires upscale: 2"):
        assert field in text, field
    back = Request.from_infotext(text)
    assert back.request.hires == other_hires() and back.unsupported == {}
    assert np.array_equal(np.asarray(ours.generate(back.request)[0]), np.asarray(other))


def other_hires():
    return Hires(steps=2, sampler="dpmpp_2m_karras", prompt="a red barn", negative_prompt="fog")


def test_a1111_seeds_with_hires_image_i_is_seed_plus_i(ours):
    kw = dict(width=32, height=32, steps=2, sampler="euler_a", seed_mode="a1111",
              hires=Hires(scale=1.5, steps=2))
    batch = ours.generate(Request(PROMPT, seed=10, batch_size=3, **kw))
    alone = ours.generate(Request(PROMPT, seed=12, **kw))
    assert np.array_equal(np.asarray(batch[2]), np.asarray(alone[0]))


def test_unknown_upscaler_in_an_a1111_infotext_is_named_not_applied():
    back = Request.from_infotext("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
                                 "Denoising strength: 0.4, Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+, "
                                 "Version: v1.10.1")
    assert back.request.hires is None
    assert back.unsupported == {"Denoising strength": "0.4", "Hires upscale": "2", "Hires upscaler": "R-ESRGAN 4x+"}


@pytest.mark.parametrize("kwargs,message", [
    (dict(hires=Hires(), init_image=Image.new("RGB", (32, 32))), "hires fix is a txt2img second pass"),
    (dict(hires=dict(upscaler="R-ESRGAN 4x+")), "unknown hires upscaler 'R-ESRGAN 4x\\+'; sd15 has: Latent, "),
    (dict(hires=dict(scale=0.5)), "hires scale must be a number from 1 to 8"),
    (dict(hires=dict(denoising_strength=0)), "hires denoising_strength must be in \\(0, 1\\]"),
    (dict(hires=dict(resize=(0, 0))), "hires resize must be \\(width, height\\)"),
    (dict(hires=dict(scale=8), width=4096, height=4096), "width"),
    (dict(hires="2x"), "hires must be a Hires"),
])
def test_bad_hires_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Request(PROMPT, **kwargs)


def test_a1111_hires_sampler_and_schedule_type_fields():
    """A1111's get_hr_sampler_and_scheduler: a missing Hires sampler or Hires schedule type is the first pass's."""
    line = "a cat\nSteps: 20, Sampler: {}, Schedule type: {}, CFG scale: 7, Seed: 1, Size: 512x512, " \
           "Denoising strength: 0.5, Hires upscale: 2, {}Version: v1.10.1"
    cases = [(("DPM++ 2M", "Karras", "Hires schedule type: Exponential, "), "dpmpp_2m_exponential"),
             (("Euler", "Karras", "Hires sampler: Heun, "), "heun_karras"),
             (("Euler a", "Automatic", "Hires sampler: DPM++ 2M, Hires schedule type: Karras, "), "dpmpp_2m_karras"),
             (("Euler a", "Automatic", "Hires sampler: Use same sampler, "), None)]
    for (sampler, schedule, extra), expected in cases:
        hires_fix = Request.from_infotext(line.format(sampler, schedule, extra)).request.hires
        assert hires_fix.sampler == expected, (sampler, schedule, extra)


def test_hires_infotext_writes_only_what_differs():
    first = dict(sampler="DPM++ 2M Karras", width=512, height=512)
    text = Request("a cat", hires=Hires(sampler="dpmpp_2m_exponential", prompt="a cat"), **first).infotext()
    assert "Hires schedule type: Exponential" in text and "Hires sampler" not in text and "Hires prompt" not in text
    assert Request.from_infotext(text).request.hires.sampler == "dpmpp_2m_exponential"
    assert Hires(prompt="").prompt is None                        # A1111: empty means the first pass's


def test_hires_keeps_the_options_its_sampler_has():
    second = hires.second_pass_request(Request("a cat", sampler="euler_a", sampler_options={"eta": 0.5},
                                               hires=Hires(sampler="euler_a_karras")))
    assert dict(second.sampler_options) == {"eta": 0.5}
    second = hires.second_pass_request(Request("a cat", sampler="euler_a", sampler_options={"eta": 0.5},
                                               hires=Hires(sampler="euler")))
    assert dict(second.sampler_options) == {}


def test_pixel_upscale_follows_a1111_and_gives_multiples_of_8():
    image = Image.effect_noise((40, 24), 60).convert("RGB")
    t = hires.target(40, 24, Hires(scale=1.3, upscaler="Lanczos"))     # 52x31: not multiples of 8
    got = hires.upscale_pixels([image], t, "Lanczos")
    assert got.shape == (1, 3, 24, 48)
    # A1111: the upscaler's resize by the scale, Lanczos to a multiple of 8, Lanczos to the target (then cut)
    step = image.resize((52, 31), Image.LANCZOS).resize((48, 24), Image.LANCZOS).resize((52, 31), Image.LANCZOS)
    expected = torch.from_numpy(np.asarray(step.crop((0, 0, 48, 24)), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(got[0], expected, atol=1e-6)


def test_resize_and_scale_together_is_an_error():
    with pytest.raises(ValueError, match="give a scale \\(1.5\\) or a resize \\(1024x1024\\), not both"):
        Hires(scale=1.5, resize=(1024, 1024))
    with pytest.raises(ValueError, match="hires resize must be"):
        Hires(resize=[0, 0])
    with pytest.raises(ValueError, match="hires has no setting oops"):
        Hires.of({"oops": 1})
