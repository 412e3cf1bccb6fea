"""LCM-distilled checkpoints end to end: `sd15.load` of a real single-file checkpoint with a guidance embedding,
then `Pipeline.generate(Request(sampler="lcm"))` against diffusers' LatentConsistencyModelPipeline.

The file: the tiny random checkpoint (`reference.TINY`, original LDM layout) plus the one tensor an LCM-distilled
single file such as LCM_Dreamshaper_v7 adds, `model.diffusion_model.time_embedding.cond_proj.weight`. It keeps
diffusers' name because diffusers' LDM conversion has no rule for it (stable-diffusion.cpp lists exactly this
key among the tensors it skips); its shape is diffusers' TimestepEmbedding.cond_proj, nn.Linear(256,
channels, bias=False): [channels, 256]. Written to disk as .safetensors, loaded by `sd15.load` as users do.

The reference: LatentConsistencyModelPipeline over diffusers' own UNet2DConditionModel(time_cond_proj_dim=256)
(its LDM converter for every other tensor, then cond_proj under its own name), transformers' CLIP text model
and a real transformers CLIPTokenizer (the prompts go through both tokenizers), the VAE, and
LCMScheduler.from_config(SD1.5 DDIM config), as LCM users build it. Both sides get only
`torch.Generator().manual_seed(seed)` in common: the initial noise and LCM's fresh draw per step come from it.

Compared per case: the latents after every step (our progress callback vs callback_on_step_end; after the
last step both are the boundary-conditioned x0), relative error max|ours − ref| / max|ref|; the decoded float
images of both VAEs; the uint8 PIL pixels; and that our UNet ran once per step on the batch (no CFG pass).
Measured (CPU, torch 2.13, diffusers 0.42.1, one thread, 64x64, w = 8; 1, 2, 4 steps, batch 1, batch 2 of one
prompt, two prompts): latents rel err <= 7.4e-7, decoded <= 1.1e-6, pixels max |diff| <= 1 (one or two
rounding flips), >= 99.988% identical, PSNR >= 87 dB. Bounds as tests/test_pipeline_parity.py: 1e-5; pixels
max diff <= 1, >= 99.5% identical, >= 60 dB. `pytest -s` prints the figures of each case.
"""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import \
    LatentConsistencyModelPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer as ReferenceTokenizer

import sd15
from reference import SD15_SCHEDULER, TINY, diffusers_unet_config, pixel_stats, reference_models, rel_err
from sd15.models.latents import LATENT_SCALE
from sd15.pipeline.request import Request
from sd15.models.demo import tiny_metadata
from tools.make_checkpoint import save

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

COND_KEY = "model.diffusion_model.time_embedding.cond_proj.weight"   # as in LCM_Dreamshaper_v7's single file
GUIDANCE_DIM = 256                                                   # LCM's w embedding width
TOL = 1e-5
PIXEL_MAX_DIFF, PIXEL_IDENTICAL, PIXEL_PSNR = 1, 0.995, 60.0
PROMPT = "a lighthouse at dusk, oil painting"
SIZE = dict(width=64, height=64)


# ---- the checkpoint file and both pipelines ------------------------------------------------------

@pytest.fixture(scope="module")
def lcm_file(tiny_state_dict, tmp_path_factory):
    """The tiny checkpoint plus a random guidance projection, as a .safetensors file on disk."""
    channels = TINY.unet.channels
    shape = tuple(TimestepEmbedding(channels, 4 * channels, cond_proj_dim=GUIDANCE_DIM).cond_proj.weight.shape)
    assert shape == (channels, GUIDANCE_DIM)             # diffusers' layout of the tensor
    gen = torch.Generator().manual_seed(7)
    sd = dict(tiny_state_dict) | {COND_KEY: torch.randn(shape, generator=gen) / GUIDANCE_DIM**0.5}
    path = tmp_path_factory.mktemp("lcm") / "lcm-tiny_v7.safetensors"
    save(sd, path, metadata=tiny_metadata())     # the metadata records the plain tiny UNet: detection is by shape
    return path


@pytest.fixture(scope="module")
def ours(lcm_file):
    return sd15.load(lcm_file, device="cpu")


