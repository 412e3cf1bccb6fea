"""Schedule types (A1111 1.9+'s "Schedule type" field) apart from the samplers.

Karras and Exponential have diffusers references (use_karras_sigmas, use_exponential_sigmas): those run
through the generic grid and sampler-loop tests of test_samplers.py (tools.reference.SCHEDULERS). SGM Uniform
and Align Your Steps have none in diffusers: they are checked here against the formulas as A1111 publishes
them (modules/sd_schedulers.py), written out again with numpy.
"""
import math

import numpy as np
import pytest
import torch

from sd15.sampling import SCHEDULE_TYPES, SAMPLERS, ScheduleConfig, make_plan, resolve_sampler
from sd15.sampling.registry import every_combination
from sd15.sampling.schedule import alphas_cumprod

CFG = ScheduleConfig()
AYS = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]   # NVIDIA's SD1.5 table


def model_sigmas() -> np.ndarray:
    """k-diffusion's DiscreteSchedule table: sqrt((1 - ᾱ)/ᾱ), ᾱ from the SD1.5 betas."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    return np.sqrt((1 - abar) / abar)


def k_t_to_sigma(t: np.ndarray) -> np.ndarray:
    """k-diffusion's t_to_sigma: log σ interpolated between integer timesteps."""
    log_sigmas = np.log(model_sigmas())
    low = np.floor(t).astype(int)
    high = np.ceil(t).astype(int)
    w = t - low
    return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
def test_sgm_uniform_is_a1111s_formula(steps):
    # sgm_uniform: timesteps = linspace(t(σ_max), t(σ_min), n + 1)[:-1], σ of each, then 0.
    t = np.linspace(999, 0, steps + 1)[:-1]
    expected = np.append(k_t_to_sigma(t), 0.0)
    plan = make_plan(resolve_sampler("Euler", "SGM Uniform"), steps)
    np.testing.assert_allclose(plan.sigmas.numpy(), expected, rtol=5e-5)   # ᾱ: float32 here, float64 above
    np.testing.assert_allclose(plan.timesteps.numpy(), t, atol=2e-3)        # the UNet gets those fractional t


def loglinear_interp(t_steps, num_steps):
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(t_steps[::-1])
    new_ys = np.interp(np.linspace(0, 1, num_steps), xs, ys)
    return np.exp(new_ys)[::-1].copy()


@pytest.mark.parametrize("steps", [4, 10, 11, 25])
def test_align_your_steps_is_the_published_table_interpolated(steps):
    expected = np.array(AYS) if steps == len(AYS) else loglinear_interp(np.array(AYS), steps)
    plan = make_plan(resolve_sampler("DPM++ 2M", "Align Your Steps"), steps)
    np.testing.assert_allclose(plan.sigmas[:-1].numpy(), expected, rtol=1e-6)
    assert plan.sigmas[-1] == 0 and plan.num_steps == steps
    if steps == 11:
        assert plan.sigmas[:-1].tolist() == pytest.approx(AYS, rel=1e-7)


def test_exponential_and_karras_span_the_model_sigmas():
    sig = model_sigmas()
    exp = make_plan(resolve_sampler("euler_a", "exponential"), 12).sigmas[:-1].numpy()
    np.testing.assert_allclose(exp, np.exp(np.linspace(math.log(sig[-1]), math.log(sig[0]), 12)), rtol=5e-5)
    kar = make_plan(resolve_sampler("Euler a Karras"), 12).sigmas[:-1].numpy()
    ramp = np.linspace(0, 1, 12)
    expected = (sig[-1] ** (1 / 7) + ramp * (sig[0] ** (1 / 7) - sig[-1] ** (1 / 7))) ** 7
    np.testing.assert_allclose(kar, expected, rtol=5e-5)


@pytest.mark.parametrize("spec", every_combination(), ids=lambda s: s.full_name)
@pytest.mark.parametrize("steps", [1, 3, 30])
def test_every_combination_walks_down_to_zero(spec, steps):
    plan = make_plan(spec, steps)
    if spec.name == "deis" and spec.schedule != "uniform" and steps == 1:
        # diffusers' one-step DEIS Karras/Exponential grid ends where it starts; kept for parity
        assert plan.sigmas[0] == plan.sigmas[1] == plan.sigmas.max()
        return
    sigmas, t = plan.sigmas, plan.timesteps
    assert len(t) == plan.num_steps and len(sigmas) == plan.num_steps + 1
    assert bool((sigmas[1:] <= sigmas[:-1]).all()), sigmas
    if spec.name == "deis" and spec.schedule != "uniform":   # diffusers' DEIS repeats its last level (a no-op step)
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    assert bool((sigmas[1:] < sigmas[:-1]).all()), sigmas          # strictly down ...
    assert float(sigmas[0]) <= 14.615 * (1 + 1e-6) and float(sigmas[-1]) < 0.03    # ... within the model's range
    assert bool(((t >= 0) & (t <= 999)).all()) and bool((t[1:] <= t[:-1]).all())


def test_schedule_table_labels_and_timestep_samplers():
    assert [s.label for s in SCHEDULE_TYPES.values()] == ["Uniform", "Karras", "Exponential", "SGM Uniform",
                                                         "Align Your Steps"]
    assert SAMPLERS["ddim"].accepted_schedules == ("uniform",)
    assert set(SAMPLERS["euler"].accepted_schedules) == set(SCHEDULE_TYPES)


def test_alphas_are_accumulated_in_float32():
    """Why the tolerances above are 5e-5: the engine's ᾱ is diffusers' float32 product, not float64's."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    float64 = torch.cumprod(1 - betas, 0)
    assert 1e-7 < (alphas_cumprod(CFG) - float64).abs().max() < 1e-5
