"""Classifier-free guidance wrapper: the formula, one batched UNet call, the scale-1 shortcut, separate
calls for prompt and negative states of different lengths, and the guided sampler against
StableDiffusionPipeline's own CFG loop around a diffusers scheduler."""
import pytest
import torch

import sd15
from sd15.sampling import GeneratorNoise, ModelCall, denoise, guided, make_plan, resolve_sampler
from test_samplers import SHAPE, TOL, reference_scheduler, rel_err

B = SHAPE[0]
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2


class ToyUNet:
    """unet(x, t, context) -> ε that depends on all three; records what each call received."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context):
        self.calls.append((x.shape[0], t, context))
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32 and t.device == x.device
        c = context.mean(dim=(1, 2))[:, None, None, None]
        return 0.1 * x * (1 + c) + torch.sin(t / 100)[:, None, None, None] + c


def at(t: float) -> ModelCall:
    return ModelCall(sigma=1.0, t=t, step=0, steps=1)


def contexts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 77, 768, generator=g), torch.randn(B, 77, 768, generator=g)  # cond, uncond


@pytest.mark.parametrize("t", [981.0, 500.5])
@pytest.mark.parametrize("scale", [7.5, 0.0, 3.0])
def test_formula_one_batched_call(scale, t):
    cond, uncond = contexts()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    unet = ToyUNet()
    eps = guided(unet, cond, uncond, scale)(x, at(t))
    assert len(unet.calls) == 1
    batch, t_seen, context = unet.calls[0]
    assert batch == 2 * B and torch.equal(t_seen, torch.full((2 * B,), t))     # the call's t, one per row
    assert torch.equal(context[:B], uncond) and torch.equal(context[B:], cond)  # uncond first

    reference = ToyUNet()
    tt = torch.full((B,), t)
    eps_uncond, eps_cond = reference(x, tt, uncond), reference(x, tt, cond)
    assert torch.allclose(eps, eps_uncond + scale * (eps_cond - eps_uncond), rtol=1e-6, atol=1e-6)


def test_scale_one_is_one_conditional_call():
    cond, uncond = contexts()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    unet = ToyUNet()
    eps = guided(unet, cond, uncond, 1.0)(x, at(500.0))
    assert [(b, ctx is cond) for b, _, ctx in unet.calls] == [(B, True)]
    assert torch.equal(eps, ToyUNet()(x, torch.full((B,), 500.0), cond))


@pytest.mark.usefixtures("one_thread")
def test_prompt_and_negative_of_different_lengths(tiny_models):
    """A 154-token prompt against a 77-token negative: two UNet calls (A1111's default), equal to the
    batched call with the negative repeated whole to 154 tokens (attention over keys and values repeated
    k times is the same attention: exact in real arithmetic, so equal here up to float rounding)."""
    unet = tiny_models[1].unet
    g = torch.Generator().manual_seed(4)
    width = unet.cfg.context_dim
    cond, uncond = torch.randn(B, 154, width, generator=g), torch.randn(B, 77, width, generator=g)
    x = torch.randn(B, 4, 8, 8, generator=g)
    calls = []
    hook = unet.register_forward_pre_hook(lambda _, args: calls.append(args[2].shape[1]))
    try:
        with torch.inference_mode():
            eps = guided(unet, cond, uncond, 7.5)(x, at(600.0))
            repeated = guided(unet, cond, uncond.repeat(1, 2, 1), 7.5)(x, at(600.0))
            zero_padded = guided(unet, cond, torch.cat([uncond, torch.zeros_like(uncond)], 1), 7.5)(x, at(600.0))
            by_hand = [unet(x, 600.0, c) for c in (uncond, cond)]
    finally:
        hook.remove()
    assert calls[:2] == [154, 77] and calls[2] == 154                 # two calls, then one batched
    assert torch.equal(eps, by_hand[0] + 7.5 * (by_hand[1] - by_hand[0]))
    assert rel_err(eps, repeated) < 1e-5
    assert rel_err(eps, zero_padded) > 1e-3                           # padding differently is not the same


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_karras", "ddim"])
def test_guided_sampling_matches_pipeline_loop(name):
    """Our sampler over the guided model == StableDiffusionPipeline's loop (CFG done in the loop)."""
    cond, uncond = contexts(2)
    unet, scale, steps = ToyUNet(), 7.5, 12
    g = torch.Generator().manual_seed(0)
    ours = denoise(make_plan(resolve_sampler(name), steps), guided(unet, cond, uncond, scale),
                   torch.randn(SHAPE, generator=g), source=GeneratorNoise(g))

    g = torch.Generator().manual_seed(0)
    sched = reference_scheduler(name)
    sched.set_timesteps(steps)
    latents = torch.randn(SHAPE, generator=g) * sched.init_noise_sigma
    context = torch.cat([uncond, cond])
    for t in sched.timesteps:
        model_input = sched.scale_model_input(torch.cat([latents] * 2), t)
        eps_uncond, eps_text = unet(model_input, t.float().expand(2 * B), context).chunk(2)
        eps = eps_uncond + scale * (eps_text - eps_uncond)
        latents = sched.step(eps, t, latents, generator=g, return_dict=False)[0]
    assert rel_err(ours, latents) <= TOL


# ---- a half-precision UNet under a float32 sampler ---------------------------------------------------

@pytest.fixture(scope="module")
def bf16_unet(tiny_ckpt_file):
    """The real tiny UNet, loaded in bfloat16 as users load it."""
    unet = sd15.load(tiny_ckpt_file, device="cpu", dtype=torch.bfloat16).unet
    assert next(unet.parameters()).dtype == torch.bfloat16
    return unet


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("scale", [7.5, 1.0])
def test_bf16_unet_under_float32_sampler(bf16_unet, scale):
    """The UNet runs in the text states' dtype; the guidance arithmetic and the returned ε in x's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    cond, uncond = (torch.randn(B, 77, bf16_unet.cfg.context_dim, generator=g).bfloat16() for _ in range(2))
    seen = []
    hook = bf16_unet.register_forward_pre_hook(lambda _, args: seen.append([a.dtype for a in args]))
    try:
        with torch.inference_mode():
            eps = guided(bf16_unet, cond, uncond, scale)(x, at(981.0))
    finally:
        hook.remove()
    assert seen == [[torch.bfloat16, torch.float32, torch.bfloat16]]     # x, t, context: one call
    assert eps.dtype == torch.float32 and eps.shape == x.shape

    with torch.inference_mode():                                         # the same call by hand
        if scale == 1:
            expected = bf16_unet(x.bfloat16(), torch.full((B,), 981.0), cond).float()
            assert torch.equal(eps, expected)
            return
        raw = bf16_unet(torch.cat([x, x]).bfloat16(), torch.full((2 * B,), 981.0), torch.cat([uncond, cond]))
    eps_uncond, eps_cond = raw.float().chunk(2)
    assert torch.equal(eps, eps_uncond + scale * (eps_cond - eps_uncond))
    eps_uncond, eps_cond = raw.chunk(2)                                  # guidance done in bf16 instead
    assert not torch.equal(eps, (eps_uncond + scale * (eps_cond - eps_uncond)).float())
