"""LCM and TCD against diffusers' LCMScheduler / TCDScheduler, and LCM-distilled UNets (guidance embedding).

The schedulers are built as LCM-LoRA / TCD-LoRA users build them: `XScheduler.from_config(SD1.5 config)`.
The reference loop drives them as StableDiffusion(Img2Img)Pipeline does, with diffusers' own
`get_timesteps` for img2img (the tail of the schedule; set_timesteps without strength). Same seed and
generator on both sides; the generator's next draw proves the same number of draws.
Metric: max|ours − ref| / max|ref|, float32, batch 2.
"""
import dataclasses
import types

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import \
    LatentConsistencyModelPipeline

from reference import (SD15_SCHEDULER, TINY, diffusers_unet_config, engine_models, recording, reference_models,
                       rel_err, toy_eps)
from sd15.files.errors import CheckpointError
from sd15.models.demo import PREFIX, TINY_UNET, random_state_dict, tiny_metadata
from sd15.models.loading import load_models
from sd15.models.unet import UNet, guidance_embedding
from sd15.sampling import SAMPLERS, GeneratorNoise, make_plan, resolve_sampler, sample
from sd15.sampling.denoiser import Denoiser
from sd15.sampling.plan import NoNoise
from sd15.sampling.consistency import boundary_scalings, embedded_guidance, tcd_timestep
from tools.make_checkpoint import save

TOL = 1e-5
SHAPE = (2, 4, 8, 8)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
CLASSES = {"lcm": "LCMScheduler", "tcd": "TCDScheduler"}


def scheduler(name):
    return getattr(diffusers, CLASSES[name]).from_config(DDIMScheduler(**SD15_SCHEDULER).config)


def reference_loop(name, steps, model, noise, generator, x0=None, strength=1.0, eta=None):
    sched = scheduler(name)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if x0 is None:
        latents = noise * sched.init_noise_sigma
    else:   # StableDiffusionImg2ImgPipeline: get_timesteps (sets the begin index too), then add_noise
        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=sched), steps,
                                                                   strength, "cpu")
        latents = sched.add_noise(x0, noise, timesteps[:1].repeat(noise.shape[0]))
    extra = {"generator": generator} | ({} if eta is None else {"eta": eta})
    out = []
    for t in timesteps:
        latents = sched.step(model(sched.scale_model_input(latents, t), t), t, latents, **extra, return_dict=False)[0]
        out.append(latents)
    return out


def run_both(name, steps, strength=1.0, eta=None, seed=0):
    x0 = None if strength == 1.0 else torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    logs, results = ([], []), []
    for side, log in enumerate(logs):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(SHAPE, generator=g)
        if side == 0:
            plan = make_plan(resolve_sampler(name), steps, strength, {} if eta is None else {"eta": eta})
            xs = list(sample(plan, recording(toy_eps, log), noise, x0=x0, source=GeneratorNoise(g)))
        else:
            xs = reference_loop(name, steps, recording(toy_eps, log), noise, g, x0, strength, eta)
        results.append((xs, torch.randn(1, generator=g)))
    return results, logs


def check(results, logs, tol=TOL):
    """Returns the largest relative error over the steps' latents (asserting each is within tol)."""
    (ours, ours_next), (ref, ref_next) = results
    assert len(ours) == len(ref) == len(logs[0]) == len(logs[1]) > 0
    for (x_ours, t_ours), (x_ref, t_ref) in zip(*logs):
        assert t_ours == t_ref                        # the UNet sees the same (integer) t ...
        assert rel_err(x_ours, x_ref) <= tol          # ... and the same input
    errors = [rel_err(a, b) for a, b in zip(ours, ref)]
    assert max(errors) <= tol
    assert torch.equal(ours_next, ref_next)           # the same number of draws
    return max(errors)


# ---- schedules ----

