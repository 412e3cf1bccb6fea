"""The multistep VP samplers (sd15/sampling/multistep.py): PLMS, UniPC (bh1 and bh2) and DEIS.

Against diffusers' PNDMScheduler(skip_prk_steps=True), UniPCMultistepScheduler and DEISMultistepScheduler, built
as users build them (`from_config` of SD1.5's DDIM config, plus the overrides each row stands for), for every
schedule type each row takes, txt2img and img2img, driven as StableDiffusion(Img2Img)Pipeline drives them. The
generic loop of test_samplers.py does not fit: these `step` methods take no generator, and PNDM makes N + 1
`step` calls for N steps (the warm-up's Euler predictor is a call of its own, not one of our steps).

Metric: relative error = max|ours − ref| / max|ref|, float32, batch 2. Every comparison also checks that both
sides call the model the same number of times, with the same inputs and timesteps.
"""
import math

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler

from reference import SD15_SCHEDULER, recording, rel_err, toy_eps
from sd15.sampling import SAMPLERS, make_plan, noised, resolve_sampler, sample
from sd15.sampling import multistep
from sd15.sampling.multistep import _deis_coefficients, _short_schedule

TOL = 1e-5
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # diffusers + numpy 2
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]   # DEIS np.log
SHAPE = (2, 4, 8, 8)
MULTISTEP = ("plms", "unipc", "unipc_bh2", "deis")

