"""ControlNet features beyond plain txt2img, each held to an independent reference (diffusers, or the published
formula computed here; never our own output):

1. A1111's control modes. "My prompt is more important" scales residual k of n by 0.825^(n-1-k) (SD1.5's 13:
   0.825^(12-k), the middle block's 1) on both halves of guidance; "ControlNet is more important" the same on
   the conditional half only. diffusers has neither: its ControlNetModel with every zero conv (weight and bias)
   pre-multiplied by the soft scale is the reference, in guess mode for "controlnet" (conditional half only),
   its logspace(-1, 0, n) factors divided out of the pre-multiplication.
2. Shuffle: residuals pooled over space, conditional half only, vs diffusers' `global_pool_conditions=True`;
   `load_controlnet` picks it from a file name containing "shuffle" (A1111's rule).
3. A "difference" file (key `difference`, control_model.* = control − the SD UNet's own tensors, Mikubill's
   extract_controlnet_diff) loaded with the pipe it controls gives the full file's residuals.
4. img2img with a ControlNet vs StableDiffusionControlNetImg2ImgPipeline (strength 0.6): both draw the VAE
   posterior sample, then the forward-process noise, from the one seeded generator; start/end count the steps
   that run.
5. Inpainting with a ControlNet (4-channel UNet, diffusers' latent blend) vs
   StableDiffusionControlNetInpaintPipeline, and the inpaint preprocessor's hint image·(1−m) − m (diffusers'
   docs' make_inpaint_condition), checked value by value.
6. Hires fix: the second pass runs a canny Control with the soft ("prompt") scales, A1111's rule; other
   preprocessors stay balanced (checked on what the UNet was given against what the ControlNet returned).
7. "Only masked" inpainting: the ControlNet sees its control image cut to the crop the init image is cut to
   (diffusers' get_crop_region + its "fill" resize of A1111's resize mode 2 as the reference).
8. Resize modes, A1111's ControlNet geometry: "Crop and Resize" = scale by max(H/h, W/w) (sides rounded), then the
   centre crop; "Resize and Fill" = scale by min(...), centred on a canvas of the median colour of the image's
   border pixels; "Just Resize" = stretch. Lanczos throughout.

Tiny models (sd15.models.demo), 64x64, CFG 7.5. Measured (torch 2.13, diffusers 0.42.1, one thread; `pytest -s`
prints the figures), latents per step, max rel err: "prompt" mode 2.8e-6 / 3.8e-6 and "controlnet" mode 2.3e-6 /
3.4e-6 (euler / dpmpp_2m_karras; each moves the result from balanced by 0.25 .. 0.76), shuffle 2.6e-6, img2img
1.8e-6 .. 2.2e-6 (euler_a too: the per-step noise follows the same two initial draws), inpainting 2.8e-6 / 3.6e-6
(strength 1 / 0.6). Bound 1e-5. Difference file: residuals identical (0) to a full file of the float32 sums,
9.8e-7 from the original full file (one float32 rounding of (c − u) + u); bounds 1e-6 and 3e-6. The hints
(inpaint, only masked, resize modes) equal the references exactly.

Not A1111's pixels: its ControlNet extension resamples with OpenCV's INTER_AREA / INTER_CUBIC / INTER_NEAREST,
picked by the map's content; sd15 (and this test) with Lanczos, the filter of diffusers' control image
processor. The geometry (scale factors, rounding, crop and padding offsets, the fill colour) is A1111's.
"""

import numpy as np
import pytest
import torch
from diffusers import (ControlNetModel, StableDiffusionControlNetImg2ImgPipeline,
                       StableDiffusionControlNetInpaintPipeline)
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file

