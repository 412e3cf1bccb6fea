"""Samplers against diffusers' schedulers under the SD1.5 config (docs/architecture.md, "Parity").

The reference schedulers are built the way users build them: DDIMScheduler with SD1.5's
scheduler_config values, then `XScheduler.from_config(ddim.config)` for the others (that gives
Euler / Euler a / DPM++ timestep_spacing="linspace", see test_reference_configs). The reference
loop drives a scheduler by hand exactly as StableDiffusionPipeline / StableDiffusionImg2ImgPipeline
do: set_timesteps, init_noise_sigma or get_timesteps + set_begin_index + add_noise, then
scale_model_input -> model -> step(..., generator=g) per timestep.

Metric: relative error = max|ours - ref| / max|ref|, float32 tensors, batch 2.
"""
import math

import pytest
import torch
from diffusers import DDIMScheduler

from reference import SCHEDULERS, SD15_SCHEDULER, recording, reference_scheduler, rel_err, toy_eps
from sd15.sampling import SAMPLERS, GeneratorNoise, denoise, make_plan, noised, resolve_sampler, sample
from sd15.sampling.denoiser import Denoiser
from sd15.sampling.schedule import ScheduleConfig, alphas_cumprod

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2
SHAPE = (2, 4, 8, 8)
REFERENCE = SCHEDULERS
SD15 = SD15_SCHEDULER
VP = ("ddim", "ddpm")  # schedulers without a sigmas table of their own


def ours_model(model):
    """A toy (x, t) model with our sampler's model signature (x_in, call)."""
    return lambda x, call: model(x, call.t)


def reference_sigmas(name, sched):
    """diffusers' σ per timestep (+ final); DDIM/DDPM keep ᾱ instead, converted here."""
    if name not in VP:
        return sched.sigmas.double()
    abar = sched.alphas_cumprod.double()
    final = sched.final_alpha_cumprod if name == "ddim" else torch.tensor(1.0)
    abar = torch.cat([abar[sched.timesteps], final.double().reshape(1)])
    return ((1 - abar) / abar).sqrt()


def reference_loop(name, steps, model, noise, generator, x0=None, strength=1.0, eta=0.0):
    """StableDiffusion(Img2Img)Pipeline's scheduler use, step for step. Returns the latents after each step."""
    sched = reference_scheduler(name)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if x0 is None:
        latents = noise * sched.init_noise_sigma
    else:  # get_timesteps + prepare_latents
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        latents = sched.add_noise(x0, noise, timesteps[:1].repeat(noise.shape[0]))
    extra = {"generator": generator} | ({"eta": eta} if name == "ddim" else {})
    out = []
    for t in timesteps:
        eps = model(sched.scale_model_input(latents, t), t)
        latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
        out.append(latents)
    return out


def run_both(name, steps, strength=None, eta=0.0, seed=0):
    """Same seed, same draws, both sides; returns (ours, ref) step latents and model calls."""
    x0 = None if strength is None else torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    ours_log, ref_log, results = [], [], []
    for log in (ours_log, ref_log):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(SHAPE, generator=g)
        if log is ours_log:
            plan = make_plan(resolve_sampler(name), steps, strength=strength or 1.0, options=eta_option(eta))
            xs = list(sample(plan, recording(toy_eps, log), noise, x0=x0, source=GeneratorNoise(g)))
        else:
            xs = reference_loop(name, steps, recording(toy_eps, log), noise, g, x0, strength or 1.0, eta)
        results.append((xs, torch.randn(1, generator=g)))  # the generator's next draw: same consumption
    return results, ours_log, ref_log


def eta_option(eta):
    return {"eta": eta} if eta else {}


def check(results, ours_log, ref_log, tol=TOL):
    (ours, ours_next), (ref, ref_next) = results
    assert len(ours) == len(ref) == len(ours_log) == len(ref_log)
    for (x_ours, t_ours), (x_ref, t_ref) in zip(ours_log, ref_log):
        assert t_ours == pytest.approx(t_ref, abs=2e-3)  # the UNet sees the same t ...
        assert rel_err(x_ours, x_ref) <= tol  # ... and the same input
    for a, b in zip(ours, ref):
        assert rel_err(a, b) <= tol
    assert torch.equal(ours_next, ref_next)


