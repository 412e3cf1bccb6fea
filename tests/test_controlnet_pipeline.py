"""ControlNet through the pipeline: `Request(control=(Control(...),))` against diffusers'
StableDiffusionControlNetPipeline, by seed, latents compared after every step.

Both sides from files on disk: our pipeline is `sd15.load` of the tiny checkpoint; the tiny ControlNets
(random original-layout tensors for the tiny UNet, `test_controlnet_model.random_controlnet_state`) are
written as .safetensors, loaded by `load_controlnet` on our side and by diffusers' own
`convert_controlnet_checkpoint` on the reference side (the text encoder, VAE and UNet as in
test_pipeline_parity). Cases: strength 1 and 0.5, start/end 0.2-0.8, guess mode, two ControlNets at once
(MultiControlNetModel), two samplers (Euler, DPM++ 2M Karras), 64x64, 10 steps, CFG 7.5.
Measured (torch 2.13, diffusers 0.42.1, one thread, 2026-12-01): latents per step max rel err 2.4e-6 ..
3.6e-6 over all cases (the control moved the final latents by 0.14 .. 0.80, relative). Bound 1e-5 per step.
`pytest -s` prints the figures.

Not compared with diffusers: samplers with several UNet calls per step (diffusers' Heun/DPM2 schedulers
count their doubled timesteps in control_guidance_start/end; we count sampler steps), the inpainting and
prompt-editing paths (checked here for what the ControlNet is given).
"""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer as ReferenceTokenizer

import sd15
from reference import pipeline_components, diffusers_steps, rel_err
from sd15.models.loading import load_controlnet
from sd15.pipeline.control import Control
from sd15.pipeline.request import Request
from test_controlnet_model import CFG, random_controlnet_state, reference_controlnet

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

TOL = 1e-5
PROMPT = "a lighthouse at dusk, oil painting"
NEGATIVE = "blurry, low quality"
SIZE = 64
STEPS = 10


@pytest.fixture(scope="module")
def ours(tiny_ckpt_file):
    return sd15.load(tiny_ckpt_file, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_models, reference_tokenizer_files):
    return pipeline_components(tiny_models[0], ReferenceTokenizer(*reference_tokenizer_files, model_max_length=77))


@pytest.fixture(scope="module")
def control_files(tmp_path_factory):
    """Two tiny ControlNet files (different random tensors), as users have them: pruned .safetensors."""
    folder = tmp_path_factory.mktemp("controlnets")
    paths = []
    for seed in (1, 2):
        path = folder / f"control_tiny_{seed}.safetensors"
        save_file(random_controlnet_state(CFG, seed=seed), str(path))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def nets(ours, control_files):
    """(ours, diffusers') per file, each side reading the file itself."""
    pairs = []
    for path in control_files:
        mine, _ = load_controlnet(path, unet=ours.unet.cfg, device="cpu", dtype=torch.float32)
        pairs.append((mine, reference_controlnet(load_file(str(path)), CFG)))
    return pairs