import sd15
from reference import diffusers_steps, rel_err
from sd15.files import CheckpointError
from sd15.models.config import ControlNetConfig
from sd15.models.controlnet import ControlNet
from sd15.pipeline.control import SOFT_BASE, Control, ControlNetFile
from sd15.pipeline.hires import Hires
from sd15.pipeline.masks import Inpaint
from sd15.pipeline.request import Request
from test_controlnet_model import (CFG, diffusers_controlnet_config, inputs, random_controlnet_state,
                                   reference_controlnet)
# ours, reference, control_files, nets: that module's fixtures (sd15.load of the tiny file, diffusers' components,
# two tiny ControlNet files, (ours, diffusers') per file), imported so pytest finds them here too.
from test_controlnet_pipeline import (NEGATIVE, PROMPT, SIZE, STEPS, control_files, control_image, nets,  # noqa: F401
                                      ours, reference, run_ours, run_reference)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

TOL = 1e-5
RESIDUALS = 7     # the tiny ControlNet's 6 skips, then the middle block (SD1.5's: 12 + 1); diffusers' count is asserted


def soft_scales(n: int) -> list[float]:
    """The original repository's (and A1111's) soft-injection scales, computed from the formula."""
    return [0.825 ** (n - 1 - k) for k in range(n)]


def max_step_err(ours_steps, ref_steps) -> float:
    assert len(ours_steps) == len(ref_steps) > 0
    errors = [rel_err(a, b) for a, b in zip(ours_steps, ref_steps)]
    assert max(errors) <= TOL, errors
    return max(errors)


def picture(width=SIZE, height=SIZE, phase=0.0) -> Image.Image:
    """A smooth gradient with texture (init images, and control images whose resizing must be exact)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin(x / 3 + phase) * np.cos(y / 4)], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), mode="RGB")


def as_hint(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] float32 in [0, 1], as diffusers' control image processor gives it."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def scaled_zero_convs(path, factors) -> ControlNetModel:
    """diffusers' ControlNet from the file, each output's zero conv (weight and bias) multiplied by its factor:
    residual k becomes factor_k · residual k, the control mode computed inside the reference model."""
    model = reference_controlnet(load_file(str(path)), CFG)
    convs = [*model.controlnet_down_blocks, model.controlnet_mid_block]
    assert len(convs) == len(factors) == RESIDUALS
    for conv, f in zip(convs, factors):
        conv.weight.data = conv.weight.data * f          # new tensors: the file's are shared with other models
        conv.bias.data = conv.bias.data * f
    return model


def hint_spy(monkeypatch, net) -> list[torch.Tensor]:
    """The hints the ControlNet is run with (one per call)."""
    seen, forward = [], net.forward

    def spy(x, t, context, hint):
        seen.append(hint.detach().clone())
        return forward(x, t, context, hint)
    monkeypatch.setattr(net, "forward", spy)
    return seen


def steps_of(pipe, request) -> list[torch.Tensor]:
    steps = []
    pipe.generate(request, lambda i, n, x: steps.append(x.clone()))
    return steps


def run_diffusers(cls, components, sampler, seed, **kwargs) -> list[torch.Tensor]:
    """The latents after every step of diffusers' pipeline `cls` (img2img / inpaint ControlNet pipelines)."""
    return diffusers_steps(cls, components, sampler, seed, prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5,
                           output_type="latent", **kwargs)[1]


# ---- 1. control modes ----------------------------------------------------------------------------------