# ---- schedules ----

def test_reference_configs():
    """What from_config(SD1.5 DDIM config) gives: the non-DDIM classes fall back to their own defaults."""
    assert reference_scheduler("ddim").config.timestep_spacing == "leading"
    assert reference_scheduler("ddpm").config.timestep_spacing == "leading"
    for name in ("euler", "euler_a", "dpmpp_2m_uniform"):
        cfg = reference_scheduler(name).config
        assert cfg.timestep_spacing == "linspace" and cfg.steps_offset == 1
    dpm = reference_scheduler("dpmpp_2m_uniform").config
    assert (dpm.algorithm_type, dpm.solver_order, dpm.lower_order_final, dpm.final_sigmas_type,
            dpm.euler_at_final) == ("dpmsolver++", 2, True, "zero", False)
    assert reference_scheduler("euler").config.final_sigmas_type == "zero"


def test_alphas_cumprod_match_diffusers():
    ours = alphas_cumprod(ScheduleConfig())
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert rel_err(ours, DDIMScheduler(**SD15).alphas_cumprod) < 1e-6


def test_ddim_50_steps():
    plan = make_plan(resolve_sampler("ddim"), 50)
    assert plan.timesteps.tolist() == list(range(981, 0, -20))


@pytest.mark.parametrize("steps", [1, 2, 10, 20, 25, 50])
@pytest.mark.parametrize("name", list(REFERENCE))
def test_timesteps_and_sigmas(name, steps):
    sched = reference_scheduler(name)
    sched.set_timesteps(steps)
    plan = make_plan(resolve_sampler(name), steps)
    if name in ("euler_karras", "euler_exponential"):  # fractional t from σ: diffusers interpolates in float32
        assert torch.allclose(plan.timesteps, sched.timesteps.double(), rtol=0, atol=1e-4)
    else:
        assert plan.timesteps.tolist() == sched.timesteps.double().tolist()
    assert torch.allclose(plan.sigmas, reference_sigmas(name, sched), rtol=1e-6, atol=0)
    assert plan.init_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "euler_a", "dpmpp_2m_uniform", "dpmpp_2m_exponential"])
def test_integer_grids_sweep(name):
    for steps in range(1, 121):
        sched = reference_scheduler(name)
        sched.set_timesteps(steps)
        assert make_plan(resolve_sampler(name), steps).timesteps.tolist() == sched.timesteps.double().tolist()


def test_dpmpp_karras_rounding_sweep():
    """Karras timesteps are rounded σ→t; with ᾱ accumulated in float32 as diffusers does, no t that lands
    near .5 rounds the other way (with a float64 table, steps 18, 35, 43, 52, ... would be off by one)."""
    for steps in range(1, 121):
        sched = reference_scheduler("dpmpp_2m_karras")
        sched.set_timesteps(steps)
        plan = make_plan(resolve_sampler("dpmpp_2m_karras"), steps)
        assert plan.timesteps.tolist() == sched.timesteps.double().tolist()
        assert torch.allclose(plan.sigmas, sched.sigmas.double(), rtol=1e-6, atol=0)


# ---- one step ----

@pytest.mark.parametrize("steps,start", [(10, 0), (10, 3), (10, 9), (20, 5)])
@pytest.mark.parametrize("name", list(REFERENCE))
def test_one_step(name, steps, start):
    """A plan that starts at step `start` (img2img) makes one step equal to scheduler.step there."""
    g = torch.Generator().manual_seed(start)
    x, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    plan = make_plan(resolve_sampler(name), steps, strength=(steps - start) / steps)
    noise = GeneratorNoise(torch.Generator().manual_seed(1))
    ours = next(plan.sampler.fn(Denoiser(lambda x_in, call: eps, plan), x, plan, noise, **plan.options))
    sched = reference_scheduler(name)
    sched.set_timesteps(steps)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    t = sched.timesteps[start]
    sched.scale_model_input(x, t)
    ref = sched.step(eps, t, x, generator=torch.Generator().manual_seed(1), return_dict=False)[0]
    assert rel_err(ours, ref) <= TOL


