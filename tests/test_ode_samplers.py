"""The σ-space ODE samplers (sd15/sampling/ode_samplers.py): Heun, LMS, DPM2, DPM2 a, DPM++ 2S a.

Heun, LMS, DPM2 and DPM2 a against diffusers' HeunDiscrete / LMSDiscrete / KDPM2Discrete /
KDPM2AncestralDiscrete schedulers, built as users build them (`from_config` of SD1.5's DDIM config),
for Uniform, Karras and Exponential, txt2img and img2img, driven as StableDiffusion(Img2Img)Pipeline
drives them. The generic loop of test_samplers.py does not fit these: the second-order schedulers
make two `step` calls per step (2N−1 timesteps) and LMS's `step` takes no generator. Our samplers
yield once per whole step; the reference loop keeps the scheduler's output after each whole step.

DPM++ 2S a has no diffusers counterpart: it is tested on a toy problem whose probability-flow ODE has a
closed form (second-order convergence with eta = 0), and its ancestral noise arithmetic exactly.

Metric: relative error = max|ours − ref| / max|ref|, float32, batch 2.
"""
import dataclasses
import inspect
import math

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler

from reference import SD15_SCHEDULER, recording, rel_err, toy_eps
from sd15.sampling import SAMPLERS, GeneratorNoise, make_plan, resolve_sampler, sample
from sd15.sampling.ode_samplers import lms_coefficients
from sd15.sampling.samplers import ancestral_step
from sd15.sampling.schedule import ScheduleConfig, sigma_table, timestep_at
from sd15.sampling.schedule_types import SCHEDULE_TYPES

TOL = 1e-5
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # diffusers + numpy 2
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")]
SHAPE = (2, 4, 8, 8)
CFG = ScheduleConfig()

DIFFUSERS = {"heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler", "dpm_2": "KDPM2DiscreteScheduler",
             "dpm_2_a": "KDPM2AncestralDiscreteScheduler"}