def test_scales_are_the_published_numbers():
    """SD1.5's 13 residuals: A1111's `[weight * 0.825 ** (12 - i) for i in range(13)]`, diffusers' guess mode
    logspace(-1, 0, 13)."""
    with torch.device("meta"):
        full = ControlNet(ControlNetConfig())
    image = torch.zeros(3, 8, 8)
    prompt = Control(full, image, strength=0.5, mode="prompt").scales
    assert len(prompt) == 13
    assert prompt == pytest.approx([0.5 * 0.825 ** (12 - k) for k in range(13)], rel=1e-12)
    assert prompt[0] == pytest.approx(0.5 * 0.0994, rel=1e-3) and prompt[11] == pytest.approx(0.5 * 0.825)
    assert prompt[12] == 0.5
    assert Control(full, image, strength=0.5, mode="controlnet").scales == prompt
    assert Control(full, image, strength=0.5).scales == [0.5] * 13
    guess = Control(full, image, strength=0.5, guess_mode=True).scales
    assert torch.allclose(torch.as_tensor(guess), 0.5 * 10 ** (-(12 - torch.arange(13.0)) / 12), rtol=1e-6)
    assert guess[0] == pytest.approx(0.05, rel=1e-6)
    # which halves of guidance: "prompt" both, "controlnet" and guess mode the conditional one
    assert [Control(full, image, mode=m).conditional_only for m in ("balanced", "prompt", "controlnet")] == \
        [False, False, True]
    assert Control(full, image, guess_mode=True).conditional_only
    assert Control(ControlNetFile(full, global_pool=True), image).conditional_only
    assert SOFT_BASE == 0.825


MODES = [("prompt", "euler"), ("prompt", "dpmpp_2m_karras"), ("controlnet", "euler"),
         ("controlnet", "dpmpp_2m_karras")]


@pytest.fixture(scope="module")
def balanced_runs(ours, nets):
    mine, _ = nets[0]
    return {s: run_ours(ours, s, 1234, [Control(mine, control_image(0), strength=0.8)])
            for s in ("euler", "dpmpp_2m_karras")}


@pytest.mark.parametrize("mode,sampler", MODES, ids=[f"{m}-{s}" for m, s in MODES])
def test_control_mode_matches_diffusers_with_scaled_zero_convs(ours, reference, nets, control_files, balanced_runs,
                                                              mode, sampler):
    mine, _ = nets[0]
    image = control_image(0)
    factors = soft_scales(RESIDUALS)
    guess = mode == "controlnet"
    if guess:       # diffusers' guess mode multiplies by its logspace (float32, as it computes it): divide it out
        factors = [f / float(g) for f, g in zip(factors, torch.logspace(-1, 0, RESIDUALS))]
    theirs = scaled_zero_convs(control_files[0], factors)
    ours_steps = run_ours(ours, sampler, 1234, [Control(mine, image, strength=0.8, mode=mode)])
    ref_steps = run_reference(reference, sampler, 1234, theirs, image=image, controlnet_conditioning_scale=0.8,
                              guess_mode=guess)
    err = max_step_err(ours_steps, ref_steps)
    moved = rel_err(balanced_runs[sampler][-1], ours_steps[-1])
    print(f"\n{mode} mode, {sampler}: latents per step max rel err {err:.2e}; differs from balanced by {moved:.2e}")
    assert moved > 1e-3          # the mode did something the comparison can see


def test_prompt_and_controlnet_modes_differ(ours, nets):
    """The only difference between them is the unconditional half: it must show."""
    mine, _ = nets[0]
    a = run_ours(ours, "euler", 9, [Control(mine, control_image(0), mode="prompt")])
    b = run_ours(ours, "euler", 9, [Control(mine, control_image(0), mode="controlnet")])
    assert rel_err(a[-1], b[-1]) > 1e-3


# ---- 2. shuffle ----------------------------------------------------------------------------------------

