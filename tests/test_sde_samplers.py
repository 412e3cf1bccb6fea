"""The SDE samplers (sd15/sampling/sde_samplers.py) and Brownian-tree noise (sd15/sampling/brownian.py).

DPM++ 2M SDE and 2M SDE Heun are covered against DPMSolverMultistepScheduler(sde-dpmsolver++) by the generic
tests of test_samplers.py (tools/reference.py SCHEDULERS); their noise options and their ODE limit are here.
DPM++ SDE is against DPMSolverSDEScheduler(noise_sampler_seed=seed) here: its timesteps come in pairs (two
model calls per step), so the generic loop does not fit. DPM++ 3M SDE has no diffusers counterpart: its
tests are the convergence of its ODE limit on a problem with a known solution, its agreement with 2M SDE Heun
where the two formulas coincide, and its noise arithmetic.

Metric as in test_samplers.py: max|ours − ref| / max|ref|, float32 latents of shape (2, 4, 8, 8).
"""
import dataclasses
import math
import sys

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverSDEScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

import sd15.sampling.sde_samplers as sde
from reference import SD15_SCHEDULER, recording, rel_err, toy_eps
from sd15.sampling import GeneratorNoise, ScheduleConfig, make_plan, resolve_sampler, sample
from sd15.sampling.brownian import brownian_noise
from sd15.sampling.denoiser import Denoiser
from sd15.sampling.plan import NoNoise, Plan, _drive
from sd15.sampling.registry import SAMPLERS
from sd15.sampling.schedule_types import SCHEDULE_TYPES

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TOL = 1e-5
SHAPE = (2, 4, 8, 8)
SDE = ("dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "dpmpp_sde")
DIFFUSERS_SDE_CONFIG = {"uniform": {}, "karras": {"use_karras_sigmas": True},
                        "exponential": {"use_exponential_sigmas": True}}


# ---- DPM++ SDE against DPMSolverSDEScheduler --------------------------------------------------------------

def sde_scheduler(schedule: str, seed: int) -> DPMSolverSDEScheduler:
    """As a pipeline user builds it: from the SD1.5 config, noise_sampler_seed = the generation's seed."""
    return DPMSolverSDEScheduler.from_config(DDIMScheduler(**SD15_SCHEDULER).config, noise_sampler_seed=seed,
                                             **DIFFUSERS_SDE_CONFIG[schedule])


def sde_reference_loop(schedule, steps, model, noise, seed, x0=None, strength=1.0):
    """StableDiffusion(Img2Img)Pipeline's use of DPMSolverSDEScheduler (order 2: its timesteps are
    [t0, mid0, t1, mid1, ..., t_last]). Returns the latents after each whole step."""
    sched = sde_scheduler(schedule, seed)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if x0 is None:
        latents = noise * sched.init_noise_sigma
    else:
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        sched.set_begin_index(t_start * sched.order)
        latents = sched.add_noise(x0, noise, timesteps[:1].repeat(noise.shape[0]))
    out = []
    for t in timesteps:
        eps = model(sched.scale_model_input(latents, t), t)
        latents = sched.step(eps, t, latents, return_dict=False)[0]  # the pipeline passes no generator: it has none
        out.append(latents)
    return [out[j] for j in range(1, len(out) - 1, 2)] + out[-1:]   # the states after each second call, and the last


def run_dpmpp_sde(schedule, steps, strength=None, seed=7, ref_seed=None):
    x0 = None if strength is None else torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    logs, results = ([], []), []
    for side, log in zip(("ours", "ref"), logs):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(SHAPE, generator=g)
        if side == "ours":
            plan = make_plan(resolve_sampler("dpmpp_sde", schedule), steps, strength=strength or 1.0)
            xs = list(sample(plan, recording(toy_eps, log), noise, x0=x0, source=GeneratorNoise(g)))
        else:
            xs = sde_reference_loop(schedule, steps, recording(toy_eps, log), noise, seed if ref_seed is None else ref_seed,
                                    x0, strength or 1.0)
        results.append((xs, torch.randn(1, generator=g)))
    return results, logs


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 25])
@pytest.mark.parametrize("schedule", ["karras", "exponential", "uniform"])
def test_dpmpp_sde_grid_matches_diffusers_in_float32(schedule, steps):
    """Every σ level equals DPMSolverSDEScheduler's float32 level bit for bit (the Brownian tree needs it)."""
    sched = sde_scheduler(schedule, 0)
    sched.set_timesteps(steps)
    plan = make_plan(resolve_sampler("dpmpp_sde", schedule), steps)
    assert torch.equal(plan.sigmas.float(), torch.cat([sched.sigmas[0::2], sched.sigmas[-1:]]))
    assert torch.allclose(plan.timesteps, sched.timesteps[0::2].double(), rtol=0, atol=1e-4)
    assert plan.init_sigma == float(sched.init_noise_sigma)