SCHEDULES = {"uniform": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
ODE = ["heun", "lms", "dpm_2", "dpm_2_a", "dpmpp_2s_a"]


def reference_scheduler(name, schedule):
    config = DDIMScheduler(**SD15_SCHEDULER).config
    return getattr(diffusers, DIFFUSERS[name]).from_config(config, **SCHEDULES[schedule])


def diffusers_spec(name, schedule):
    """Our sampler on the grid diffusers builds: A1111's discard of the penultimate σ off (tested apart)."""
    return dataclasses.replace(resolve_sampler(name).with_schedule(schedule), discard_penultimate_sigma=False)


def reference_loop(name, schedule, steps, model, noise, generator, x0=None, strength=1.0):
    """StableDiffusion(Img2Img)Pipeline's use of the scheduler; the latents after each whole step.

    LMS img2img: `step(order=min(k+1, 4))` at the k-th step of the run, the order k-diffusion (A1111) uses;
    the pipeline's default call asks for the order of the step's place in the whole schedule (see
    test_lms_img2img_default_order_is_inconsistent)."""
    sched = reference_scheduler(name, schedule)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if x0 is None:
        latents = noise * sched.init_noise_sigma
    else:  # get_timesteps + prepare_latents
        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        sched.set_begin_index(t_start * sched.order)
        latents = sched.add_noise(x0, noise, timesteps[:1].repeat(noise.shape[0]))
    takes = inspect.signature(sched.step).parameters
    out = []
    for k, t in enumerate(timesteps):
        eps = model(sched.scale_model_input(latents, t), t)
        extra = {"generator": generator} if "generator" in takes else {}
        if name == "lms" and x0 is not None:
            extra["order"] = min(len(out) + 1, 4)
        latents = sched.step(eps, t, latents, **extra, return_dict=False)[0]
        if getattr(sched, "state_in_first_order", True) or k == len(timesteps) - 1:  # a whole step done
            out.append(latents)
    return out


def run_both(name, schedule, steps, strength=None, seed=0):
    """Same seed, same draws, both sides; returns (ours, ref) step latents with the generator's next draw,
    and both model-call logs."""
    x0 = None if strength is None else torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    ours_log, ref_log, results = [], [], []
    for log in (ours_log, ref_log):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(SHAPE, generator=g)
        if log is ours_log:
            plan = make_plan(diffusers_spec(name, schedule), steps, strength=strength or 1.0)
            xs = list(sample(plan, recording(toy_eps, log), noise, x0=x0, source=GeneratorNoise(g)))
        else:
            xs = reference_loop(name, schedule, steps, recording(toy_eps, log), noise, g, x0, strength or 1.0)
        results.append((xs, torch.randn(1, generator=g)))  # the generator's next draw: same consumption
    return results, ours_log, ref_log


def check(results, ours_log, ref_log, tol=TOL, t_tol=2e-4):
    """Every model call sees the same t (to float32's resolution: measured <= 8.7e-5) and input, every step ends
    in the same state, the same draws. Returns the largest relative error seen."""
    (ours, ours_next), (ref, ref_next) = results
    assert len(ours) == len(ref) and len(ours_log) == len(ref_log)
    worst = 0.0
    for (x_ours, t_ours), (x_ref, t_ref) in zip(ours_log, ref_log):
        assert t_ours == pytest.approx(t_ref, abs=t_tol)
        worst = max(worst, rel_err(x_ours, x_ref))
    for a, b in zip(ours, ref):
        worst = max(worst, rel_err(a, b))
    assert worst <= tol
    assert torch.equal(ours_next, ref_next)
    return worst


# ---- the reference schedulers and their grids ----

@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_reference_configs(name):
    """from_config(SD1.5 DDIM) gives the classes' own linspace spacing; StableDiffusionPipeline passes LMS no
    order (its step takes neither eta nor generator), so LMS runs at its default order 4."""
    cfg = reference_scheduler(name, "uniform").config
    assert (cfg.timestep_spacing, cfg.prediction_type, cfg.beta_schedule) == ("linspace", "epsilon", "scaled_linear")
    if name == "lms":
        params = inspect.signature(reference_scheduler(name, "uniform").step).parameters
        assert params["order"].default == 4 and "generator" not in params and "eta" not in params
        pipe = diffusers.StableDiffusionPipeline.__new__(diffusers.StableDiffusionPipeline)
        pipe.scheduler = reference_scheduler(name, "uniform")
        assert pipe.prepare_extra_step_kwargs(torch.Generator(), 0.0) == {}


def main_points(name, sched):
    """diffusers' per-step (t, σ) without the second-order substeps: ours are one grid point per step."""
    t, sigmas = sched.timesteps.double(), sched.sigmas.double()
    if name == "lms":
        return t, sigmas
    if name == "heun":  # t: [t0, t1, t1, t2, t2, ...], σ: [σ0, σ1, σ1, ..., σ_N-1, σ_N-1, 0]
        return torch.cat([t[:1], t[1::2]]), torch.cat([sigmas[:1], sigmas[1::2]])
    # KDPM2: t: [t0, t_mid, t1, t_mid, t2, ...], σ: [σ0, σ1, σ1, ..., σ_N-1, σ_N-1, 0, 0, 0]
    return t[0::2], torch.cat([sigmas[:1], sigmas[1:-1:2]])


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 25, 50])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_grids_match_diffusers(name, schedule, steps):
    sched = reference_scheduler(name, schedule)
    sched.set_timesteps(steps)
    plan = make_plan(diffusers_spec(name, schedule), steps)
    t, sigmas = main_points(name, sched)
    assert len(t) == steps and len(sigmas) == steps + 1
    assert torch.allclose(plan.timesteps, t, rtol=0, atol=1e-4)
    if name in ("dpm_2", "dpm_2_a") and schedule == "karras":
        assert plan.timesteps.tolist() == t.tolist() and all(v == round(v) for v in t.tolist())  # rounded
    assert torch.allclose(plan.sigmas, sigmas, rtol=1e-6, atol=0)
    assert plan.init_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)


# ---- whole loops against diffusers, toy model, same seed ----

# Two steps jump from σ_max = 14.6 to σ_min = 0.029 (every schedule type), where diffusers' float32 arithmetic
# is itself off by more than 1e-5: measured 2.9e-5 (Heun) and 7.6e-5 (DPM2 a); every other case <= 7.3e-6.
# test_two_step_differences_are_the_references_float32_rounding shows where each comes from. DPM2 a's midpoint
# σ is then exactly σ_min, t = 0, where diffusers' float32 σ_down puts it at t = 0.0096; at 3 steps the same
# rounding moves its midpoint t by up to 6e-4. (name, steps) -> (tolerance, tolerance on t)
REFERENCE_ROUNDING = {("heun", 2): (5e-5, 2e-4), ("dpm_2_a", 2): (1.5e-4, 2e-2), ("dpm_2_a", 3): (TOL, 2e-3)}


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 25])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_txt2img_loop(name, schedule, steps):
    tol, t_tol = REFERENCE_ROUNDING.get((name, steps), (TOL, 2e-4))
    check(*run_both(name, schedule, steps), tol=tol, t_tol=t_tol)