def pooled_reference(path) -> ControlNetModel:
    """diffusers' ControlNetModel with global_pool_conditions=True (its shuffle config), filled by its converter."""
    config = diffusers_controlnet_config(CFG) | {"global_pool_conditions": True}
    with torch.device("meta"):
        model = ControlNetModel(**config)
    model.load_state_dict(convert_controlnet_checkpoint(load_file(str(path)), config), strict=True, assign=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def shuffle_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("shuffle") / "control_v11e_sd15_tiny_shuffle.safetensors"
    save_file(random_controlnet_state(CFG, seed=1), str(path))
    return path


def test_shuffle_is_picked_by_file_name(ours, shuffle_file, control_files):
    assert sd15.load_controlnet(shuffle_file, ours).global_pool is True
    assert sd15.load_controlnet(control_files[0], ours).global_pool is False
    assert sd15.load_controlnet(control_files[0], ours, global_pool=True).global_pool is True
    assert sd15.load_controlnet(shuffle_file, ours, global_pool=False).global_pool is False


@pytest.mark.parametrize("how", ["by-name", "ControlNetFile"])
def test_shuffle_matches_diffusers_global_pool(ours, reference, nets, shuffle_file, how):
    if how == "by-name":
        cn = sd15.load_controlnet(shuffle_file, ours)
    else:
        cn = ControlNetFile(nets[0][0], global_pool=True)          # the same tensors (seed 1)
    image = control_image(0)
    ours_steps = run_ours(ours, "euler", 21, [Control(cn, image, strength=0.7)])
    ref_steps = run_reference(reference, "euler", 21, pooled_reference(shuffle_file), image=image,
                              controlnet_conditioning_scale=0.7)
    err = max_step_err(ours_steps, ref_steps)
    unpooled = run_ours(ours, "euler", 21, [Control(nets[0][0], image, strength=0.7)])
    moved = rel_err(unpooled[-1], ours_steps[-1])
    print(f"\nshuffle ({how}): latents per step max rel err {err:.2e}; differs from unpooled by {moved:.2e}")
    assert moved > 1e-3


# ---- 3. difference files -------------------------------------------------------------------------------

def residual_list(net, x, t, context, hint) -> list[torch.Tensor]:
    with torch.no_grad():
        out = net(x, t, context, hint)
    return [*out.skips, out.mid]


def test_difference_file_gives_the_full_files_residuals(tmp_path, tiny_state_dict, ours, control_files):
    """Mikubill's extract_controlnet_diff: control − SD for every key the SD UNet has; ComfyUI adds them back.
    In float32 (c − u) + u is c to within one rounding, so the weights the loader must produce are the test's
    own float32 sums: residuals equal to a full file of those sums (<= 1e-6, exact in practice), and within
    float32 rounding (<= 3e-6) of the original full file's."""
    full = load_file(str(control_files[0]))
    unet = "model.diffusion_model."
    shared = [k for k in full if unet + k in tiny_state_dict]
    # Everything but the hint network and the zero convs is a copy of a UNet tensor.
    assert {k.split(".")[0] for k in set(full) - set(shared)} == {"input_hint_block", "zero_convs",
                                                                  "middle_block_out"}
    assert {k.split(".")[0] for k in shared} == {"time_embed", "input_blocks", "middle_block"}
    delta = {k: (t - tiny_state_dict[unet + k] if k in shared else t).contiguous() for k, t in full.items()}
    path = tmp_path / "control_tiny_diff.safetensors"
    save_file({"difference": torch.tensor([1.0])} | {"control_model." + k: t for k, t in delta.items()}, str(path))
    sums = tmp_path / "control_tiny_sums.safetensors"
    save_file({k: (t + tiny_state_dict[unet + k] if k in shared else t).contiguous() for k, t in delta.items()},
              str(sums))

    from_diff = sd15.load_controlnet(path, ours)
    assert any("difference" in q for q in from_diff.quirks), from_diff.quirks
    x, t, context, hint = inputs()
    a = residual_list(from_diff.net, x, t, context, hint)
    s = residual_list(sd15.load_controlnet(sums, ours).net, x, t, context, hint)
    b = residual_list(sd15.load_controlnet(control_files[0], ours).net, x, t, context, hint)
    exact = [rel_err(p, q) for p, q in zip(a, s)]
    errors = [rel_err(p, q) for p, q in zip(a, b)]
    print(f"\ndifference file: residuals vs the float32 sums' file {max(exact):.2e}, vs the original full file "
          f"{max(errors):.2e}")
    assert len(errors) == RESIDUALS and max(exact) <= 1e-6 and max(errors) <= 3e-6, (exact, errors)

    # The deltas alone (the same file without its marker) are another network: the UNet's weights matter.
    bare = tmp_path / "control_tiny_bare.safetensors"
    save_file(delta, str(bare))
    c = residual_list(sd15.load_controlnet(bare, ours).net, x, t, context, hint)
    assert rel_err(c[-1], b[-1]) > 1e-2

    with pytest.raises(CheckpointError) as err:
        sd15.load_controlnet(path, device="cpu")
    msg = str(err.value)
    assert str(path) in msg and "difference" in msg and "sd15.load_controlnet(path, pipe)" in msg, msg


# ---- 4. img2img ----------------------------------------------------------------------------------------

IMG2IMG = [("euler_a", {}), ("dpmpp_2m_karras", {}), ("euler_a", {"start": 0.2, "end": 0.7})]


@pytest.mark.parametrize("sampler,window", IMG2IMG, ids=["euler_a", "dpmpp_2m_karras", "euler_a-0.2-0.7"])
def test_img2img_with_controlnet_matches_diffusers(ours, reference, nets, sampler, window):
    """strength 0.6 of 10 steps runs 6; start/end are fractions of those 6 on both sides."""
    mine, theirs = nets[0]
    init, image = picture(), control_image(0)
    ours_steps = steps_of(ours, Request(PROMPT, negative_prompt=NEGATIVE, init_image=init, strength=0.6, steps=STEPS,
                                        sampler=sampler, guidance_scale=7.5, seed=55,
                                        control=(Control(mine, image, strength=0.9, **window),)))
    ref_steps = run_diffusers(StableDiffusionControlNetImg2ImgPipeline, reference | {"controlnet": theirs}, sampler,
                              55, image=init, control_image=image, strength=0.6, num_inference_steps=STEPS,
                              width=SIZE, height=SIZE, controlnet_conditioning_scale=0.9,
                              control_guidance_start=window.get("start", 0.0),
                              control_guidance_end=window.get("end", 1.0))
    assert len(ours_steps) == int(STEPS * 0.6)
    err = max_step_err(ours_steps, ref_steps)
    plain = steps_of(ours, Request(PROMPT, negative_prompt=NEGATIVE, init_image=init, strength=0.6, steps=STEPS,
                                   sampler=sampler, guidance_scale=7.5, seed=55))
    moved = rel_err(plain[-1], ref_steps[-1])
    print(f"\nimg2img {sampler} {window or ''}: latents per step max rel err {err:.2e}; control moved them {moved:.2e}")
    assert moved > 1e-3


# ---- 5. inpainting -------------------------------------------------------------------------------------

def rectangle_mask(box=(16, 20, 44, 52)) -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, box)
    return mask


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_with_controlnet_matches_diffusers(ours, reference, nets, monkeypatch, strength):
    mine, theirs = nets[0]
    image, mask = picture(), rectangle_mask()
    # The hint from the formula (diffusers' docs, make_inpaint_condition: masked pixels set to -1.0).
    m = torch.from_numpy(np.asarray(mask) > 127)[None, None].expand(1, 3, SIZE, SIZE)
    expected = torch.where(m, torch.tensor(-1.0), as_hint(image))
    seen = hint_spy(monkeypatch, mine)
    ours_steps = steps_of(ours, Request(PROMPT, negative_prompt=NEGATIVE, init_image=image,
                                        inpaint=Inpaint(mask, blur=0), strength=strength, steps=8, sampler="euler_a",
                                        guidance_scale=7.5, seed=31,
                                        control=(Control(mine, strength=0.8, preprocess="inpaint"),)))
    assert len(seen) == len(ours_steps) == int(8 * strength)
    for hint in seen:                                  # both halves of guidance, the same hint
        assert hint.shape == (2, 3, SIZE, SIZE)
        assert torch.equal(hint, expected.expand(2, -1, -1, -1))
    assert int((seen[0][0] == -1).sum()) == 3 * 28 * 32                # -1 exactly inside the 28x32 rectangle
    assert float(seen[0][0][~m[0]].min()) >= 0                        # the image outside
    ref_steps = run_diffusers(StableDiffusionControlNetInpaintPipeline, reference | {"controlnet": theirs},
                              "euler_a", 31, image=image, mask_image=mask, control_image=expected, strength=strength,
                              num_inference_steps=8, width=SIZE, height=SIZE,
                              controlnet_conditioning_scale=0.8)      # its default is 0.5, not 1
    err = max_step_err(ours_steps, ref_steps)
    print(f"\ninpaint + ControlNet, strength {strength}: latents per step max rel err {err:.2e}")