def test_dpmpp_sde_grid_sweep():
    # The float64 σ table would give a different float32 level at most step counts (measured: all of 1..120).
    for schedule in ("karras", "uniform"):
        for steps in range(1, 61):
            sched = sde_scheduler(schedule, 0)
            sched.set_timesteps(steps)
            plan = make_plan(resolve_sampler("dpmpp_sde", schedule), steps)
            assert torch.equal(plan.sigmas.float(), torch.cat([sched.sigmas[0::2], sched.sigmas[-1:]])), steps


def check(results, logs, tol=TOL):
    (ours, ours_next), (ref, ref_next) = results
    ours_log, ref_log = logs
    assert len(ours) == len(ref) and len(ours_log) == len(ref_log)
    for (x_ours, t_ours), (x_ref, t_ref) in zip(ours_log, ref_log):
        assert t_ours == pytest.approx(t_ref, abs=2e-3)
        assert rel_err(x_ours, x_ref) <= tol
    worst = max(rel_err(a, b) for a, b in zip(ours, ref))
    assert worst <= tol
    assert torch.equal(ours_next, ref_next)   # the trees do not touch the pipeline generator, on both sides


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 25])
@pytest.mark.parametrize("schedule", ["karras", "exponential", "uniform"])
def test_dpmpp_sde_txt2img_loop(schedule, steps):
    check(*run_dpmpp_sde(schedule, steps))


@pytest.mark.parametrize("steps,strength", [(10, 0.3), (10, 0.75), (25, 0.5), (3, 0.7)])
@pytest.mark.parametrize("schedule", ["karras", "exponential", "uniform"])
def test_dpmpp_sde_img2img_loop(schedule, steps, strength):
    """img2img runs the tail, and both sides root the tree at the whole schedule's σ range."""
    check(*run_dpmpp_sde(schedule, steps, strength))


def test_dpmpp_sde_noise_is_the_seed_s_tree():
    """Another noise_sampler_seed on the reference: everything after the first step differs."""
    (ours, _), (ref, _) = run_dpmpp_sde("karras", 10, ref_seed=8)[0]
    assert rel_err(ours[-1], ref[-1]) > 0.01


def test_dpmpp_sde_needs_float32_query_times(monkeypatch):
    """The tree rounds times to 1e-6: query σ in float64 instead of as the references compute it, and the
    noise differs from diffusers' by ~2e-4 (measured 1.7e-4 .. 2.6e-4), far above TOL."""
    monkeypatch.setattr(sde, "_query_sigmas", lambda s, s_next: (s, math.sqrt(s * s_next), s_next))
    (ours, _), (ref, _) = run_dpmpp_sde("karras", 10)[0]
    assert max(rel_err(a, b) for a, b in zip(ours, ref)) > 1e-4