def test_lcm_4_step_schedule_is_the_published_one():
    """The LCM-LoRA recipe's 4 steps (diffusers' docs and the fact sheet): 999, 759, 499, 259."""
    assert make_plan(resolve_sampler("lcm"), 4).timesteps.tolist() == [999, 759, 499, 259]
    assert make_plan(resolve_sampler("tcd"), 8).timesteps.tolist() == [999, 879, 759, 639, 499, 379, 259, 139]


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_timesteps_and_sigmas_sweep(name):
    abar = scheduler(name).alphas_cumprod.double()
    for steps in range(1, 51):
        sched = scheduler(name)
        sched.set_timesteps(steps)
        plan = make_plan(resolve_sampler(name), steps)
        assert plan.timesteps.tolist() == sched.timesteps.double().tolist()
        # after the last step: LCM returns the denoised sample (σ = 0), TCD its point at t = 0 (σ_0)
        final = torch.tensor([1.0 if name == "lcm" else float(abar[0])], dtype=torch.float64)
        levels = torch.cat([abar[sched.timesteps], final])
        assert torch.allclose(plan.sigmas, ((1 - levels) / levels).sqrt(), rtol=1e-6, atol=0)
        assert plan.init_sigma == sched.init_noise_sigma == 1.0


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_more_than_50_steps_is_an_error_as_in_diffusers(name):
    with pytest.raises(ValueError):            # diffusers refuses too
        scheduler(name).set_timesteps(51)
    with pytest.raises(ValueError, match="at most 50 steps"):
        make_plan(resolve_sampler(name), 51)


@pytest.mark.parametrize("steps,strength", [(4, 0.5), (4, 0.75), (8, 0.3), (10, 0.55), (25, 0.75)])
def test_img2img_keeps_the_tail_as_diffusers_img2img_pipeline(steps, strength):
    sched = scheduler("lcm")
    sched.set_timesteps(steps)
    pipe = types.SimpleNamespace(scheduler=sched)
    tail, n = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
    plan = make_plan(resolve_sampler("lcm"), steps, strength)
    assert plan.timesteps.tolist() == tail.double().tolist() and plan.num_steps == n


def test_lcm_pipeline_img2img_schedules_differently():
    """Known difference (not ours to copy): LatentConsistencyModelImg2ImgPipeline passes strength to
    set_timesteps and runs all `steps` among the first int(50·strength) timesteps; StableDiffusionImg2ImgPipeline
    (LCM-LoRA on SD1.5), which we follow, keeps the last int(steps·strength) of the full schedule."""
    sched = scheduler("lcm")
    sched.set_timesteps(4, strength=0.5)
    assert sched.timesteps.tolist() == [499, 379, 259, 139]
    assert make_plan(resolve_sampler("lcm"), 4, 0.5).timesteps.tolist() == [499, 259]


def test_boundary_condition_values():
    """c_skip/c_out at 10·t with σ_data = 0.5: identity at t = 0, c_skip ≈ 6.9e-6 at t = 19."""
    sched = scheduler("lcm")
    for t in (0, 19, 139, 999):
        ref = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert boundary_scalings(float(t)) == pytest.approx([float(v) for v in ref], rel=1e-6, abs=1e-12)
    assert boundary_scalings(0.0) == (1.0, 0.0)
    assert boundary_scalings(19.0)[0] == pytest.approx(0.25 / (190**2 + 0.25))


def test_lcm_boundary_condition_where_it_matters():
    """c_skip is below the parity tolerance except near t = 0: one step at t = 19 (50 steps, strength 0.02)
    with an ε that leaves x0 = 1e-4·x, where c_skip·x is ~7% of the result. That ε cancels x to 1e-4, so
    float32 rounding of the coefficients (diffusers' float32 tensors, our float64 scalars) shows ×1e4:
    measured 1.3e-3 against diffusers; without c_skip the error would be ~0.065."""
    plan = make_plan(resolve_sampler("lcm"), 50, 0.02)
    assert plan.timesteps.tolist() == [19]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    a = float(scheduler("lcm").alphas_cumprod[19])
    eps = (x - a**0.5 * 1e-4 * x) / (1 - a) ** 0.5
    sched = scheduler("lcm")
    sched.set_timesteps(50)
    sched.set_begin_index(49)
    ref = sched.step(eps, sched.timesteps[49], x, return_dict=False)[0]
    ours = next(plan.sampler.fn(Denoiser(lambda x_in, call: eps, plan), x, plan, NoNoise()))
    assert rel_err(ours, ref) <= 5e-3
    assert rel_err(ref, (x - (1 - a) ** 0.5 * eps) / a**0.5) > 0.03      # c_skip·x is not negligible here


def test_tcd_timestep_matches_diffusers_float32_floor():
    for eta in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        for t_next in range(1000):
            assert tcd_timestep(eta, t_next) == int(torch.floor((1 - eta) * torch.tensor(t_next)).long())
    assert tcd_timestep(0.3, 759) == 531 and tcd_timestep(0.3, 0) == 0 and tcd_timestep(1.0, 499) == 0


# ---- whole loops, toy model, same seed ----

@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 10, 25, 50])
def test_lcm_txt2img(steps):
    check(*run_both("lcm", steps))