# ---- 6. hires fix --------------------------------------------------------------------------------------

def residual_spy(monkeypatch, net, unet):
    """(the ControlNet's raw outputs, the residuals the UNet was given), one entry per UNet call."""
    raw, given = [], []
    net_forward, unet_forward = net.forward, unet.forward

    def net_spy(*args):
        out = net_forward(*args)
        raw.append([p.detach().clone() for p in (*out.skips, out.mid)])
        return out

    def unet_spy(x, t, context, residuals=None, **kw):
        if residuals is not None:
            given.append([p.detach().clone() for p in (*residuals.skips, residuals.mid)])
        return unet_forward(x, t, context, residuals, **kw)
    monkeypatch.setattr(net, "forward", net_spy)
    monkeypatch.setattr(unet, "forward", unet_spy)
    return raw, given


def scales_used(raw, given) -> list[list[float]]:
    """Per UNet call, the factor each residual was scaled by (least squares; checked to be exact below)."""
    out = []
    for r, g in zip(raw, given, strict=True):
        factors = [float((p * q).sum() / (p * p).sum()) for p, q in zip(r, g)]
        for p, q, f in zip(r, g, factors):
            assert torch.allclose(q, p * f, rtol=1e-5, atol=1e-7 * float(p.abs().max()))
        out.append(factors)
    return out