# ---- UNet calls ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps,strength", [(1, 1.0), (2, 1.0), (3, 1.0), (10, 1.0), (2, 0.5), (3, 0.5), (10, 0.5)])
@pytest.mark.parametrize("name", SDE)
def test_nfe_counts_real_calls(name, steps, strength):
    spec = resolve_sampler(name)
    plan = make_plan(spec, steps, strength=strength)
    calls = []
    x0 = None if strength == 1 else torch.zeros(SHAPE)
    list(sample(plan, recording(toy_eps, calls), torch.randn(SHAPE), x0=x0, source=GeneratorNoise.seeded(0)))
    assert len(calls) == spec.nfe(plan.num_steps)
    assert spec.nfe(steps) == (2 * steps - 1 if name == "dpmpp_sde" else steps)
    assert not spec.deterministic


# ---- noise: sources, arithmetic, the ODE limit -------------------------------------------------------------

@pytest.mark.parametrize("name", SDE)
def test_without_a_noise_source_says_so(name):
    plan = make_plan(resolve_sampler(name), 4)
    with pytest.raises(ValueError, match="noise source"):
        list(sample(plan, lambda x, call: toy_eps(x, call.t), torch.zeros(SHAPE)))


@pytest.mark.parametrize("options", [{"eta": 0.0}, {"s_noise": 0.0}], ids=["eta0", "s_noise0"])
@pytest.mark.parametrize("name", SDE)
def test_no_noise_no_draws(name, options):
    """eta = 0 (the ODE) or s_noise = 0 adds no noise: nothing is drawn, so no source is needed."""
    plan = make_plan(resolve_sampler(name), 6, options=options)
    xs = list(sample(plan, lambda x, call: toy_eps(x, call.t), torch.ones(SHAPE)))
    assert len(xs) == 6 and torch.isfinite(xs[-1]).all()


@pytest.mark.parametrize("schedule", ["karras", "exponential", "uniform"])
def test_2m_sde_eta0_is_dpmpp_2m(schedule):
    """k-diffusion's 2M SDE with eta = 0 is DPM++ 2M (its midpoint term is 2M's (1 + 1/2r)·D − 1/2r·D_prev),
    and DPM++ 2M is exact against diffusers (test_samplers.py)."""
    plan = make_plan(resolve_sampler("dpmpp_2m_sde", schedule), 10, options={"eta": 0.0})
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    model = Denoiser(lambda x_in, call: toy_eps(x_in, call.t), plan)
    ours = list(_drive(sde.sample_dpmpp_2m_sde(model, x, plan, NoNoise(), eta=0.0), 10, None))
    ode = list(_drive(SAMPLERS["dpmpp_2m"].fn(model, x, plan, NoNoise()), 10, None))
    assert max(rel_err(a, b) for a, b in zip(ours, ode)) <= 1e-6
    heun = list(_drive(sde.sample_dpmpp_2m_sde_heun(model, x, plan, NoNoise(), eta=0.0), 10, None))
    assert rel_err(heun[-1], ode[-1]) > 1e-4          # the Heun-type term is another method


def test_dpmpp_sde_eta0_is_dpmpp_2s():
    """DPM++ SDE with eta = 0 is DPM-Solver++(2S) with r = 1/2, i.e. k-diffusion's DPM++ 2S a with eta = 0."""
    plan = make_plan(resolve_sampler("dpmpp_sde", "karras"), 10, options={"eta": 0.0})
    x = 14.6 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    model = Denoiser(lambda x_in, call: toy_eps(x_in, call.t), plan)
    ours = list(_drive(sde.sample_dpmpp_sde(model, x, plan, NoNoise(), eta=0.0), 10, None))
    two_s = list(_drive(SAMPLERS["dpmpp_2s_a"].fn(model, x, plan, NoNoise(), eta=0.0), 10, None))
    assert max(rel_err(a, b) for a, b in zip(ours, two_s)) <= 1e-6


class FixedSeedTree:
    """A1111's policy for SDE noise: one Brownian tree per image (what its create_noise_sampler passes)."""

    def __init__(self, seeds):
        self.seeds = seeds

    def sde_noise(self, x, sigma_min, sigma_max, *, brownian):
        return brownian_noise(x, sigma_min, sigma_max, self.seeds)