def control_image(seed: int) -> Image.Image:
    """A blocky random RGB image at the generation size (edges and flat areas, as control maps have)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((SIZE // 8, SIZE // 8, 1), dtype=np.uint8)))


def run_ours(pipe, sampler, seed, controls):
    steps = []
    pipe.generate(Request(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, sampler=sampler,
                          guidance_scale=7.5, seed=seed, control=tuple(controls)),
                  lambda i, n, x: steps.append(x.clone()))
    return steps


def run_reference(components, sampler, seed, controlnet, **kwargs):
    return diffusers_steps(StableDiffusionControlNetPipeline, components | {"controlnet": controlnet}, sampler, seed,
                           prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE,
                           num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent", **kwargs)[1]


def compare(ours_steps, ref_steps, plain_steps=None):
    assert len(ours_steps) == len(ref_steps) == STEPS
    errors = [rel_err(a, b) for a, b in zip(ours_steps, ref_steps)]
    print(f"\nlatents per step: max rel err {max(errors):.2e}", end="")
    if plain_steps is not None:          # the control changed the result: the comparison means something
        moved = rel_err(plain_steps[-1], ref_steps[-1])
        print(f"; control moved the final latents by {moved:.2e}", end="")
        assert moved > 1e-3
    assert max(errors) <= TOL, errors


@pytest.fixture(scope="module")
def plain(ours):
    return {s: run_ours(ours, s, 1234, ()) for s in ("euler", "dpmpp_2m_karras")}


CASES = {
    "strength-1": dict(strength=1.0),
    "strength-0.5": dict(strength=0.5),
    "start-end": dict(start=0.2, end=0.8),
    "guess-mode": dict(guess_mode=True),
}


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_karras"])
@pytest.mark.parametrize("case", list(CASES))
def test_one_controlnet(ours, reference, nets, plain, sampler, case):
    o = CASES[case]
    mine, theirs = nets[0]
    image = control_image(0)
    ours_steps = run_ours(ours, sampler, 1234, [Control(mine, image, **o)])
    ref_steps = run_reference(reference, sampler, 1234, theirs, image=image,
                              controlnet_conditioning_scale=o.get("strength", 1.0),
                              control_guidance_start=o.get("start", 0.0), control_guidance_end=o.get("end", 1.0),
                              guess_mode=o.get("guess_mode", False))
    compare(ours_steps, ref_steps, plain[sampler])


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_karras"])
def test_two_controlnets(ours, reference, nets, plain, sampler):
    (a, ref_a), (b, ref_b) = nets
    images = [control_image(0), control_image(1)]
    ours_steps = run_ours(ours, sampler, 77, [Control(a, images[0], strength=0.8),
                                              Control(b, images[1], strength=0.6, start=0.1, end=0.7)])
    ref_steps = run_reference(reference, sampler, 77, [ref_a, ref_b], image=images,
                              controlnet_conditioning_scale=[0.8, 0.6], control_guidance_start=[0.0, 0.1],
                              control_guidance_end=[1.0, 0.7])
    compare(ours_steps, ref_steps)
    single = run_ours(ours, sampler, 77, [Control(a, images[0], strength=0.8)])
    assert rel_err(single[-1], ours_steps[-1]) > 1e-3        # the second one counts


def test_tensor_image_equals_pil(ours, nets):
    mine, _ = nets[0]
    image = control_image(0)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    a = run_ours(ours, "euler", 5, [Control(mine, image)])
    b = run_ours(ours, "euler", 5, [Control(mine, tensor)])
    assert rel_err(a[-1], b[-1]) <= 1e-6


def test_control_is_checked(nets):
    mine, _ = nets[0]
    image = control_image(0)
    for bad in (dict(start=0.8, end=0.2), dict(strength=-1), dict(end=1.5)):
        with pytest.raises(ValueError):
            Control(mine, image, **bad)
    with pytest.raises(ValueError, match="ControlNet"):
        Control(torch.nn.Linear(1, 1), image)
    with pytest.raises(ValueError, match="list of Control"):
        Request("a", control=["nope"])
    assert Request("a", control=Control(mine, image)).control[0].strength == 1.0


# ---- other paths through `denoise` --------------------------------------------------------------------

def _spy(monkeypatch, net):
    seen = []
    forward = net.forward

    def spy(x, t, context, hint):
        seen.append((tuple(x.shape), tuple(context.shape), tuple(hint.shape)))
        return forward(x, t, context, hint)
    monkeypatch.setattr(net, "forward", spy)
    return seen


def test_inpainting_unet_gives_the_controlnet_the_latents_only(tiny_state_dict, tmp_path, control_files,
                                                               monkeypatch):
    from sd15.models.demo import PREFIX, tiny_metadata
    from tools.make_checkpoint import save
    key = PREFIX["unet"] + "input_blocks.0.0.weight"
    sd = dict(tiny_state_dict)
    sd[key] = torch.randn((sd[key].shape[0], 9, 3, 3), generator=torch.Generator().manual_seed(9)) / 9
    save(sd, tmp_path / "tiny-inpainting.safetensors", metadata=tiny_metadata())
    pipe = sd15.load(tmp_path / "tiny-inpainting.safetensors", device="cpu")
    assert pipe.unet.cfg.in_channels == 9
    net, _ = load_controlnet(control_files[0], unet=pipe.unet.cfg, device="cpu", dtype=torch.float32)
    seen = _spy(monkeypatch, net)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    steps = []
    pipe.generate(Request(PROMPT, init_image=control_image(3), inpaint=mask, steps=4, sampler="euler", seed=1,
                          control=(Control(net, control_image(0)),)), lambda i, n, x: steps.append(x))
    assert len(seen) == 4 and all(s == ((2, 4, 8, 8), (2, 77, 32), (2, 3, SIZE, SIZE)) for s in seen), seen
    assert torch.isfinite(steps[-1]).all()


def test_prompt_editing_path_runs_control_on_every_row(ours, nets, monkeypatch):
    """guided_by_step (prompt editing): the ControlNet sees each UNet call's rows; in guess mode the
    conditional ones only (guidance says which they are)."""
    mine, _ = nets[0]
    seen = _spy(monkeypatch, mine)
    request = dict(negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=4, sampler="euler", seed=3)
    steps = []
    ours.generate(Request("a [cat:dog:0.5]", control=(Control(mine, control_image(0), end=0.5),), **request),
                  lambda i, n, x: steps.append(x))
    assert len(steps) == 4 and len(seen) == 2          # steps 0 and 1 of 4 (end 0.5)
    assert all(s[0][0] == s[1][0] == s[2][0] for s in seen)
    seen.clear()
    ours.generate(Request("a [cat:dog:0.5]", control=(Control(mine, control_image(0), guess_mode=True),), **request))
    assert [s[0][0] for s in seen] == [1] * 4 and [s[1][0] for s in seen] == [1] * 4


def test_guess_mode_at_guidance_one_runs_on_all_rows(ours, nets, monkeypatch):
    mine, _ = nets[0]
    seen = _spy(monkeypatch, mine)
    ours.generate(Request(PROMPT, width=SIZE, height=SIZE, steps=2, sampler="euler", seed=3, guidance_scale=1,
                          control=(Control(mine, control_image(0), guess_mode=True),)))
    assert [s[0][0] for s in seen] == [1, 1]


def test_hires_second_pass_gets_the_image_at_its_size(ours, nets, monkeypatch):
    from sd15.pipeline.hires import Hires
    mine, _ = nets[0]
    seen = _spy(monkeypatch, mine)
    ours.generate(Request(PROMPT, width=SIZE, height=SIZE, steps=2, sampler="euler", seed=3,
                          hires=Hires(scale=1.5, upscaler="Latent", steps=2, denoising_strength=0.5),
                          control=(Control(mine, control_image(0)),)))
    assert [s[2][-1] for s in seen] == [SIZE, SIZE, 96, 96]