@pytest.mark.parametrize("preprocess,soft_second_pass", [("canny", True), ("none", False)])
def test_hires_second_pass_softens_canny(ours, nets, monkeypatch, preprocess, soft_second_pass):
    mine, _ = nets[0]
    raw, given = residual_spy(monkeypatch, mine, ours.unet)
    images = ours.generate(Request(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=2,
                                   sampler="euler", seed=3, hires=Hires(scale=1.5, upscaler="Latent", steps=2,
                                                                        denoising_strength=0.5),
                                   control=(Control(mine, control_image(0), strength=0.9, preprocess=preprocess),)))
    assert images[0].size == (96, 96)
    assert [r[0].shape[-1] for r in raw] == [8, 8, 12, 12]           # two calls per pass, latents 8 then 12 wide
    used = scales_used(raw, given)
    first = [0.9] * RESIDUALS
    second = [0.9 * s for s in soft_scales(RESIDUALS)] if soft_second_pass else first
    for factors, expected in zip(used, [first, first, second, second]):
        assert factors == pytest.approx(expected, rel=1e-5)
    # A1111's infotext keeps the unit as the user set it: the softening is the second pass's own
    assert "Control Mode: Balanced" in images[0].info["parameters"]


# ---- 7. only masked ------------------------------------------------------------------------------------