def zero_x0_model(x_in, call):
    return x_in * math.sqrt(call.sigma**2 + 1) / call.sigma   # ε of the data point 0: D(x; σ) = 0


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.7)])
def test_2m_sde_noise_arithmetic(eta, s_noise):
    """With D = 0 a 2M SDE step is x_σ' = (σ'/σ)·e^{−ηh}·x_σ + σ'·sqrt(1 − e^{−2ηh})·s_noise·z (k-diffusion,
    in σ space), z the generator's next float32 draw; the sampler's VP state is x_σ/sqrt(1+σ²)."""
    plan = make_plan(resolve_sampler("dpmpp_2m_sde", "karras"), 5, options={"eta": eta, "s_noise": s_noise})
    sigmas = plan.sigmas.tolist()
    ours_g = torch.Generator().manual_seed(3)
    xs = list(sample(plan, zero_x0_model, torch.zeros(SHAPE), source=GeneratorNoise(ours_g, torch.float16)))
    g = torch.Generator().manual_seed(3)
    x_sigma = torch.zeros(SHAPE, dtype=torch.float64)
    for i, x in enumerate(xs[:-1]):
        s, s_next = sigmas[i], sigmas[i + 1]
        h = math.log(s / s_next)
        z = torch.randn(SHAPE, generator=g, dtype=torch.float32)    # float32 even with a float16 source
        std = s_next * math.sqrt(1 - math.exp(-2 * eta * h)) * s_noise
        x_sigma = s_next / s * math.exp(-eta * h) * x_sigma + std * z
        assert rel_err(x, x_sigma / math.sqrt(1 + s_next**2)) <= TOL   # float32 state: D is 0 to ~1e-7
    assert xs[-1].abs().max() < 1e-6                    # the last step returns D = 0 ...
    torch.randn(SHAPE, generator=g)                     # ... after one more draw, as diffusers draws there
    assert torch.equal(torch.randn(8, generator=ours_g), torch.randn(8, generator=g))


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.7)])
def test_3m_sde_noise_arithmetic(eta, s_noise):
    """With D = 0 a 3M SDE step is x' = e^{−(1+η)h}·x + σ'·sqrt(1 − e^{−2ηh})·s_noise·z (all its D terms
    vanish), z the Brownian increment over [σ', σ] normalised, from one tree per image."""
    plan = make_plan(resolve_sampler("dpmpp_3m_sde"), 6, options={"eta": eta, "s_noise": s_noise})
    sigmas = plan.sigmas.tolist()
    xs = list(sample(plan, zero_x0_model, torch.zeros(SHAPE), source=FixedSeedTree([5, 6])))
    tree = brownian_noise(torch.zeros(SHAPE), min(s for s in sigmas if s > 0), max(sigmas), [5, 6])
    x = torch.zeros(SHAPE, dtype=torch.float64)
    for i, got in enumerate(xs[:-1]):
        s, s_next = sigmas[i], sigmas[i + 1]
        h = math.log(s / s_next)
        x = math.exp(-(1 + eta) * h) * x + s_next * math.sqrt(1 - math.exp(-2 * eta * h)) * s_noise * tree(s, s_next)
        assert rel_err(got, x) <= TOL
    assert xs[-1].abs().max() < 1e-6


def test_dpmpp_sde_noise_keeps_the_marginal():
    """With D = 0 the data is the point 0, so x_σ ~ N(0, σ²) at every σ: each half step's ancestral split
    (σ_down² + σ_up² = σ_to²) must keep the variance. Over 16 seeds the std after each step is σ within 5%."""
    plan = make_plan(resolve_sampler("dpmpp_sde", "karras"), 6)
    sigmas = plan.sigmas.tolist()
    runs = torch.stack([torch.stack(list(sample(plan, zero_x0_model, torch.randn(SHAPE, generator=torch.Generator()
                                                .manual_seed(seed)), source=GeneratorNoise.seeded(seed))))
                        for seed in range(16)])
    for i in range(5):
        assert runs[:, i].std().item() == pytest.approx(sigmas[i + 1], rel=0.05)
    assert runs[:, -1].abs().max() < 1e-5    # the last (Euler) step lands on D = 0