PNDM = ("PNDMScheduler", {"skip_prk_steps": True})
UNIPC_BH1 = {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}
# case id -> (our sampler name, our options, diffusers class, from_config overrides)
CASES = {
    "plms": ("plms", {}, *PNDM),
    "unipc": ("unipc", {}, "UniPCMultistepScheduler", UNIPC_BH1),
    "unipc-order2": ("unipc", {"order": 2}, "UniPCMultistepScheduler", UNIPC_BH1 | {"solver_order": 2}),
    "unipc-order1": ("unipc", {"order": 1}, "UniPCMultistepScheduler", UNIPC_BH1 | {"solver_order": 1}),
    "unipc_bh2": ("unipc_bh2", {}, "UniPCMultistepScheduler", {}),            # diffusers' default UniPC
    "unipc_bh2-order3": ("unipc_bh2", {"order": 3}, "UniPCMultistepScheduler", {"solver_order": 3}),
    "unipc_bh2_karras": ("unipc_bh2_karras", {}, "UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc_bh2_exponential": ("unipc_bh2_exponential", {}, "UniPCMultistepScheduler",
                              {"use_exponential_sigmas": True}),
    "deis": ("deis", {}, "DEISMultistepScheduler", {"solver_order": 3}),
    "deis-order2": ("deis", {"order": 2}, "DEISMultistepScheduler", {}),       # diffusers' default DEIS
    "deis-order1": ("deis", {"order": 1}, "DEISMultistepScheduler", {"solver_order": 1}),
    "deis_karras": ("deis_karras", {}, "DEISMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    "deis_exponential": ("deis_exponential", {}, "DEISMultistepScheduler",
                         {"solver_order": 3, "use_exponential_sigmas": True}),
}
GRIDS = ["plms", "unipc", "unipc_bh2", "unipc_bh2_karras", "unipc_bh2_exponential", "deis", "deis_karras",
         "deis_exponential"]


def reference_scheduler(case):
    _, _, cls, overrides = CASES[case]
    return getattr(diffusers, cls).from_config(DDIMScheduler(**SD15_SCHEDULER).config, **overrides)


def pipeline_loop(case, steps, model, noise, x0=None, strength=1.0):
    """StableDiffusion(Img2Img)Pipeline's scheduler use (UniPC, DEIS): the latents after each `step`."""
    sched = reference_scheduler(case)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if x0 is None:
        latents = noise * sched.init_noise_sigma
    else:  # get_timesteps + prepare_latents
        start = steps - min(int(steps * strength), steps)
        timesteps = sched.timesteps[start * sched.order:]
        sched.set_begin_index(start * sched.order)
        latents = sched.add_noise(x0, noise, timesteps[:1].repeat(noise.shape[0]))
    out = []
    for t in timesteps:
        latents = sched.step(model(sched.scale_model_input(latents, t), t), t, latents, return_dict=False)[0]
        out.append(latents)
    return out


def plms_levels(steps):
    """The N grid timesteps of PNDM(skip_prk_steps) for N steps, its N + 1-entry list without the repeat."""
    sched = reference_scheduler("plms")
    sched.set_timesteps(steps)
    return torch.unique_consecutive(sched.timesteps), sched


def plms_loop(steps, model, noise, x0=None, strength=1.0):
    """diffusers' PNDM arithmetic over the steps a plan runs. txt2img: StableDiffusionPipeline's loop, N + 1 calls.
    img2img: the same over the kept steps, the second of them repeated as PNDM repeats its second timestep (PLMS
    with its warm-up on the first kept step, as CompVis and A1111 run it). Returns the latents after each whole
    step: the first call's output (the warm-up's Euler predictor) is not one."""
    levels, sched = plms_levels(steps)
    kept = levels[steps - min(int(steps * strength), steps):]
    timesteps = torch.cat([kept[:1], kept[1:2], kept[1:]]) if len(kept) > 1 else kept
    if x0 is None:
        assert torch.equal(timesteps, sched.timesteps)       # the pipeline's own list
        latents = noise * sched.init_noise_sigma
    else:
        latents = sched.add_noise(x0, noise, timesteps[:1])
    out = []
    for t in timesteps:
        latents = sched.step(model(latents, t), t, latents, return_dict=False)[0]
        out.append(latents)
    return out[1:] if len(kept) > 1 else out


def run_both(case, steps, strength=None):
    """Same noise and init image both sides: (ours, ref) step latents and model-call logs, and the plan."""
    name, options = CASES[case][:2]
    x0 = None if strength is None else torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    plan = make_plan(resolve_sampler(name), steps, strength=strength or 1.0, options=options)
    ours_log, ref_log = [], []
    ours = list(sample(plan, recording(toy_eps, ours_log), noise, x0=x0))
    loop = plms_loop if name == "plms" else lambda *a: pipeline_loop(case, *a)
    ref = loop(steps, recording(toy_eps, ref_log), noise, x0, strength or 1.0)
    return ours, ref, ours_log, ref_log, plan


def check(ours, ref, ours_log, ref_log, tol=TOL):
    assert len(ours) == len(ref) and len(ours_log) == len(ref_log)
    for (x_ours, t_ours), (x_ref, t_ref) in zip(ours_log, ref_log):
        assert t_ours == t_ref                          # the UNet sees the same (integer) t ...
        assert rel_err(x_ours, x_ref) <= tol            # ... and the same input
    for a, b in zip(ours, ref):
        assert rel_err(a, b) <= tol


# ---- configurations and grids ----

def test_reference_configs():
    """What the rows stand for: diffusers' SD1.5 PNDM, its default UniPC and DEIS, and the overrides that differ."""
    pndm = reference_scheduler("plms").config
    assert (pndm.skip_prk_steps, pndm.timestep_spacing, pndm.steps_offset, pndm.set_alpha_to_one) == (
        True, "leading", 1, False)
    unipc = reference_scheduler("unipc_bh2").config
    assert (unipc.solver_type, unipc.solver_order, unipc.final_sigmas_type, unipc.timestep_spacing,
            unipc.lower_order_final, unipc.predict_x0, unipc.disable_corrector) == ("bh2", 2, "zero", "linspace",
                                                                                    True, True, [])
    deis = reference_scheduler("deis-order2").config
    assert (deis.solver_order, deis.solver_type, deis.algorithm_type, deis.lower_order_final) == (
        2, "logrho", "deis", True)
    assert {o.name: o.default for o in SAMPLERS["unipc_bh2"].options} == {"order": 2.0}
    assert {o.name: o.default for o in SAMPLERS["unipc"].options} == {"order": 3.0}
    assert {o.name: o.default for o in SAMPLERS["deis"].options} == {"order": 3.0}


def reference_sigmas(case, sched, steps):
    if case != "plms":
        return sched.sigmas.double()
    abar = torch.cat([sched.alphas_cumprod[plms_levels(steps)[0]], sched.final_alpha_cumprod.reshape(1)]).double()
    return ((1 - abar) / abar).sqrt()


@pytest.mark.parametrize("case", GRIDS)
def test_grids_sweep(case):
    """Timesteps exactly and σ levels (float32 in diffusers) for 1..120 steps: rounding, truncation of the
    exponential grid's fractional t, and each scheduler's last σ (0, σ(t=0), or the last level repeated)."""
    for steps in range(1, 121):
        sched = reference_scheduler(case)
        sched.set_timesteps(steps)
        plan = make_plan(resolve_sampler(CASES[case][0]), steps)
        expected = plms_levels(steps)[0] if case == "plms" else sched.timesteps
        assert plan.timesteps.tolist() == expected.double().tolist(), steps
        assert torch.allclose(plan.sigmas, reference_sigmas(case, sched, steps), rtol=1e-6, atol=0), steps
        assert plan.init_sigma == float(sched.init_noise_sigma) == 1.0


def test_grid_ends():
    """Where each row's last step lands, as its scheduler has it."""
    sigma_0 = make_plan(resolve_sampler("ddim"), 10).sigmas[-1].item()      # σ(t=0) ≈ 0.0292
    ends = {name: make_plan(resolve_sampler(name), 10).sigmas[-2:].tolist() for name in GRIDS}
    assert ends["unipc_bh2"][1] == ends["unipc_bh2_karras"][1] == ends["unipc_bh2_exponential"][1] == 0.0
    assert ends["plms"][1] == ends["unipc"][1] == ends["deis"][1] == pytest.approx(sigma_0, rel=1e-12)
    assert ends["deis_karras"][0] == ends["deis_karras"][1] == pytest.approx(sigma_0, rel=1e-6)   # repeated
    assert ends["deis_exponential"][0] == ends["deis_exponential"][1] == pytest.approx(sigma_0, rel=1e-6)


# ---- whole loops, toy model, against diffusers ----

@pytest.mark.parametrize("steps", [1, 2, 3, 10, 25])
@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_loop(case, steps):
    ours, ref, ours_log, ref_log, plan = run_both(case, steps)
    assert len(ours) == steps
    check(ours, ref, ours_log, ref_log)


@pytest.mark.parametrize("steps,strength", [(3, 0.7), (10, 0.3), (10, 0.75), (20, 0.5), (25, 0.3), (25, 0.75)])
@pytest.mark.parametrize("case", list(CASES))
def test_img2img_loop(case, steps, strength):
    """(20, 0.5) and (25, 0.3) keep fewer than 15 steps of a longer schedule: diffusers' DEIS then does not lower
    its order at the end (it judges by the schedule's length), and neither do we."""
    ours, ref, ours_log, ref_log, plan = run_both(case, steps, strength)
    assert len(ours) == int(steps * strength)
    check(ours, ref, ours_log, ref_log)


@pytest.mark.parametrize("steps", [50, 100])
@pytest.mark.parametrize("case", ["deis", "deis_karras", "unipc", "unipc_bh2"])
def test_many_steps_against_float64_coefficients(case, steps):
    """Over many steps the reference's own float32 arithmetic becomes the error: DEIS's log-ρ coefficients
    (np.log of float32 σ, differences of nearly equal terms) are off by ~3e-5 of the state at 50 steps, 2e-4 at
    100. With the scheduler's σ table in float64 (and a float64 state), the loops agree to the float32 rounding of
    that table."""
    name, options = CASES[case][:2]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = make_plan(resolve_sampler(name), steps, options=options)
    ours = list(sample(plan, lambda x, call: toy_eps(x, call.t).double(), noise))
    sched = reference_scheduler(case)
    sched.set_timesteps(steps)
    sched.sigmas = sched.sigmas.double()
    latents, ref = noise, []
    for t in sched.timesteps:
        latents = sched.step(toy_eps(latents, t).double(), t, latents, return_dict=False)[0]
        ref.append(latents)
    assert max(rel_err(a, b) for a, b in zip(ours, ref)) <= 1e-6


def test_deis_order_lowering_is_judged_by_the_whole_schedule(monkeypatch):
    """diffusers' DEIS lowers its order over the last two steps only for schedules under 15 steps, so 10 steps of
    a 20-step schedule end third order; lowering them (as a 10-step schedule would) is measurably different."""
    deis = resolve_sampler("deis")
    assert _short_schedule(make_plan(deis, 14), 15) and not _short_schedule(make_plan(deis, 15), 15)
    assert _short_schedule(make_plan(deis, 12, strength=0.9), 15)            # 10 of 12
    assert not _short_schedule(make_plan(deis, 20, strength=0.5), 15)        # 10 of 20
    assert not _short_schedule(make_plan(resolve_sampler("deis_karras"), 20, strength=0.5), 15)
    assert _short_schedule(make_plan(deis, 14, run=7), 15) and not _short_schedule(make_plan(deis, 20, run=7), 15)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    plan = make_plan(deis, 20, strength=0.5)
    ref = pipeline_loop("deis", 20, toy_eps, noise, x0, 0.5)[-1]
    model = lambda x, call: toy_eps(x, call.t)          # noqa: E731
    assert rel_err(list(sample(plan, model, noise, x0=x0))[-1], ref) <= TOL
    monkeypatch.setattr(multistep, "_short_schedule", lambda plan, limit: True)
    assert rel_err(list(sample(plan, model, noise, x0=x0))[-1], ref) > 1e-4


# ---- UNet calls ----

@pytest.mark.parametrize("name", MULTISTEP)
def test_nfe_counts_real_calls(name):
    """The row's nfe(steps) is the number of UNet calls a run makes (PLMS: one more, for its warm-up)."""
    spec = resolve_sampler(name)
    for steps, strength in [(1, 1.0), (2, 1.0), (3, 1.0), (10, 1.0), (25, 1.0), (10, 0.5), (10, 0.2), (10, 0.1)]:
        plan = make_plan(spec, steps, strength=strength)
        calls = []
        states = list(sample(plan, recording(toy_eps, calls), torch.zeros(SHAPE),
                             x0=None if strength == 1 else torch.ones(SHAPE)))
        assert len(states) == plan.num_steps == int(steps * strength)
        assert len(calls) == spec.nfe(plan.num_steps)
    assert [SAMPLERS["plms"].nfe(n) for n in (1, 2, 3, 25)] == [1, 3, 4, 26]
    assert all(SAMPLERS[n].deterministic for n in MULTISTEP)


def test_plms_warm_up_evaluates_the_next_level():
    """PLMS's step 0 calls the UNet at its own level and at the next one; later steps once each, in order."""
    calls = []
    plan = make_plan(resolve_sampler("plms"), 4)
    list(sample(plan, recording(toy_eps, calls), torch.zeros(SHAPE)))
    assert [t for _, t in calls] == [751.0, 501.0, 501.0, 251.0, 1.0]


# ---- PLMS img2img: diffusers' pipeline is not PLMS on the kept steps ----

@pytest.mark.parametrize("steps,strength", [(10, 0.75), (25, 0.3), (4, 0.3)])
def test_plms_img2img_differs_from_diffusers_pipeline_slicing(steps, strength):
    """StableDiffusionImg2ImgPipeline slices PNDM's N + 1 timesteps by the step count (get_timesteps, order 1):
    it starts one level above the kept steps and makes k + 1 calls, and from its third call on gives the UNet and
    the update the timestep one level below the state's. Ours (PLMS on the kept steps, as CompVis / A1111) is
    diffusers' PNDM arithmetic over those steps (test_img2img_loop), not this."""
    levels, sched = plms_levels(steps)
    kept = int(steps * strength)
    start = steps - kept
    pipeline_timesteps = sched.timesteps[start:]
    plan = make_plan(resolve_sampler("plms"), steps, strength=strength)
    assert plan.timesteps.tolist() == levels[start:].double().tolist()
    assert int(pipeline_timesteps[0]) == int(plan.timesteps[0]) + 1000 // steps     # a level noisier
    assert len(pipeline_timesteps) == kept + 1
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    latents = sched.add_noise(x0, noise, pipeline_timesteps[:1])
    for t in pipeline_timesteps:
        latents = sched.step(toy_eps(latents, t), t, latents, return_dict=False)[0]
    ours = list(sample(plan, lambda x, call: toy_eps(x, call.t), noise, x0=x0))[-1]
    assert rel_err(ours, latents) > 0.01


# ---- the state seam: diffusers' latent blending for inpainting masks ----

@pytest.mark.parametrize("case", ["unipc", "unipc_bh2", "unipc_bh2_karras", "deis"])
def test_after_step_reproduces_diffusers_mask_blending(case):
    """StableDiffusionInpaintPipeline with a 4-channel UNet blends the state after every step; UniPC's corrector
    then starts from its own unblended start state and the model output at the blended one, as here."""
    steps, name, options = 8, *CASES[case][:2]
    g = torch.Generator().manual_seed(5)
    image_latents = torch.randn(SHAPE, generator=g)
    mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=g) > 0.5).float()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    plan = make_plan(resolve_sampler(name), steps, options=options)
    sigmas = plan.sigmas.tolist()

    def blend(x, i):
        outside = noised(plan, image_latents, noise, sigmas[i + 1]) if i < steps - 1 else image_latents
        return (1 - mask) * outside + mask * x

    model = lambda x, call: toy_eps(x, call.t)          # noqa: E731
    ours = list(sample(plan, model, noise, after_step=blend))
    plain = list(sample(plan, model, noise))
    sched = reference_scheduler(case)
    sched.set_timesteps(steps)
    sched.set_begin_index(0)
    latents, ref = noise.clone(), []
    for i, t in enumerate(sched.timesteps):
        latents = sched.step(toy_eps(latents, t), t, latents, return_dict=False)[0]
        proper = image_latents
        if i < steps - 1:
            proper = sched.add_noise(image_latents, noise, sched.timesteps[i + 1:i + 2])
        latents = (1 - mask) * proper + mask * latents
        ref.append(latents)
    for x, r in zip(ours, ref):
        assert rel_err(x, r) <= TOL
    assert rel_err(plain[-1], ref[-1]) > 0.01