@pytest.mark.parametrize("steps,strength", [(2, 0.5), (4, 0.5), (4, 0.75), (8, 0.3), (8, 0.75), (10, 0.3),
                                            (25, 0.75)])
def test_lcm_img2img(steps, strength):
    check(*run_both("lcm", steps, strength))


TCD_ETAS = [None, 0.0, 0.5, 1.0]    # None: our default (0.3) against diffusers' step() default (0.3)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 10, 25])
@pytest.mark.parametrize("eta", TCD_ETAS)
def test_tcd_txt2img(eta, steps):
    check(*run_both("tcd", steps, eta=eta))


@pytest.mark.parametrize("steps,strength", [(4, 0.5), (4, 0.75), (8, 0.3), (10, 0.75)])
@pytest.mark.parametrize("eta", TCD_ETAS)
def test_tcd_img2img(eta, steps, strength):
    check(*run_both("tcd", steps, strength, eta))


def test_tcd_eta0_and_one_step_lcm_need_no_noise_source():
    """Deterministic cases draw nothing: TCD with γ = 0 at any step count, LCM with one step."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    model = lambda x, call: toy_eps(x, call.t)            # noqa: E731
    for name, steps, options in (("tcd", 4, {"eta": 0.0}), ("lcm", 1, {})):
        xs = list(sample(make_plan(resolve_sampler(name), steps, options=options), model, noise))
        assert len(xs) == steps
    with pytest.raises(ValueError, match="noise source"):
        list(sample(make_plan(resolve_sampler("lcm"), 2), model, noise))


def test_seed_changes_lcm_result():
    """The re-noising between steps is real: another generator state after the initial noise, another result."""
    (ours, _), _ = run_both("lcm", 4)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=g)
    other = list(sample(make_plan(resolve_sampler("lcm"), 4), lambda x, c: toy_eps(x, c.t), noise,
                        source=GeneratorNoise(torch.Generator().manual_seed(1))))
    assert rel_err(other[-1], ours[-1]) > 0.01


# ---- the table ----

@pytest.mark.parametrize("name,steps", [(n, s) for n in ("lcm", "tcd") for s in (1, 2, 4, 8)])
def test_nfe_counts_real_calls(name, steps):
    calls = []
    model = lambda x, call: calls.append(call.t) or toy_eps(x, call.t)      # noqa: E731
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    list(sample(make_plan(resolve_sampler(name), steps), model, noise, source=GeneratorNoise.seeded(1)))
    assert len(calls) == SAMPLERS[name].nfe(steps) == steps


def test_rows():
    lcm, tcd = resolve_sampler("LCM"), resolve_sampler("TCD")
    assert (lcm.name, lcm.label, lcm.schedule_type, lcm.full_name, lcm.vp) == ("lcm", "LCM", "Automatic", "lcm", True)
    assert (tcd.name, tcd.label, tcd.schedule_type, tcd.full_name) == ("tcd", "TCD", "Automatic", "tcd")
    assert not lcm.deterministic and not tcd.deterministic
    assert lcm.accepted_schedules == tcd.accepted_schedules == ("uniform",)
    assert lcm.options == ()
    (eta,) = tcd.options
    assert (eta.name, eta.default, eta.low, eta.high, eta.infotext) == ("eta", 0.3, 0.0, 1.0, "Eta TCD")
    assert dict(make_plan(tcd, 4).options) == {"eta": 0.3}
    assert dict(make_plan(tcd, 4, options={"eta": 0}).options) == {"eta": 0.0}      # 0 is taken literally
    assert dict(make_plan(lcm, 4, options={"eta": 0}).options) == {}                # neutral for LCM
    with pytest.raises(ValueError, match="has no option eta"):
        make_plan(lcm, 4, options={"eta": 0.3})
    with pytest.raises(ValueError, match="eta"):
        make_plan(tcd, 4, options={"eta": 1.5})
    with pytest.raises(ValueError, match="no schedule type 'Karras'"):
        resolve_sampler("LCM", "Karras")


# ---- LCM-distilled UNets: the guidance embedding ----

LCM_UNET = dataclasses.replace(TINY_UNET, time_cond_proj_dim=256)
COND_KEY = PREFIX["unet"] + "time_embedding.cond_proj.weight"


@pytest.fixture(scope="module")
def lcm_state_dict():
    return random_state_dict(unet=LCM_UNET, seed=3)


def reference_lcm_unet(sd) -> UNet2DConditionModel:
    """diffusers' UNet2DConditionModel(time_cond_proj_dim=256): its LDM converter for everything but the
    guidance projection, which it has no rule for (it keeps diffusers' name in single files)."""
    config = diffusers_unet_config(LCM_UNET) | {"time_cond_proj_dim": 256}
    state = convert_ldm_unet_checkpoint({k: v for k, v in sd.items() if k != COND_KEY}, config)
    state["time_embedding.cond_proj.weight"] = sd[COND_KEY]
    model = UNet2DConditionModel(**config)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("dim", [256, 7])
def test_guidance_embedding_matches_diffusers(dim):
    w = torch.tensor([0.0, 1.0, 7.0, 7.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    assert torch.equal(guidance_embedding(w, dim), ref)


def test_lcm_unet_matches_diffusers(lcm_state_dict):
    ours = engine_models(lcm_state_dict, dataclasses.replace(TINY, unet=LCM_UNET)).unet
    ref = reference_lcm_unet(lcm_state_dict)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t, w = torch.tensor([999.0, 259.0]), torch.tensor([7.0, 0.5])
    with torch.no_grad():
        got = ours(x, t, ctx, timestep_cond=guidance_embedding(w, 256))
        want = ref(x, t.long(), ctx, timestep_cond=guidance_embedding(w, 256)).sample
        other_w = ours(x, t, ctx, timestep_cond=guidance_embedding(torch.tensor([1.0, 1.0]), 256))
    assert rel_err(got, want) <= TOL
    assert rel_err(other_w, got) > 0.01      # the embedding does change the prediction


def test_lcm_checkpoint_is_detected_and_loaded(lcm_state_dict, tmp_path):
    path = tmp_path / "lcm-tiny.safetensors"
    save(lcm_state_dict, path, metadata=tiny_metadata())    # the metadata records the plain tiny UNet
    _, unet, _, _ = load_models(path, device="cpu", dtype=torch.float32)
    assert unet.cfg.time_cond_proj_dim == 256
    assert torch.equal(unet.time_embed.cond_proj.weight, lcm_state_dict[COND_KEY])
    x, ctx = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 32)
    with pytest.raises(ValueError, match="LCM-distilled: it takes its guidance scale as an input"):
        unet(x, 999.0, ctx)
    plain = UNet(TINY_UNET)
    with pytest.raises(ValueError, match="only for LCM-distilled UNets"):
        plain(x, 999.0, ctx, timestep_cond=torch.zeros(1, 256))


def test_cond_proj_of_the_wrong_width_is_refused(lcm_state_dict, tmp_path):
    sd = dict(lcm_state_dict)
    sd[COND_KEY] = torch.zeros(16, 256)       # must project to the 32-wide timestep sinusoid
    path = tmp_path / "bad.safetensors"
    save(sd, path, metadata=tiny_metadata())
    with pytest.raises(CheckpointError, match="time_embedding.cond_proj.weight"):
        load_models(path, device="cpu", dtype=torch.float32)


def test_embedded_guidance_reproduces_latent_consistency_pipeline(tiny_state_dict, lcm_state_dict):
    """Our LCM sampler over `embedded_guidance` vs diffusers' LatentConsistencyModelPipeline on the same
    tiny LCM UNet, 4 steps, w = 8 (its README's), latents given, same generator: one UNet call per step."""
    ref_models = reference_models(tiny_state_dict, TINY)
    ref_unet = reference_lcm_unet(lcm_state_dict)
    pipe = LatentConsistencyModelPipeline(vae=ref_models.vae, text_encoder=ref_models.text_encoder, tokenizer=None,
                                          unet=ref_unet, scheduler=scheduler("lcm"), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(SHAPE, generator=g)
    ref = pipe(prompt_embeds=cond, num_inference_steps=4, guidance_scale=8.0, latents=latents.clone(),
               generator=g, output_type="latent", height=64, width=64).images
    ref_next = torch.randn(1, generator=g)

    ours_unet = engine_models(lcm_state_dict, dataclasses.replace(TINY, unet=LCM_UNET)).unet
    calls = []
    model = embedded_guidance(ours_unet, cond, 8.0)
    counted = lambda x, call: calls.append(len(x)) or model(x, call)      # noqa: E731
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=g)
    with torch.no_grad():
        ours = list(sample(make_plan(resolve_sampler("lcm"), 4), counted, noise, source=GeneratorNoise(g)))[-1]
    assert calls == [2, 2, 2, 2]                 # one pass of the batch per step: no CFG batch
    assert rel_err(ours, ref) <= TOL
    assert torch.equal(torch.randn(1, generator=g), ref_next)