# ---- whole loops, toy model, same seed ----

CASES = [(name, 0.0) for name in REFERENCE] + [("ddim", 0.5), ("ddim", 1.0)]
IDS = [f"{n}-eta{e}" if e else n for n, e in CASES]


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
@pytest.mark.parametrize("name,eta", CASES, ids=IDS)
def test_txt2img_loop(name, eta, steps):
    check(*run_both(name, steps, eta=eta), tol=TOL)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("name,eta", CASES, ids=IDS)
def test_img2img_loop(name, eta, strength, steps):
    check(*run_both(name, steps, strength=strength, eta=eta))


def test_denoise_is_last_step():
    plan = make_plan(resolve_sampler("dpmpp_2m_karras"), 8)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    assert torch.equal(denoise(plan, ours_model(toy_eps), noise), list(sample(plan, ours_model(toy_eps), noise))[-1])


# ---- half-precision models: float32 state, per-step noise drawn in the model's dtype ----

# Five 520x520 latents (84,500 values): more than 65,536 and not a multiple of 16. On CPU, randn in
# fp16/bf16 is not always float32 randn rounded (with torch 2.13 here: the last 16 values of a draw whose
# size is not a multiple of 16 differ), and diffusers' randn_tensor draws in the model's dtype.
HALF_SHAPE = (5, 4, 65, 65)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_euler_a_draws_step_noise_in_noise_dtype(dtype):
    """With ε = 0 from x = 0, an Euler a step adds exactly σ_up·(its draw): compare draws bit for bit."""
    from diffusers.utils.torch_utils import randn_tensor          # what diffusers' schedulers call
    plan = make_plan(resolve_sampler("euler_a"), 3)
    xs = list(sample(plan, lambda x, call: torch.zeros_like(x), torch.zeros(HALF_SHAPE),
                     source=GeneratorNoise(torch.Generator().manual_seed(0), dtype)))

    half_g, float_g = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    expected, sigmas = torch.zeros(HALF_SHAPE), plan.sigmas.tolist()
    for i, (x, s, s_next) in enumerate(zip(xs, sigmas, sigmas[1:])):
        s_up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)  # k-diffusion's get_ancestral_step
        half = randn_tensor(HALF_SHAPE, generator=half_g, dtype=dtype)
        rounded = torch.randn(HALF_SHAPE, generator=float_g).to(dtype)
        assert not torch.equal(half, rounded)                         # the two draws differ here ...
        if i < len(xs) - 1:                                           # (the last step has σ_up = 0)
            assert s_up > 0 and not torch.equal(x, expected + s_up * rounded.float())
        expected = expected + s_up * half.float()                     # ... and the sampler takes the half one
        assert x.dtype == torch.float32 and torch.equal(x, expected)


@pytest.mark.parametrize("name,eta", [("euler_a", 0.0), ("ddpm", 0.0), ("ddim", 1.0)],
                         ids=["euler_a", "ddpm", "ddim-eta1"])
def test_float32_state_with_fp16_noise_follows_diffusers_fp16_loop(name, eta):
    """A fp16 model under our float32 sampler vs diffusers' scheduler fed fp16 model outputs (its latents
    are fp16 between steps; it draws noise in fp16). Measured rel err <= 1.9e-3 with noise_dtype=float16,
    >= 0.093 when the noise is drawn in float32 (the draw differs in 16 values of each step's 84,500)."""
    half_eps = lambda x, t: toy_eps(x.half(), t).half()               # noqa: E731
    plan = make_plan(resolve_sampler(name), 3, options=eta_option(eta))
    results = {}
    for noise_dtype in (torch.float16, torch.float32):
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(HALF_SHAPE, generator=g, dtype=torch.float16).float()
        results[noise_dtype] = list(sample(plan, lambda x, call: half_eps(x, call.t).float(), noise,
                                           source=GeneratorNoise(g, noise_dtype)))
    g = torch.Generator().manual_seed(0)
    ref = reference_loop(name, 3, half_eps, torch.randn(HALF_SHAPE, generator=g, dtype=torch.float16), g, eta=eta)
    assert ref[-1].dtype == torch.float16
    for got, wrong_draws, expected in zip(results[torch.float16], results[torch.float32], ref):
        assert got.dtype == torch.float32
        assert rel_err(got, expected) <= 5e-3
        assert rel_err(wrong_draws, expected) > 0.05