# ---- coefficients ----

def test_deis_coefficients_integrate_polynomials_exactly():
    """Σ_j c_j·f(u_j) = ∫ f(log ρ) dρ for polynomials f of degree < number of nodes (here against quadrature)."""
    nodes = [math.log(2.0), math.log(3.5), math.log(6.0)]
    rho, rho_next = 2.0, 1.2
    coefficients = _deis_coefficients(nodes, rho, rho_next)
    for f in (lambda u: 1.0, lambda u: u, lambda u: 3 * u * u - u + 2):
        n = 20000
        width = (rho_next - rho) / n
        integral = sum(f(math.log(rho + (k + 0.5) * width)) for k in range(n)) * width   # midpoint rule
        assert sum(c * f(u) for c, u in zip(coefficients, nodes)) == pytest.approx(integral, rel=1e-6)
    assert _deis_coefficients([math.log(2.0)], 2.0, 1.2) == pytest.approx([-0.8])      # order 1: DDIM


# ---- names, options, errors ----

@pytest.mark.parametrize("alias,name", [
    ("PLMS", "plms"), ("plms", "plms"), ("UniPC", "unipc"), ("uni_pc", "unipc"), ("UniPC bh2", "unipc_bh2"),
    ("uni_pc_bh2", "unipc_bh2"), ("unipc_bh2_karras", "unipc_bh2_karras"), ("UniPC bh2 Exponential",
                                                                              "unipc_bh2_exponential"),
    ("DEIS", "deis"), ("deis", "deis"), ("DEIS Karras", "deis_karras"), ("deis_exponential", "deis_exponential"),
])
def test_resolve_aliases(alias, name):
    assert resolve_sampler(alias).full_name == name