def test_two_step_differences_are_the_references_float32_rounding():
    """Heun: diffusers' corrector recovers ε as (x − (x − σ·ε))/σ in float32 at σ = 0.029; run in float64 it
    agrees with our float32 run to 1e-6, and its own float32 run is 2.8e-5 away from that.
    DPM2 a: diffusers builds σ_down = sqrt(σ_next² − σ_up²) in float32, which cancels when σ_next << σ; the exact
    value is σ_next²/σ (eta = 1), which our float64 arithmetic reproduces and diffusers' table misses by > 1e-3."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=g)
    plan = make_plan(diffusers_spec("heun", "uniform"), 2)
    ours = list(sample(plan, lambda x, call: toy_eps(x, call.t), noise))
    ref32 = reference_loop("heun", "uniform", 2, toy_eps, noise, None)
    ref64 = reference_loop("heun", "uniform", 2, toy_eps, noise.double(), None)
    assert rel_err(ours[-1], ref64[-1]) <= 1e-6
    assert rel_err(ref32[-1], ref64[-1]) > 1e-5

    sched = reference_scheduler("dpm_2_a", "uniform")
    sched.set_timesteps(2)
    s, s_next = sched.sigmas[0].item(), sched.sigmas[1].item()
    exact = s_next**2 / s
    assert abs(ancestral_step(s, s_next, 1.0)[0] / exact - 1) <= 1e-9
    assert abs(sched.sigmas_down[0].item() / exact - 1) > 1e-3   # the first step's (index 0)


@pytest.mark.parametrize("steps,strength", [(10, 0.3), (10, 0.75), (25, 0.5), (25, 0.9), (3, 0.7)])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_img2img_loop(name, schedule, steps, strength):
    check(*run_both(name, schedule, steps, strength=strength))


def test_dpm2_ancestral_draws_once_per_step_not_ending_at_zero():
    """N steps, N−1 draws, as diffusers: the generator's next draw after a run is the N-th one."""
    plan = make_plan(diffusers_spec("dpm_2_a", "uniform"), 6)
    g = torch.Generator().manual_seed(0)
    list(sample(plan, lambda x, call: toy_eps(x, call.t), torch.randn(SHAPE, generator=g), source=GeneratorNoise(g)))
    expected = torch.Generator().manual_seed(0)
    for _ in range(1 + 5):
        torch.randn(SHAPE, generator=expected)
    assert torch.equal(torch.randn(1, generator=g), torch.randn(1, generator=expected))


# ---- LMS: exact coefficients, its order, and diffusers' img2img ----

def test_lms_coefficients_are_exact_integrals():
    """Against scipy's adaptive quadrature at tight tolerance (an independent reference, float64), and against
    diffusers' get_lms_coefficient (quad with epsrel 1e-4, exact for a cubic, but its integrand multiplies
    float32 0-d tensors: agreement to float32 precision)."""
    from scipy import integrate

    def basis_integral(nodes, j, a, b):
        def basis(tau):
            return math.prod((tau - nodes[k]) / (nodes[j] - nodes[k]) for k in range(len(nodes)) if k != j)
        return integrate.quad(basis, a, b, epsabs=1e-14, epsrel=1e-13)[0]

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        sigmas = (torch.rand(8, generator=g, dtype=torch.float64) * 14 + 0.02).sort(descending=True).values.tolist()
        sigmas.append(0.0)
        for i in range(len(sigmas) - 1):
            for order in range(1, min(i + 1, 5) + 1):
                ours = lms_coefficients(sigmas, i, order)
                nodes = [sigmas[i - k] for k in range(order)]
                ref = [basis_integral(nodes, j, sigmas[i], sigmas[i + 1]) for j in range(order)]
                scale = max(1.0, max(abs(r) for r in ref))
                assert max(abs(a - b) for a, b in zip(ours, ref)) <= 1e-10 * scale
                assert abs(sum(ours) - (sigmas[i + 1] - sigmas[i])) <= 1e-11 * scale   # the basis sums to 1

    sched = reference_scheduler("lms", "karras")
    sched.set_timesteps(12)
    sigmas = sched.sigmas.double().tolist()
    for i in range(12):
        order = min(i + 1, 4)
        ours = lms_coefficients(sigmas, i, order)
        ref = [sched.get_lms_coefficient(order, i, j) for j in range(order)]
        assert max(abs(a - b) for a, b in zip(ours, ref)) <= 1e-6 * max(abs(r) for r in ref)