def reference_lcm_unet(sd: dict) -> UNet2DConditionModel:
    config = diffusers_unet_config(TINY.unet) | {"time_cond_proj_dim": GUIDANCE_DIM}
    state = convert_ldm_unet_checkpoint({k: v for k, v in sd.items() if k != COND_KEY}, config)
    assert "time_embedding.cond_proj.weight" not in state     # diffusers' converter really has no rule for it
    state["time_embedding.cond_proj.weight"] = sd[COND_KEY]
    model = UNet2DConditionModel(**config)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def reference(lcm_file, reference_tokenizer_files):
    """diffusers' LatentConsistencyModelPipeline on the tensors read back from the same file."""
    sd = load_file(str(lcm_file))
    plain = reference_models({k: v for k, v in sd.items() if k != COND_KEY}, TINY)
    pipe = LatentConsistencyModelPipeline(
        vae=plain.vae, text_encoder=plain.text_encoder, unet=reference_lcm_unet(sd),
        tokenizer=ReferenceTokenizer(*reference_tokenizer_files, model_max_length=77),
        scheduler=LCMScheduler.from_config(DDIMScheduler(**SD15_SCHEDULER).config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_ours(pipe, request: Request):
    steps, calls = [], []
    hook = pipe.unet.register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
    try:
        images = pipe.generate(request, progress=lambda i, n, x: steps.append(x.clone()))
    finally:
        hook.remove()
    return images, steps, calls


def run_reference(pipe, prompt, seed, **kwargs):
    steps = []

    def on_step_end(_pipe, _i, _t, tensors):
        steps.append(tensors["latents"].clone())
        return {}

    images = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), callback_on_step_end=on_step_end,
                  output_type="pil", **SIZE, **kwargs).images
    return images, steps


# ---- the file -------------------------------------------------------------------------------------

def test_lcm_checkpoint_file_is_detected(ours, lcm_file, tiny_ckpt_file):
    assert ours.unet.cfg == dataclasses.replace(TINY.unet, time_cond_proj_dim=GUIDANCE_DIM)
    assert torch.equal(ours.unet.time_embed.cond_proj.weight, load_file(str(lcm_file))[COND_KEY])
    plain = sd15.load(tiny_ckpt_file, device="cpu")      # the same file without the key: an ordinary UNet
    assert plain.unet.cfg.time_cond_proj_dim is None and plain.unet.time_embed.cond_proj is None


# ---- parity with LatentConsistencyModelPipeline --------------------------------------------------

CASES = {   # id: (prompts, batch_size, steps, seed)
    "1-step": (PROMPT, 1, 1, 11),
    "2-steps": (PROMPT, 1, 2, 12),
    "4-steps": (PROMPT, 1, 4, 13),
    "4-steps-batch2": (PROMPT, 2, 4, 14),
    "4-steps-2-prompts": ((PROMPT, "a red fox in the snow"), 1, 4, 15),
}


@pytest.mark.parametrize("case", CASES)
def test_generate_matches_latent_consistency_pipeline(ours, reference, case):
    prompts, batch, steps, seed = CASES[case]
    request = Request(prompts, sampler="lcm", steps=steps, guidance_scale=8, seed=seed, batch_size=batch, **SIZE)
    our_images, our_steps, calls = run_ours(ours, request)
    ref_images, ref_steps = run_reference(reference, list(request.prompts), seed, num_inference_steps=steps,
                                          guidance_scale=8.0, num_images_per_prompt=batch)

    images = request.num_images
    assert calls == [images] * steps            # one conditional pass of the batch per step: no CFG batch
    assert len(our_steps) == len(ref_steps) == steps
    errors = [rel_err(a, b) for a, b in zip(our_steps, ref_steps)]
    assert all(a.shape == b.shape == (images, 4, 8, 8) for a, b in zip(our_steps, ref_steps))
    assert max(errors) <= TOL, errors
    with torch.inference_mode():
        decoded = rel_err(ours.decode(our_steps[-1]), reference.vae.decode(ref_steps[-1] / LATENT_SCALE).sample)
    assert decoded <= TOL
    identical, max_diff, psnr = pixel_stats(our_images, ref_images)
    assert max_diff <= PIXEL_MAX_DIFF and identical >= PIXEL_IDENTICAL and psnr >= PIXEL_PSNR, \
        f"identical {identical:.5f}, max diff {max_diff}, PSNR {psnr:.1f} dB"
    assert float(np.asarray(our_images[0]).std()) > 5
    if images > 1:       # the batch is not one image repeated
        assert rel_err(our_steps[-1][0], our_steps[-1][1]) > 0.01
    print(f"{case}: latents {max(errors):.1e}, decoded {decoded:.1e}, identical {identical:.5f}, "
          f"max diff {max_diff}, PSNR {psnr:.1f} dB")