# ---- names and errors ----

@pytest.mark.parametrize("alias,name", [
    ("ddim", "ddim"), ("DDIM", "ddim"), ("DDPM", "ddpm"), ("Euler", "euler"), ("euler", "euler"),
    ("Euler a", "euler_a"), ("euler_a", "euler_a"), ("EULER A", "euler_a"), ("k_euler_a", "euler_a"),
    ("euler_ancestral", "euler_a"), ("euler_karras", "euler_karras"), ("Euler Karras", "euler_karras"),
    ("DPM++ 2M", "dpmpp_2m_karras"), ("dpmpp_2m", "dpmpp_2m_karras"), ("dpm++ 2m", "dpmpp_2m_karras"),
    ("k_dpmpp_2m", "dpmpp_2m_karras"), ("DPM++ 2M Uniform", "dpmpp_2m_uniform"), ("dpmpp_2m_uniform", "dpmpp_2m_uniform"),
    ("Euler a Karras", "euler_a_karras"), ("euler_exponential", "euler_exponential"),
    ("Euler SGM Uniform", "euler_sgm_uniform"), ("dpmpp_2m_align_your_steps", "dpmpp_2m_align_your_steps"),
    ("DPM++ 2M Karras", "dpmpp_2m_karras"), ("dpmpp_2m_karras", "dpmpp_2m_karras"),
    ("  dpm++  2M  karras ", "dpmpp_2m_karras"),
])
def test_resolve_aliases(alias, name):
    assert resolve_sampler(alias).full_name == name


def test_resolve_split_schedule_type_and_labels():
    spec = resolve_sampler("DPM++ 2M", "Karras")
    assert (spec.full_name, spec.name, spec.label, spec.schedule_type) == ("dpmpp_2m_karras", "dpmpp_2m", "DPM++ 2M",
                                                                          "Karras")
    assert resolve_sampler("DPM++ 2M", "Automatic").schedule_type == "Karras"      # A1111 1.9+'s default for it
    assert resolve_sampler("DPM++ 2M", "Uniform").schedule_type == "Uniform"
    assert resolve_sampler("Euler", "Exponential").full_name == "euler_exponential"
    with pytest.raises(ValueError, match="already names the schedule type Karras"):
        resolve_sampler("DPM++ 2M Karras", "Exponential")
    with pytest.raises(ValueError, match="DDIM has no schedule type 'Karras'"):
        resolve_sampler("DDIM", "Karras")
    with pytest.raises(ValueError, match="unknown schedule type 'Polynomial'"):
        resolve_sampler("Euler", "Polynomial")
    assert resolve_sampler("Euler a", "Automatic").name == "euler_a"
    spec = resolve_sampler("euler_a")
    assert (spec.label, spec.schedule_type) == ("Euler a", "Automatic")


@pytest.mark.parametrize("bad", ["DDIM Karras", "Euler a Polynomial", "", "dpmpp_4m"])
def test_unknown_sampler_lists_valid_names(bad):
    with pytest.raises(ValueError) as err:
        resolve_sampler(bad)
    for name in SAMPLERS:
        assert name in str(err.value)


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.0, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        make_plan(resolve_sampler("euler"), steps)


def test_bad_strength_and_eta():
    spec = resolve_sampler("ddim")
    for strength in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="strength"):
            make_plan(spec, 10, strength=strength)
    with pytest.raises(ValueError, match="no step to run"):
        make_plan(spec, 3, strength=0.3)  # int(0.9) == 0 steps kept
    for sampler, eta in (("euler", 0.5), ("ddim", -0.1), ("ddim", 1.5), ("ddim", float("nan")), ("euler_a", 1.5)):
        with pytest.raises(ValueError, match="eta"):
            make_plan(resolve_sampler(sampler), 10, options={"eta": eta})
    assert dict(make_plan(resolve_sampler("euler"), 10, options={"eta": 0.0}).options) == {}   # 0: no effect
    assert dict(make_plan(resolve_sampler("euler_a"), 10, options={"eta": 0.0}).options)["eta"] == 0.0   # its own
    with pytest.raises(ValueError, match="has no option eta"):
        make_plan(resolve_sampler("euler"), 10, options={"eta": False})
    with pytest.raises(ValueError, match="init image"):
        sample(make_plan(spec, 10, strength=0.5), ours_model(toy_eps), torch.zeros(SHAPE))