def test_lms_coefficients_reject_missing_history():
    with pytest.raises(ValueError, match="needs 3 previous points"):
        lms_coefficients([3.0, 2.0, 1.0, 0.0], 1, 3)


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4])
def test_lms_integrates_polynomials_of_its_order_exactly(degree):
    """With ε = p(σ) (no x), the step i of order min(i+1, 4) is exact for deg p <= min(i, 3): the update is
    the integral of the polynomial through the last ε's. A quartic is never exact (the order is 4)."""
    coeffs = [0.3, -0.7, 0.2, 0.05, 0.01][:degree + 1]

    def p(sigma):
        return sum(c * sigma**k for k, c in enumerate(coeffs))

    def integral(a, b):
        return sum(c * (b ** (k + 1) - a ** (k + 1)) / (k + 1) for k, c in enumerate(coeffs))

    plan = make_plan(resolve_sampler("lms_karras"), 10)
    x = torch.zeros(SHAPE, dtype=torch.float64)
    xs = [x] + list(sample(plan, lambda x_in, call: torch.full_like(x_in, p(call.sigma)), x))
    sigmas = plan.sigmas.tolist()
    for i in range(10):
        step = (xs[i + 1] - xs[i]).mean().item()
        exact = integral(sigmas[i], sigmas[i + 1])
        if degree <= min(i, 3):
            assert step == pytest.approx(exact, rel=1e-9, abs=1e-12)
        else:
            assert abs(step - exact) > 1e-6 * abs(exact)


def test_lms_img2img_default_order_is_inconsistent():
    """diffusers' img2img LMS with the pipeline's default order: the first step of a run that starts at step k
    uses one coefficient of an order-min(k+1, 4) rule. With a constant ε the ODE's solution is a straight line,
    which every consistent method (ours, k-diffusion's) follows exactly; diffusers' default call does not."""
    c = 0.37
    steps, strength = 10, 0.5
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    plan = make_plan(resolve_sampler("lms"), steps, strength=strength)
    start = x0 + plan.sigmas[0].item() * noise
    ours = list(sample(plan, lambda x, call: torch.full_like(x, c), noise, x0=x0))
    exact = [start + (s - plan.sigmas[0].item()) * c for s in plan.sigmas[1:].tolist()]
    for a, b in zip(ours, exact):
        assert rel_err(a, b) <= 1e-6

    sched = reference_scheduler("lms", "uniform")
    sched.set_timesteps(steps)
    t_start = steps - int(steps * strength)
    sched.set_begin_index(t_start)
    latents = sched.add_noise(x0, noise, sched.timesteps[t_start:t_start + 1].repeat(2))
    assert rel_err(latents, start) <= 1e-6
    ref = []
    for t in sched.timesteps[t_start:]:
        sched.scale_model_input(latents, t)
        latents = sched.step(torch.full_like(latents, c), t, latents, return_dict=False)[0]
        ref.append(latents)
    assert rel_err(ref[0], exact[0]) > 1e-3          # the first step of the run is off ...
    assert rel_err(ref[-1], exact[-1]) > 1e-3


# ---- convergence on a problem with a closed-form solution ----

MU, S = 0.3, 0.7   # data ~ N(MU, S²) per element: D(x; σ) = MU + S²/(S²+σ²)·(x − MU)


def gaussian_eps(x_in, call):
    """The exact ε of Gaussian data: ε = (x − D)/σ = σ(x − MU)/(S² + σ²), with x = x_in·sqrt(σ² + 1)."""
    s = call.sigma
    x = x_in * math.sqrt(s * s + 1)
    return s * (x - MU) / (S * S + s * s)