# ---- the ODE limits on a problem with a known solution ------------------------------------------------------

MU, VAR = 0.3, 0.25   # data ~ N(MU, VAR): D(x; σ) = MU + VAR/(VAR + σ²)·(x − MU)


def gaussian_eps(x_in, call):
    s = call.sigma
    x = x_in * math.sqrt(s * s + 1)
    return (x - (MU + VAR / (VAR + s * s) * (x - MU))) / s


def flow(x, sigma_from, sigma_to):
    """The probability-flow ODE's exact solution for that data: x − MU scales as sqrt(VAR + σ²)."""
    return MU + (x - MU) * math.sqrt((VAR + sigma_to**2) / (VAR + sigma_from**2))


def ode_plan(name, sigmas):
    spec = resolve_sampler(name)
    sigmas = torch.tensor(sigmas, dtype=torch.float64)
    return Plan(spec, torch.zeros(len(sigmas) - 1, dtype=torch.float64), sigmas, float(sigmas[0]), 1.0,
                {"eta": 0.0, "s_noise": 1.0}, ScheduleConfig())


def ode_solve(name, sigmas, x=5.0, after_step=None):
    """Run a sampler with eta = 0 (float64, a one-element state) from x at σ_0; returns x_σ after each step."""
    plan = ode_plan(name, sigmas)
    scale = [math.sqrt(s * s + 1) if plan.sampler.vp else 1.0 for s in sigmas]
    start = torch.full((1,), x / scale[0], dtype=torch.float64)
    steps = plan.sampler.fn(Denoiser(gaussian_eps, plan), start, plan, NoNoise(), eta=0.0, s_noise=1.0)
    return [v.item() * scale[i + 1] for i, v in enumerate(_drive(steps, plan.num_steps, after_step))]


def log_grid(n, high=14.6, low=0.03):
    return [math.exp(math.log(high) + k / n * (math.log(low) - math.log(high))) for k in range(n + 1)]


def global_errors(name, counts=(20, 40, 80, 160)):
    return [abs(ode_solve(name, log_grid(n))[-1] - flow(5.0, 14.6, 0.03)) for n in counts]


@pytest.mark.parametrize("name", SDE)
def test_ode_limit_converges_at_second_order(name):
    """Global error at σ = 0.03 from 14.6, log-uniform steps: halving h quarters it. Measured orders between
    successive step counts 20..160: 2M SDE 1.95-2.00, 2M SDE Heun 2.02-2.01, DPM++ SDE 1.96-1.99, 3M SDE
    2.26-2.03 (second order; see the 3M test below)."""
    errors = global_errors(name)
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(1.85 < p < 2.35 for p in orders), orders
    assert errors[-1] < 1e-4


def test_3m_sde_is_more_accurate_but_not_third_order():
    """k-diffusion's 3M: with exact history (the states after the first two steps set to the true solution,
    so its three x0 predictions lie on the trajectory) one step's error falls as h³, not h⁴ as a third-order
    method's would (measured orders 3.03, 3.05, 3.03 for h = 0.1 .. 0.0125 from σ = 2): its D2 term is half
    the Taylor-exact one. Still its global error is 2-3x smaller than 2M SDE's at equal steps (measured 2.2x at
    20 steps, 3.0x at 160)."""
    def local_error(h, s=2.0, x=2.0):
        sigmas = [s * math.exp(-k * h) for k in range(4)]
        exact = [flow(x, sigmas[0], sigma) for sigma in sigmas]
        states = ode_solve("dpmpp_3m_sde", sigmas, x, after_step=lambda state, i: (
            torch.full_like(state, exact[i + 1]) if i < 2 else state))
        return abs(states[-1] - exact[-1])
    errors = [local_error(h) for h in (0.1, 0.05, 0.025, 0.0125)]
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(2.8 < p < 3.3 for p in orders), orders
    three, two = global_errors("dpmpp_3m_sde"), global_errors("dpmpp_2m_sde")
    assert all(a < b / 2 for a, b in zip(three, two)), (three, two)