def test_options_are_declared_per_sampler():
    """Options come from the table: DDIM declares eta (default 0), the others none; defaults fill in."""
    assert {name: [o.name for o in s.options] for name, s in SAMPLERS.items()} == {
        "ddim": ["eta"], "ddpm": [], "euler": [], "euler_a": ["eta", "s_noise"], "dpmpp_2m": [], "heun": [], "lms": [],
        "dpm_2": [], "dpm_2_a": ["eta", "s_noise"], "dpmpp_2s_a": ["eta", "s_noise"], "dpmpp_2m_sde": ["eta", "s_noise"],
        "dpmpp_2m_sde_heun": ["eta", "s_noise"], "dpmpp_3m_sde": ["eta", "s_noise"], "dpmpp_sde": ["eta", "s_noise"],
        "plms": [], "unipc": ["order"], "unipc_bh2": ["order"], "deis": ["order"], "lcm": [], "tcd": ["eta"]}
    assert dict(make_plan(resolve_sampler("ddim"), 10).options) == {"eta": 0.0}
    assert dict(make_plan(resolve_sampler("ddim"), 10, options={"eta": 1}).options) == {"eta": 1.0}


def test_stochastic_sampler_without_a_noise_source_says_so():
    plan = make_plan(resolve_sampler("euler_a"), 4)
    with pytest.raises(ValueError, match="noise source"):
        list(sample(plan, ours_model(toy_eps), torch.zeros(SHAPE)))


# ---- the state seam: diffusers' latent blending for inpainting masks, as an after_step function ----------

@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_karras", "ddim", "ddpm"])
def test_after_step_reproduces_diffusers_mask_blending(name):
    """StableDiffusionInpaintPipeline with a 4-channel UNet blends the state after every step: the
    original latents re-noised to the next timestep outside the mask (plain on the last step), the
    sampler's state inside. Written once as `after_step`, it matches diffusers for one-step, ancestral
    and multistep samplers; without it the result differs (the test can fail)."""
    steps = 8
    g = torch.Generator().manual_seed(5)
    image_latents = torch.randn(SHAPE, generator=g)
    mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=g) > 0.5).float()

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=g)
    plan = make_plan(resolve_sampler(name), steps)
    sigmas = plan.sigmas.tolist()

    def blend(x, i):
        outside = noised(plan, image_latents, noise, sigmas[i + 1]) if i < steps - 1 else image_latents
        return (1 - mask) * outside + mask * x

    ours = list(sample(plan, ours_model(toy_eps), noise, source=GeneratorNoise(g), after_step=blend))
    g = torch.Generator().manual_seed(0)
    plain = list(sample(plan, ours_model(toy_eps), torch.randn(SHAPE, generator=g), source=GeneratorNoise(g)))

    g = torch.Generator().manual_seed(0)
    sched = reference_scheduler(name)
    sched.set_timesteps(steps)
    latents = torch.randn(SHAPE, generator=g) * sched.init_noise_sigma
    ref_noise = latents / sched.init_noise_sigma
    ref = []
    for i, t in enumerate(sched.timesteps):
        eps = toy_eps(sched.scale_model_input(latents, t), t)
        latents = sched.step(eps, t, latents, generator=g, return_dict=False)[0]
        proper = image_latents
        if i < len(sched.timesteps) - 1:
            proper = sched.add_noise(image_latents, ref_noise, sched.timesteps[i + 1:i + 2])
        latents = (1 - mask) * proper + mask * latents
        ref.append(latents)
    for x, r in zip(ours, ref):
        assert rel_err(x, r) <= TOL
    assert rel_err(plain[-1], ref[-1]) > 0.01