def gaussian_flow(x, sigma_from, sigma_to):
    """The probability-flow ODE dx/dσ = ε solved: x − MU scales as sqrt(S² + σ²)."""
    return MU + (x - MU) * math.sqrt((S * S + sigma_to**2) / (S * S + sigma_from**2))


def log_grid(sigma_max, sigma_min):
    """A grid uniform in log σ from sigma_max to sigma_min, then σ = 0."""
    def grid(steps, cfg):
        sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()
        return timestep_at(sigmas, cfg), torch.cat([sigmas, sigmas.new_zeros(1)])
    return grid


def error_at_sigma_min(name, steps, options=None):
    """|x − exact| at σ_min = 0.5 (the state before the final step to 0), float64, from σ_max = 10."""
    spec = dataclasses.replace(resolve_sampler(name).with_schedule("uniform"), grid=log_grid(10.0, 0.5),
                               grids_for={}, discard_penultimate_sigma=False)
    plan = make_plan(spec, steps + 1, options=options)   # steps + 1 levels: `steps` steps down to 0.5, one to 0
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xs = list(sample(plan, gaussian_eps, noise))
    assert plan.sigmas[-2].item() == pytest.approx(0.5)
    return (xs[-2] - gaussian_flow(noise * 10.0, 10.0, 0.5)).abs().max().item()


@pytest.mark.parametrize("name,options,order", [
    ("euler", None, 1), ("heun", None, 2), ("dpm_2", None, 2), ("dpm_2_a", {"eta": 0.0}, 2),
    ("dpmpp_2s_a", {"eta": 0.0}, 2),
])
def test_order_of_convergence(name, options, order):
    """Doubling the steps divides the error by 2^order (Euler: 1, the second-order samplers: 2)."""
    errors = [error_at_sigma_min(name, n, options) for n in (8, 16, 32, 64)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(r - order) < 0.25 for r in rates[1:]), rates
    assert errors[-1] < (3e-2 if order == 1 else 1e-3)


def test_second_order_samplers_beat_euler_and_lms_beats_them():
    """At 32 steps on the Gaussian problem: the order-4 multistep LMS < the second-order samplers < Euler."""
    euler = error_at_sigma_min("euler", 32)
    lms = error_at_sigma_min("lms", 32)
    for name, options in (("heun", None), ("dpm_2", None), ("dpmpp_2s_a", {"eta": 0.0})):
        err = error_at_sigma_min(name, 32, options)
        assert lms < err / 2 and err < euler / 10


# ---- ancestral samplers: eta, s_noise, the noise arithmetic ----

def test_ancestral_step_formula():
    """σ_up = min(σ_next, eta·σ_next·sqrt(1 − σ_next²/σ²)), σ_down² + σ_up² = σ_next² (k-diffusion)."""
    for s, s_next in ((14.6, 9.7), (1.0, 0.3), (0.2, 0.0)):
        for eta in (0.0, 0.3, 1.0):
            down, up = ancestral_step(s, s_next, eta)
            assert up == pytest.approx(min(s_next, eta * s_next * math.sqrt(1 - (s_next / s) ** 2)), abs=1e-15)
            assert down**2 + up**2 == pytest.approx(s_next**2, abs=1e-12)
    assert ancestral_step(2.0, 1.0, 0.0) == (1.0, 0.0)


@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.7), (0.3, 1.1)])
@pytest.mark.parametrize("name", ["dpm_2_a", "dpmpp_2s_a"])
def test_ancestral_noise_arithmetic(name, eta, s_noise):
    """With the exact denoiser of a point mass x0 (ε = (x − x0)/σ) both second-order steps land exactly on
    x0 + (σ_down/σ)(x − x0); the step then adds s_noise·σ_up·z, z the source's next draw, on every step but the
    last, which ends at x0. Replayed here from a second generator with the same seed."""
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))

    def point_mass(x_in, call):
        return (x_in * math.sqrt(call.sigma**2 + 1) - x0) / call.sigma

    plan = make_plan(resolve_sampler(name), 7, options={"eta": eta, "s_noise": s_noise})
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=g)
    xs = list(sample(plan, point_mass, noise, source=GeneratorNoise(g)))

    replay = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=replay) * plan.init_sigma
    sigmas = plan.sigmas.tolist()
    for got, s, s_next in zip(xs, sigmas, sigmas[1:]):
        up = min(s_next, eta * s_next * math.sqrt(1 - (s_next / s) ** 2))
        down = math.sqrt(s_next**2 - up**2)
        x = x0 + (down / s) * (x - x0)
        if s_next > 0:
            x = x + s_noise * up * torch.randn(SHAPE, generator=replay)
        assert rel_err(got, x) <= 1e-5
    assert rel_err(xs[-1], x0) <= 1e-5
    assert torch.equal(torch.randn(1, generator=g), torch.randn(1, generator=replay))  # 6 draws for 7 steps