def test_text_states_are_diffusers(ours, reference):
    """The states the LCM UNet is conditioned on: ours (pipe.conditioning) vs diffusers' encode_prompt."""
    ref, _ = reference.encode_prompt(PROMPT, "cpu", 1, False)
    texts, _ = ours.conditioning([PROMPT], guidance_scale=8).at(0)
    assert rel_err(texts[0][0][1], ref[0]) <= TOL


def test_guidance_scale_is_the_embedding_input(ours, reference):
    """w reaches the UNet (other w, other image) and as diffusers feeds it (w − 1): checked at w = 1.5 too."""
    a = run_ours(ours, Request(PROMPT, sampler="lcm", steps=2, guidance_scale=8, seed=5, **SIZE))[1][-1]
    b = run_ours(ours, Request(PROMPT, sampler="lcm", steps=2, guidance_scale=1.5, seed=5, **SIZE))[1][-1]
    ref = run_reference(reference, PROMPT, 5, num_inference_steps=2, guidance_scale=1.5)[1][-1]
    assert rel_err(a, b) > 0.01
    assert rel_err(b, ref) <= TOL


# ---- what such a UNet cannot do ------------------------------------------------------------------

def lcm_request(**kwargs) -> Request:
    return Request(**({"prompt": PROMPT, "sampler": "lcm", "steps": 4, "guidance_scale": 8, "seed": 3} | SIZE
                      | kwargs))


def test_negative_prompt_warns_and_changes_nothing(ours, caplog):
    with caplog.at_level(logging.WARNING, logger="sd15"):
        plain = run_ours(ours, lcm_request())
    assert not [r for r in caplog.records if "negative" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sd15"):
        negative = run_ours(ours, lcm_request(negative_prompt="blurry, low quality"))
    warnings = [r for r in caplog.records if r.name == "sd15" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "negative prompt is not used" in warnings[0].getMessage()
    assert negative[2] == plain[2] == [1] * 4           # still one pass of one image per step
    assert all(torch.equal(a, b) for a, b in zip(plain[1], negative[1]))
    assert np.array_equal(np.asarray(plain[0][0]), np.asarray(negative[0][0]))


def test_negative_prompt_with_editing_is_only_unused(ours, caplog):
    """A negative prompt is never run, so its prompt editing must not refuse the generation either."""
    plain = run_ours(ours, lcm_request())[1]
    with caplog.at_level(logging.WARNING, logger="sd15"):
        edited = run_ours(ours, lcm_request(negative_prompt="[blurry:grainy:2]"))[1]
    assert any("negative prompt is not used" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(a, b) for a, b in zip(plain, edited))


@pytest.mark.parametrize("prompt", ["[a lighthouse:a red fox:2]", "[a lighthouse|a red fox]",
                                    "a lighthouse AND a red fox", "a lighthouse :1.5 AND a red fox :0.5"])
def test_prompt_editing_and_composition_are_refused(ours, prompt):
    calls = []
    hook = ours.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match="LCM-distilled UNet .*prompt editing, alternation and AND"):
            ours.generate(lcm_request(prompt=prompt))
    finally:
        hook.remove()
    assert calls == []                                   # refused before any UNet work
    # the same text as plain (literal) syntax is an ordinary prompt, and runs
    assert len(ours.generate(lcm_request(prompt=prompt, steps=1, prompt_syntax="plain"))) == 1


# ---- the infotext --------------------------------------------------------------------------------

def test_infotext_reads_back_to_the_same_request(ours):
    request = lcm_request(batch_size=2)
    images = ours.generate(request)
    text = images[1].info["parameters"]
    assert "Sampler: LCM" in text and "Steps: 4" in text and "CFG scale: 8" in text
    read = Request.from_infotext(text)
    assert read.request == request and read.batch_pos == 1
    assert not read.unsupported
    assert read.model.name == "lcm-tiny_v7" and read.model.hash == ours.model_hash
    again = ours.generate(read.request)                  # and regenerates the same pixels
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))