def test_only_masked_crops_the_control_image_with_the_init_image(ours, nets, monkeypatch):
    mine, _ = nets[0]
    image, control = picture(), picture(phase=2.0)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (36, 6, 52, 18))                      # 16x12 near the top right corner
    seen = hint_spy(monkeypatch, mine)
    ours.generate(Request(PROMPT, init_image=image, inpaint=Inpaint(mask, blur=0, only_masked=True, padding=4),
                          width=SIZE, height=SIZE, steps=2, sampler="euler", seed=4,
                          control=(Control(mine, control),)))
    box = VaeImageProcessor.get_crop_region(mask, SIZE, SIZE, pad=4)
    assert box[2] - box[0] < SIZE // 2                        # a real crop, enlarged more than 2x
    processor = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)      # diffusers' control image processor
    expected = processor.preprocess(control, height=SIZE, width=SIZE, crops_coords=box, resize_mode="fill")
    init_crop = processor.preprocess(image, height=SIZE, width=SIZE, crops_coords=box, resize_mode="fill")
    assert len(seen) == 2
    for hint in seen:
        assert hint.shape == (2, 3, SIZE, SIZE)
        assert torch.equal(hint, expected.expand(2, -1, -1, -1))       # both halves of guidance
    # the same crop through the init image: a Control without its own image takes the (cropped) init image
    seen.clear()
    ours.generate(Request(PROMPT, init_image=image, inpaint=Inpaint(mask, blur=0, only_masked=True, padding=4),
                          width=SIZE, height=SIZE, steps=1, sampler="euler", seed=4, control=(Control(mine),)))
    assert torch.equal(seen[0][:1], init_crop)
    print(f"\nonly masked: crop {box}; the hints are diffusers' fill-resized crop exactly")


# ---- 8. resize modes -----------------------------------------------------------------------------------

def a1111_placed(image: Image.Image, mode: str, w: int = SIZE, h: int = SIZE) -> Image.Image:
    """A1111's ControlNet resize geometry (its `high_quality_resize` callers), written out from the formula."""
    ow, oh = image.size
    if mode == "Just Resize":
        return image.resize((w, h), resample=Image.LANCZOS)
    k = max(h / oh, w / ow) if mode == "Crop and Resize" else min(h / oh, w / ow)
    nw, nh = int(np.round(ow * k)), int(np.round(oh * k))
    scaled = image.resize((nw, nh), resample=Image.LANCZOS)
    if mode == "Crop and Resize":
        pad_w, pad_h = (nw - w) // 2, (nh - h) // 2
        return scaled.crop((pad_w, pad_h, pad_w + w, pad_h + h))
    a = np.asarray(image)
    colour = np.median(np.concatenate([a[0, :, :], a[-1, :, :], a[:, 0, :], a[:, -1, :]], axis=0), axis=0)
    canvas = np.tile(colour.astype(np.uint8)[None, None], [h, w, 1])
    pad_h, pad_w = max(0, (h - nh) // 2), max(0, (w - nw) // 2)
    canvas[pad_h:pad_h + nh, pad_w:pad_w + nw] = np.asarray(scaled)
    return Image.fromarray(canvas)


@pytest.mark.parametrize("size", [(96, 64), (150, 100), (64, 120), (97, 61)])
def test_resize_modes_follow_a1111s_geometry(nets, size):
    mine, _ = nets[0]
    image = picture(*size)
    hints = {}
    for mode in ("Crop and Resize", "Resize and Fill", "Just Resize"):
        hints[mode] = Control(mine, image, resize_mode=mode).hint(SIZE, SIZE)
        assert hints[mode].shape == (1, 3, SIZE, SIZE)
        assert torch.equal(hints[mode], as_hint(a1111_placed(image, mode))), mode
    assert not torch.equal(hints["Crop and Resize"], hints["Just Resize"])
    assert not torch.equal(hints["Resize and Fill"], hints["Just Resize"])


def test_resize_mode_reaches_the_controlnet(ours, nets, monkeypatch):
    mine, _ = nets[0]
    image = picture(150, 100)
    seen = hint_spy(monkeypatch, mine)
    for mode in ("Crop and Resize", "Just Resize", "Resize and Fill"):
        seen.clear()
        ours.generate(Request(PROMPT, width=SIZE, height=SIZE, steps=1, sampler="euler", seed=2,
                              control=(Control(mine, image, resize_mode=mode),)))
        assert torch.equal(seen[0][:1], as_hint(a1111_placed(image, mode))), mode