def test_eta_zero_is_the_deterministic_sibling():
    """DPM2 a at eta 0 is DPM2 (σ_down = σ_next), bit for bit, and draws nothing: no noise source needed;
    DPM++ 2S a at eta 0 (or s_noise 0) draws nothing either."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    model = lambda x, call: toy_eps(x, call.t)          # noqa: E731
    for schedule in ("karras", "uniform", "align_your_steps"):
        deterministic = list(sample(make_plan(resolve_sampler("dpm_2").with_schedule(schedule), 9), model, noise))
        plan = make_plan(resolve_sampler("dpm_2_a").with_schedule(schedule), 9, options={"eta": 0.0})
        for a, b in zip(list(sample(plan, model, noise)), deterministic):
            assert torch.equal(a, b)
    for options in ({"eta": 0.0}, {"s_noise": 0.0}):
        list(sample(make_plan(resolve_sampler("dpmpp_2s_a"), 9, options=options), model, noise))
    with pytest.raises(ValueError, match="noise source"):
        list(sample(make_plan(resolve_sampler("dpmpp_2s_a"), 9), model, noise))


def test_eta_and_s_noise_change_the_result():
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    model = lambda x, call: toy_eps(x, call.t)          # noqa: E731
    for name in ("dpm_2_a", "dpmpp_2s_a"):
        runs = []
        for options in ({}, {"eta": 0.5}, {"s_noise": 0.5}, {"eta": 0.0}):
            plan = make_plan(resolve_sampler(name), 6, options=options)
            runs.append(list(sample(plan, model, noise, source=GeneratorNoise.seeded(1)))[-1])
        for i in range(len(runs)):
            for j in range(i + 1, len(runs)):
                assert rel_err(runs[i], runs[j]) > 1e-3


# ---- DPM2's discarded penultimate σ (A1111) ----

@pytest.mark.parametrize("steps", [1, 2, 3, 10, 25])
@pytest.mark.parametrize("schedule", list(SCHEDULE_TYPES))
@pytest.mark.parametrize("name", ["dpm_2", "dpm_2_a"])
def test_discard_penultimate_sigma(name, schedule, steps):
    """A1111: the grid of steps + 1, the last σ before 0 dropped: still `steps` steps, timesteps kept."""
    spec = resolve_sampler(name).with_schedule(schedule)
    assert spec.discard_penultimate_sigma
    plan = make_plan(spec, steps)
    t_full, s_full = dataclasses.replace(spec, discard_penultimate_sigma=False).make_grid(steps + 1, CFG)
    assert plan.num_steps == steps and len(plan.sigmas) == steps + 1
    assert plan.timesteps.tolist() == t_full[:-1].tolist()
    assert plan.sigmas.tolist() == s_full[:-2].tolist() + [0.0]
    assert plan.sigmas[-2] > s_full[-2]


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_dpm2_karras_grid_is_a1111s(steps):
    """DPM2 Karras as A1111 builds it, written out: k-diffusion's get_sigmas_karras(steps + 1, σ(t=0),
    σ(t=999)), the penultimate σ discarded; timesteps rounded (diffusers' KDPM2 rounds them)."""
    table = sigma_table(CFG)
    lo, hi, rho = float(table[0]) ** (1 / 7), float(table[-1]) ** (1 / 7), 7
    n = steps + 1
    karras = [(hi + k / (n - 1) * (lo - hi)) ** rho for k in range(n)]
    expected = karras[:-1] + [0.0]
    plan = make_plan(resolve_sampler("DPM2 Karras"), steps)
    assert plan.sigmas.tolist() == pytest.approx(expected, rel=1e-6)
    assert plan.timesteps.tolist() == timestep_at(plan.sigmas[:-1], CFG).round().tolist()


# ---- the table: names, defaults, options, UNet calls ----

@pytest.mark.parametrize("name,label,full_name,schedule_type", [
    ("heun", "Heun", "heun", "Automatic"), ("lms", "LMS", "lms", "Automatic"),
    ("dpm_2", "DPM2", "dpm_2_karras", "Karras"), ("dpm_2_a", "DPM2 a", "dpm_2_a_karras", "Karras"),
    ("dpmpp_2s_a", "DPM++ 2S a", "dpmpp_2s_a_karras", "Karras"),
])
def test_names_and_default_schedules(name, label, full_name, schedule_type):
    """A1111's Automatic: the model's default (Uniform) for Heun and LMS, Karras for the DPM ones."""
    for spelled in (name, label, f"k_{name}"):
        spec = resolve_sampler(spelled)
        assert (spec.name, spec.label, spec.full_name, spec.schedule_type) == (name, label, full_name, schedule_type)
    assert set(SAMPLERS[name].accepted_schedules) == set(SCHEDULE_TYPES)


def test_a1111_and_comfyui_spellings():
    assert resolve_sampler("DPM2 a Karras").full_name == "dpm_2_a_karras"
    assert resolve_sampler("LMS Karras").full_name == "lms_karras"
    assert resolve_sampler("DPM++ 2S a Karras").full_name == "dpmpp_2s_a_karras"
    assert resolve_sampler("k_dpm_2_a").name == "dpm_2_a"
    assert resolve_sampler("k_dpmpp_2s_a").name == "dpmpp_2s_a"
    assert resolve_sampler("dpm_2_ancestral").name == "dpm_2_a"
    assert resolve_sampler("dpmpp_2s_ancestral").name == "dpmpp_2s_a"
    assert resolve_sampler("Heun", "Exponential").full_name == "heun_exponential"


def test_options():
    """Ancestral ones: eta (A1111 infotext `Eta`, default 1) and s_noise (`Sigma noise`, default 1); eta 0 is
    taken literally there; the ODE ones have none (eta 0 accepted as neutral)."""
    for name in ("dpm_2_a", "dpmpp_2s_a"):
        spec = SAMPLERS[name]
        assert [(o.name, o.default, o.infotext) for o in spec.options] == [("eta", 1.0, "Eta"),
                                                                          ("s_noise", 1.0, "Sigma noise")]
        assert spec.check_options({}) == {"eta": 1.0, "s_noise": 1.0}
        assert spec.check_options({"eta": 0}, keep_defaults=False) == {"eta": 0.0}
        for bad in ({"eta": 1.5}, {"eta": -0.1}, {"s_noise": 1.2}, {"s_noise": float("nan")}):
            with pytest.raises(ValueError):
                spec.check_options(bad)
    for name in ("heun", "lms", "dpm_2"):
        assert SAMPLERS[name].options == ()
        assert SAMPLERS[name].check_options({"eta": 0.0}) == {}
        with pytest.raises(ValueError, match="has no option"):
            SAMPLERS[name].check_options({"s_noise": 1.0})


@pytest.mark.parametrize("name", ODE)
def test_nfe_counts_real_calls_and_deterministic_flag(name):
    """The table's nfe(steps) is the number of model calls a run makes, txt2img and img2img, every schedule
    type; `deterministic` samplers run without a noise source, the others draw."""
    spec = SAMPLERS[name]
    calls = []

    def model(x, call):
        calls.append(call)
        return toy_eps(x, call.t)

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for schedule in SCHEDULE_TYPES:
        for steps, strength in ((1, 1.0), (2, 1.0), (3, 1.0), (10, 1.0), (10, 0.6), (25, 0.8)):
            plan = make_plan(spec.with_schedule(schedule), steps, strength=strength)
            calls.clear()
            source = None if spec.deterministic else GeneratorNoise.seeded(0)
            list(sample(plan, model, noise, x0=x0 if strength < 1 else None, source=source))
            assert len(calls) == spec.nfe(plan.num_steps)
            assert all(0 <= c.step < plan.num_steps and c.steps == plan.num_steps for c in calls)
    assert spec.deterministic == (name not in ("dpm_2_a", "dpmpp_2s_a"))
    if not spec.deterministic:
        with pytest.raises(ValueError, match="noise source"):
            list(sample(make_plan(spec, 4), model, noise))