def test_3m_sde_is_2m_sde_heun_until_its_third_step():
    """3M's first step is first order and its second uses one earlier prediction with φ₂ = Heun's term:
    the same update as 2M SDE Heun (any eta; compared at eta = 0 on the same σ levels). From the third step
    on the 3M term makes them differ."""
    sigmas = log_grid(6, 14.6, 0.1)
    three, heun = ode_solve("dpmpp_3m_sde", sigmas), ode_solve("dpmpp_2m_sde_heun", sigmas)
    assert three[:2] == pytest.approx(heun[:2], rel=1e-12)
    assert abs(three[2] - heun[2]) > 1e-6


# ---- grids, options, names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", list(SCHEDULE_TYPES))
def test_3m_sde_discards_the_penultimate_sigma(schedule):
    """A1111 runs DPM++ 3M SDE on the schedule of steps + 1 with the last σ above 0 dropped."""
    spec = resolve_sampler("dpmpp_3m_sde", schedule)
    t_full, full = dataclasses.replace(spec, discard_penultimate_sigma=False).make_grid(9, ScheduleConfig())
    plan = make_plan(spec, 8)
    assert plan.num_steps == 8 and spec.nfe(8) == 8 and len(full) == 10
    assert torch.equal(plan.sigmas, torch.cat([full[:-2], full[-1:]]))
    assert torch.equal(plan.timesteps, t_full[:-1])


def test_schedule_range_is_the_whole_schedule():
    """img2img: the Brownian range is the full schedule's, for VP and σ-space plans alike."""
    for name in SDE:
        for schedule in ("karras", "exponential", "uniform"):
            full = make_plan(resolve_sampler(name, schedule), 20).sigmas
            expected = (float(full[full > 0].min()), float(full.max()))
            for strength in (1.0, 0.75, 0.3, 0.06):
                plan = make_plan(resolve_sampler(name, schedule), 20, strength=strength)
                assert sde.schedule_range(plan) == expected, (name, schedule, strength)
                assert plan.sigmas[0] < expected[1] or strength == 1.0
            hires = make_plan(resolve_sampler(name, schedule), 20, run=7)    # A1111's hires pass: the last 7
            assert sde.schedule_range(hires) == expected, (name, schedule, "hires")


def test_options_names_and_defaults():
    for name in SDE:
        spec = SAMPLERS[name]
        assert [(o.name, o.default, o.infotext) for o in spec.options] == [("eta", 1.0, "Eta"),
                                                                         ("s_noise", 1.0, "Sigma noise")]
        assert dict(make_plan(spec, 10).options) == {"eta": 1.0, "s_noise": 1.0}
        assert dict(make_plan(spec, 10, options={"eta": 0}).options)["eta"] == 0.0   # taken literally
        with pytest.raises(ValueError, match="eta"):
            make_plan(spec, 10, options={"eta": 1.5})
    assert {name: SAMPLERS[name].default_schedule for name in SDE} == {
        "dpmpp_2m_sde": "exponential", "dpmpp_2m_sde_heun": "exponential", "dpmpp_3m_sde": "exponential",
        "dpmpp_sde": "karras"}


@pytest.mark.parametrize("alias,name", [
    ("DPM++ 2M SDE", "dpmpp_2m_sde_exponential"), ("DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras"),
    ("DPM++ 2M SDE Exponential", "dpmpp_2m_sde_exponential"), ("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun_exponential"),
    ("DPM++ 2M SDE Heun Karras", "dpmpp_2m_sde_heun_karras"), ("DPM++ 3M SDE", "dpmpp_3m_sde_exponential"),
    ("DPM++ 3M SDE Karras", "dpmpp_3m_sde_karras"), ("DPM++ SDE", "dpmpp_sde_karras"),
    ("DPM++ SDE Karras", "dpmpp_sde_karras"), ("k_dpmpp_sde", "dpmpp_sde_karras"),
    ("dpmpp_2m_sde_uniform", "dpmpp_2m_sde_uniform"),
])
def test_resolve_a1111_names(alias, name):
    assert resolve_sampler(alias).full_name == name