def test_schedule_types_and_labels():
    assert resolve_sampler("UniPC").label == "UniPC" and resolve_sampler("UniPC").schedule_type == "Automatic"
    assert resolve_sampler("DEIS", "Karras").schedule_type == "Karras"
    for name in ("plms", "unipc"):         # timestep samplers in A1111: their own grid only
        with pytest.raises(ValueError, match="has no schedule type 'Karras'"):
            resolve_sampler(name, "Karras")
    with pytest.raises(ValueError, match="has no schedule type 'SGM Uniform'"):   # no diffusers reference
        resolve_sampler("DEIS", "SGM Uniform")
    assert [o.infotext for o in SAMPLERS["unipc"].options] == ["UniPC order"]       # A1111's key


@pytest.mark.parametrize("name", ["unipc", "unipc_bh2", "deis"])
def test_order_must_be_1_2_or_3(name):
    with pytest.raises(ValueError, match="order"):
        make_plan(resolve_sampler(name), 10, options={"order": 4})
    with pytest.raises(ValueError, match="order is a whole number from 1 to 3"):      # caught at plan time
        make_plan(resolve_sampler(name), 10, options={"order": 2.5})
    assert make_plan(resolve_sampler(name), 10, options={"order": 2.0}).options["order"] == 2
    with pytest.raises(ValueError, match="has no option order"):
        make_plan(resolve_sampler("plms"), 10, options={"order": 2})