# ---- Brownian-tree noise -------------------------------------------------------------------------------------

def test_brownian_noise_is_k_diffusion_s_sampler():
    """Bit for bit the BrownianTreeNoiseSampler diffusers copies from k-diffusion, one int seed (one tree
    over the batch) or a list (one tree per image), in float32 and float16."""
    x = torch.zeros(SHAPE)
    queries = [(14.6, 7.1), (7.1, 2.2), (2.2, 0.4), (0.4, 0.0292), (5.0, 4.99)]
    for seed in (1234, [1234, 99]):
        for dtype in (torch.float32, torch.float16):
            ours = brownian_noise(x, 0.0292, 14.6, seed, dtype)
            ref = BrownianTreeNoiseSampler(x.to(dtype), 0.0292, 14.6, seed)
            for s, s_next in queries:
                got, expected = ours(s, s_next), ref(s, s_next)
                assert got.dtype == dtype and torch.equal(got, expected)


def test_brownian_noise_per_image_is_batch_independent():
    """A1111's reason for one tree per image (its issue #5210): image i's noise is that of a batch of one."""
    x = torch.zeros(SHAPE)
    batch = brownian_noise(x, 0.03, 14.6, [7, 8])(3.0, 1.0)
    for i, seed in enumerate((7, 8)):
        assert torch.equal(batch[i], brownian_noise(x[:1], 0.03, 14.6, [seed])(3.0, 1.0)[0])
        assert torch.equal(batch[i:i + 1], brownian_noise(x[:1], 0.03, 14.6, seed)(3.0, 1.0))   # int seed, batch 1
    assert not torch.equal(brownian_noise(x, 0.03, 14.6, 7)(3.0, 1.0)[1], batch[1])   # one tree: image 1 differs


def test_brownian_noise_is_one_brownian_motion():
    """Increments add up (W(σ0) − W(σ2) = (W(σ0) − W(σ1)) + (W(σ1) − W(σ2))), whatever the query order."""
    x = torch.zeros(SHAPE)
    first = brownian_noise(x, 0.03, 14.6, 3)
    whole, upper, lower = first(9.0, 1.0), first(9.0, 4.0), first(4.0, 1.0)
    assert torch.allclose(whole * math.sqrt(8.0), upper * math.sqrt(5.0) + lower * math.sqrt(3.0), atol=1e-5)
    second = brownian_noise(x, 0.03, 14.6, 3)
    assert torch.equal(second(4.0, 1.0), lower) and torch.equal(second(9.0, 1.0), whole)
    assert torch.equal(first(0.5, 0.0), torch.zeros(SHAPE))   # σ_next = 0: zeros, no query outside the tree
    with pytest.raises(ValueError, match="one seed per image"):
        brownian_noise(x, 0.03, 14.6, [1, 2, 3])


def test_brownian_noise_without_torchsde_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchsde", None)
    with pytest.raises(ImportError, match=r"pip install sd15\[sde\]"):
        brownian_noise(torch.zeros(SHAPE), 0.03, 14.6, 0)


def test_generator_noise_tree_is_seeded_with_the_generator_seed():
    """diffusers' policy: DPMSolverSDEScheduler(noise_sampler_seed=seed) with generator.manual_seed(seed);
    3M SDE (no diffusers counterpart) gets the same tree, which for one image is A1111's tree too."""
    x = torch.zeros(1, 4, 8, 8)
    tree = GeneratorNoise.seeded(42, torch.float16).sde_noise(x, 0.03, 14.6, brownian=True)
    assert torch.equal(tree(3.0, 1.0), BrownianTreeNoiseSampler(x.half(), 0.03, 14.6, 42)(3.0, 1.0))
    assert torch.equal(tree(3.0, 1.0).float(), brownian_noise(x, 0.03, 14.6, [42], torch.float16)(3.0, 1.0).float())
