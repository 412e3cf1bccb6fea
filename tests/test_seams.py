"""The engine's seams for later features, each proven against an independent reference.

1. Text encoder: `clip_skip=k` equals transformers' CLIPTextModel `final_layer_norm(hidden_states[-k])`;
   `token_embeds` (textual inversion) equals the reference run with a fresh token whose embedding row is
   the vector, and a vector at position p changes positions >= p only (causal attention).
2. UNet: `residuals=Residuals(skips, mid)` equals diffusers' `down_block_additional_residuals` /
   `mid_block_additional_residual` (ControlNet's interface), odd sizes included.
3. Weight deltas (sd15.models.blocks): on-the-fly deltas equal the plain op with W + ΔW, on the CPU fast path
   and off it; a LoRA on a real tiny UNet equals diffusers' UNet built from a checkpoint with the LoRA merged;
   `merge_delta` rounds once and `restore_weight` is exact to the bit; deltas belong to the calling thread.
4. Denoiser (sd15.sampling.denoiser): the input scaling, timestep and ModelCall each sampler's model sees,
   and σ -> t off the grid, against diffusers' schedulers; `predicted_x0` against their pred_original_sample.

Metric: rel_err = max|ours - ref| / max|ref| (tests/reference.py); models are the tiny configs, float32, CPU.
"""

import copy
import math
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference import PREFIX, TINY, reference_scheduler, reference_text_encoder, reference_unet, rel_err
from sd15.models.blocks import Conv2d, Linear, cpu_fast_path, deltas_active, merge_delta, restore_weight
from sd15.models.unet import Residuals
from sd15.sampling import Denoiser, ModelCall, make_plan, predicted_x0, resolve_sampler
from sd15.sampling.schedule import timestep_at

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # diffusers + numpy 2

TOL = 1e-4          # model parity bound, as tests/test_parity_models.py
DELTA_TOL = 1e-5    # one layer (or one model) against itself with the delta folded into the weight
BOS, EOS = 49406, 49407


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prompt_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    """[batch, 77] ids: BOS, `length` random word ids, EOS padding (the shape SD's tokenizer gives)."""
    words = torch.randint(0, BOS, (batch, length), generator=gen(seed))
    pad = torch.full((batch, 76 - length), EOS)
    return torch.cat([torch.full((batch, 1), BOS), words, pad], dim=1)


# ==== 1. text encoder: clip_skip and token_embeds ======================================================

def reference_states(ref, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """A1111's clip skip k on transformers' model: final_layer_norm(hidden_states[-k])."""
    out = ref(ids, output_hidden_states=True)
    # hidden_states = (embeddings, layer 1, ..., layer N): [-k] is the output of layer N-k+1.
    assert len(out.hidden_states) == ref.config.num_hidden_layers + 1
    # transformers >= 5.6 flattened CLIPTextModel (no .text_model); older ones nest it.
    text_model = getattr(ref, "text_model", ref)
    states = text_model.final_layer_norm(out.hidden_states[-clip_skip])
    if clip_skip == 1:
        assert torch.equal(states, out.last_hidden_state)
    return states


@pytest.mark.parametrize("clip_skip", range(1, TINY.text_encoder.num_layers + 1))
@torch.inference_mode()
def test_clip_skip_matches_transformers_hidden_states(tiny_models, clip_skip):
    ref, ours = (m.text_encoder for m in tiny_models)
    ids = prompt_ids(3, 20, seed=clip_skip)
    assert rel_err(ours(ids, clip_skip=clip_skip), reference_states(ref, ids, clip_skip)) <= TOL


@torch.inference_mode()
def test_clip_skip_changes_the_output(tiny_models):
    ours = tiny_models[1].text_encoder
    ids = prompt_ids(1, 10, seed=0)
    assert rel_err(ours(ids, clip_skip=2), ours(ids, clip_skip=1)) > 0.01


@pytest.mark.parametrize("clip_skip", [0, -1, TINY.text_encoder.num_layers + 1])
def test_clip_skip_out_of_range_is_a_clear_error(tiny_models, clip_skip):
    ours = tiny_models[1].text_encoder
    layers = TINY.text_encoder.num_layers
    with pytest.raises(ValueError, match=rf"clip_skip must be an integer from 1 to {layers}.*got {clip_skip}"):
        ours(prompt_ids(1, 5, seed=0), clip_skip=clip_skip)


def test_more_than_max_length_tokens_is_an_error(tiny_models):
    ours = tiny_models[1].text_encoder
    ids = torch.cat([prompt_ids(1, 20, seed=0), torch.full((1, 1), EOS)], dim=1)      # 78 tokens
    with pytest.raises(ValueError, match="78 tokens.*at most 77"):
        ours(ids)
    with pytest.raises(ValueError, match="at most 77"):
        ours(ids, token_embeds=torch.zeros(1, 78, TINY.text_encoder.width))


@torch.inference_mode()
def test_token_embeds_of_the_table_is_the_plain_output(tiny_models):
    ours = tiny_models[1].text_encoder
    ids = prompt_ids(2, 30, seed=1)
    assert torch.equal(ours(ids, token_embeds=ours.token_embedding(ids)), ours(ids))


@pytest.fixture(scope="module")
def ti_vector():
    """A textual-inversion vector, scaled like the table's rows (fan-in init), for a fresh token."""
    return torch.randn(TINY.text_encoder.width, generator=gen(7)) * 0.5


@pytest.fixture(scope="module")
def reference_with_fresh_token(tiny_state_dict, ti_vector):
    """transformers' model whose vocabulary has one more token (id = vocab_size) embedding to `ti_vector`:
    what diffusers' load_textual_inversion does (resize the table, set the new row). CLIPTextModel takes
    only input_ids in transformers 5, so this is the reference for `token_embeds`."""
    cfg = TINY.text_encoder
    key = PREFIX["text_encoder"] + "text_model.embeddings.token_embedding.weight"
    sd = dict(tiny_state_dict)
    sd[key] = torch.cat([sd[key], ti_vector[None]])
    return reference_text_encoder(sd, cfg, vocab_size=cfg.vocab_size + 1), cfg.vocab_size


@pytest.mark.parametrize("clip_skip", [1, 2])
@pytest.mark.parametrize("p", [1, 5, 76])
@torch.inference_mode()
def test_token_embeds_textual_inversion(tiny_models, reference_with_fresh_token, ti_vector, p, clip_skip):
    ref, fresh_id = reference_with_fresh_token
    ours = tiny_models[1].text_encoder
    ids = prompt_ids(2, 40, seed=p)
    embeds = ours.token_embedding(ids)
    embeds[:, p] = ti_vector                       # what the conditioning stage does at the trigger word
    got = ours(ids, token_embeds=embeds, clip_skip=clip_skip)

    ref_ids = ids.clone()
    ref_ids[:, p] = fresh_id
    assert rel_err(got, reference_states(ref, ref_ids, clip_skip)) <= TOL

    # Causal attention: positions before p never see it (bit for bit); p and every later one do.
    plain = ours(ids, clip_skip=clip_skip)
    assert torch.equal(got[:, :p], plain[:, :p])
    assert (got[:, p:] != plain[:, p:]).any(dim=-1).all()


# ==== 2. UNet residuals (ControlNet) ==================================================================

def residual_shapes(cfg, batch: int, h: int, w: int) -> tuple[list[tuple], tuple]:
    """Shapes of the skips the way down saves (conv_in's, each ResBlock's, each downsample's) and of the mid
    block's output, worked out from the config (a stride-2 3x3 conv with padding 1 gives ceil(n/2))."""
    skips = [(batch, cfg.channels, h, w)]
    for i, mult in enumerate(cfg.channel_mult):
        width = cfg.channels * mult
        skips += [(batch, width, h, w)] * cfg.num_res_blocks
        if i < len(cfg.channel_mult) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            skips.append((batch, width, h, w))
    return skips, (batch, width, h, w)


def random_residuals(cfg, batch, h, w, seed, scale=1.0) -> Residuals:
    g = gen(seed)
    skips, mid = residual_shapes(cfg, batch, h, w)
    return Residuals(tuple(scale * torch.randn(s, generator=g) for s in skips), scale * torch.randn(mid, generator=g))


def unet_inputs(hw, seed=0, batch=2):
    g = gen(seed)
    return (torch.randn(batch, 4, *hw, generator=g), torch.tensor([10.0, 981.0])[:batch],
            torch.randn(batch, 77, TINY.unet.context_dim, generator=g))


def test_residual_shapes_match_num_skips(tiny_models):
    assert len(residual_shapes(TINY.unet, 1, 16, 16)[0]) == tiny_models[1].unet.num_skips


@pytest.mark.parametrize("hw", [(16, 16), (9, 13), (24, 8)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
@torch.inference_mode()
def test_unet_residuals_match_diffusers(tiny_models, hw):
    ref, ours = (m.unet for m in tiny_models)
    x, t, context = unet_inputs(hw)
    res = random_residuals(TINY.unet, 2, *hw, seed=1)
    got = ours(x, t, context, residuals=res)
    want = ref(x, t, context, down_block_additional_residuals=res.skips,
               mid_block_additional_residual=res.mid).sample
    assert rel_err(got, want) <= TOL
    # The residuals matter (so the comparison above can fail).
    assert rel_err(got, ours(x, t, context)) > 0.01


@torch.inference_mode()
def test_zero_residuals_are_no_residuals(tiny_models):
    ours = tiny_models[1].unet
    x, t, context = unet_inputs((9, 13))
    res = random_residuals(TINY.unet, 2, 9, 13, seed=0, scale=0.0)
    assert torch.equal(ours(x, t, context, residuals=res), ours(x, t, context))


@pytest.mark.parametrize("extra", [-1, 1])
@torch.inference_mode()
def test_wrong_number_of_skip_residuals_is_an_error(tiny_models, extra):
    ours = tiny_models[1].unet
    x, t, context = unet_inputs((8, 8))
    skips, mid = random_residuals(TINY.unet, 2, 8, 8, seed=0)
    skips = skips[:extra] if extra < 0 else skips + skips[-1:]
    n = ours.num_skips
    with pytest.raises(ValueError, match=f"{n + extra} skip residuals for a UNet with {n} skips"):
        ours(x, t, context, residuals=Residuals(skips, mid))


# ==== 3. weight deltas: on the fly, merged, restored, per thread =======================================

def seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill a module's parameters from a generator (fan-in scaled), so tests don't depend on global RNG."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return module.eval()


# path -> context: the CPU fast path (oneDNN; inference_mode gives float32 + no grad), oneDNN off, autograd on.
PATHS = {
    "fast": lambda: torch.inference_mode(),
    "no-onednn": lambda: torch.backends.mkldnn.flags(enabled=False),
    "grad": lambda: torch.enable_grad(),
}


CONVS = {  # name -> (in, out, kernel, stride, padding)
    "3x3": (8, 12, 3, 1, 1),
    "3x3-stride2": (8, 8, 3, 2, 1),
    "1x1": (8, 16, 1, 1, 0),
}


@pytest.mark.parametrize("path", PATHS)
def test_on_the_fly_dense_delta_linear(path):
    lin = seeded(Linear(24, 40), 0)
    x = torch.randn(2, 7, 24, generator=gen(1))
    dW = 0.1 * torch.randn(40, 24, generator=gen(2))
    want = F.linear(x.double(), (lin.weight + dW).double(), lin.bias.double())
    with PATHS[path](), deltas_active({lin: [lambda h: F.linear(h, dW)]}):
        assert cpu_fast_path(x) == (path == "fast")
        got = lin(x)
    assert rel_err(got.detach(), want) <= DELTA_TOL


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("path", PATHS)
def test_on_the_fly_dense_delta_conv(path, conv, with_residual):
    cin, cout, k, stride, pad = CONVS[conv]
    layer = seeded(Conv2d(cin, cout, k, stride=stride, padding=pad), 0)
    x = torch.randn(2, cin, 9, 11, generator=gen(1))
    dW = 0.1 * torch.randn(cout, cin, k, k, generator=gen(2))
    want = F.conv2d(x.double(), (layer.weight + dW).double(), layer.bias.double(), stride, pad)
    # The ResBlock path: conv2(h, residual=skip(x)). The delta belongs to the conv, before the residual.
    residual = torch.randn(want.shape, generator=gen(3)) if with_residual else None
    if with_residual:
        want = want + residual.double()
    with PATHS[path](), deltas_active({layer: [lambda h: F.conv2d(h, dW, None, stride, pad)]}):
        got = layer(x, residual=residual)
    assert rel_err(got.detach(), want) <= DELTA_TOL


@torch.inference_mode()
def test_several_deltas_on_one_module_add_up():
    lin = seeded(Linear(16, 16), 0)
    x = torch.randn(3, 16, generator=gen(1))
    d1, d2 = (0.1 * torch.randn(16, 16, generator=gen(s)) for s in (2, 3))
    with deltas_active({lin: [lambda h: F.linear(h, d1), lambda h: F.linear(h, d2)]}):
        got = lin(x)
    assert rel_err(got, F.linear(x.double(), (lin.weight + d1 + d2).double(), lin.bias.double())) <= DELTA_TOL


@torch.inference_mode()
def test_only_listed_modules_and_only_inside_the_context():
    a, b = seeded(Linear(16, 16), 0), seeded(Conv2d(4, 4, 3, padding=1), 1)
    x, img = torch.randn(3, 16, generator=gen(2)), torch.randn(1, 4, 6, 6, generator=gen(3))
    plain_a, plain_b = a(x), b(img)
    with deltas_active({a: [lambda h: torch.ones(h.shape[0], 16)]}):
        assert torch.equal(a(x), plain_a + 1)
        assert torch.equal(b(img), plain_b)          # not in the mapping: untouched
    assert torch.equal(a(x), plain_a)                # leaving the context removes the delta
    with deltas_active({}):
        assert torch.equal(a(x), plain_a)


class LoRA:
    """A rank-r delta ΔW = scale·up@down, applied on the fly the way LoRA runs it (two thin ops on x)."""

    def __init__(self, layer, rank: int, scale: float, seed: int):
        g = gen(seed)
        w = layer.weight
        fan_in = w[0].numel()
        # Conv LoRA (LoCon): down is a k×k conv to `rank` channels with the layer's stride/padding, up is 1×1.
        self.down = torch.randn(rank, *w.shape[1:], generator=g) / math.sqrt(fan_in)
        self.up = torch.randn(w.shape[0], rank, *([1] * (w.ndim - 2)), generator=g) / math.sqrt(rank)
        self.scale, self.layer = scale, layer

    def dense(self) -> torch.Tensor:
        return self.scale * (self.up.flatten(1) @ self.down.flatten(1)).reshape(self.layer.weight.shape)

    def __call__(self, x):
        if self.down.ndim == 2:
            return self.scale * F.linear(F.linear(x, self.down), self.up.flatten(1))
        c = self.layer
        return self.scale * F.conv2d(F.conv2d(x, self.down, None, c.stride, c.padding), self.up)


# Our module path in the UNet -> its key in the original (LDM) checkpoint layout, spelled out here (not taken
# from sd15's key map), so diffusers' converter places the merged weight independently of us.
LORA_TARGETS = {
    "down.0.attn.0.block.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",   # Linear
    "down.1.res.0.conv1": "input_blocks.3.0.in_layers.2.weight",                                    # 3x3 conv
    "mid.res1.conv2": "middle_block.0.out_layers.3.weight",                        # 3x3 conv, residual= path
}


@torch.inference_mode()
def test_lora_on_the_fly_equals_merged_and_diffusers_merged(tiny_models, tiny_state_dict):
    ours = tiny_models[1].unet
    layers = {name: ours.get_submodule(name) for name in LORA_TARGETS}
    loras = {name: LoRA(layer, rank=4, scale=0.8, seed=i) for i, (name, layer) in enumerate(layers.items())}
    x, t, context = unet_inputs((9, 13), seed=5)
    plain = ours(x, t, context)

    with deltas_active({layers[n]: [lora] for n, lora in loras.items()}):
        on_the_fly = ours(x, t, context)
    assert rel_err(on_the_fly, plain) > 0.01                       # the LoRA does something
    assert torch.equal(ours(x, t, context), plain)                 # and is gone after the context

    # Our merge: a private copy, so the session's shared model is never changed.
    merged = copy.deepcopy(ours)
    for name, lora in loras.items():
        merge_delta(merged.get_submodule(name), lora.dense())
    assert rel_err(on_the_fly, merged(x, t, context)) <= DELTA_TOL

    # diffusers' UNet from a checkpoint that has W + ΔW written into it.
    sd = dict(tiny_state_dict)
    for name, key in LORA_TARGETS.items():
        key = PREFIX["unet"] + key
        sd[key] = (sd[key].double() + loras[name].dense().double()).float()
    want = reference_unet(sd, TINY.unet)(x, t, context).sample
    assert rel_err(on_the_fly, want) <= TOL


def layer_of(kind: str, dtype: torch.dtype):
    layer = seeded(Linear(12, 20) if kind == "linear" else Conv2d(6, 10, 3, padding=1), 0)
    return layer.to(dtype)


def snapshot(module):
    """Each parameter object and a copy of its bytes."""
    return {n: (p, p.detach().clone().view(torch.uint8)) for n, p in module.named_parameters()}


def assert_as_snapshot(module, snap):
    now = dict(module.named_parameters())
    assert now.keys() == snap.keys()
    for name, (param, raw) in snap.items():
        assert now[name] is param, name
        assert torch.equal(now[name].detach().view(torch.uint8), raw), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_merge_rounds_once_and_restore_is_exact(kind, dtype):
    layer = layer_of(kind, dtype)
    before = snapshot(layer)
    w = layer.weight
    d1 = 0.01 * torch.randn(w.shape, generator=gen(1))
    d2 = 0.01 * torch.randn(w.shape, generator=gen(2))

    first = merge_delta(layer, d1)
    assert first is w and layer.weight is not w
    assert layer.weight.dtype == dtype and not torch.equal(layer.weight, w)
    assert torch.equal(layer.weight, (w.float() + d1).to(dtype))          # float32 sum, one rounding
    assert torch.equal(layer.bias, before["bias"][0])

    # Stacking two (two LoRAs merged in turn), then undoing them in reverse order.
    once = layer.weight
    second = merge_delta(layer, d2)
    assert second is once
    assert torch.equal(layer.weight, (once.float() + d2).to(dtype))
    restore_weight(layer, second)
    assert layer.weight is once
    restore_weight(layer, first)
    assert_as_snapshot(layer, before)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@torch.inference_mode()
def test_merge_and_restore_through_the_fast_path(kind):
    """The fast path keeps a prepacked copy of each conv weight: merging and restoring must not serve a stale one."""
    layer = layer_of(kind, torch.float32)
    x = torch.randn(2, 12, generator=gen(1)) if kind == "linear" else torch.randn(1, 6, 7, 9, generator=gen(1))
    assert cpu_fast_path(x)
    dW = 0.1 * torch.randn(layer.weight.shape, generator=gen(2))
    plain_op = F.linear if kind == "linear" else lambda h, w, b: F.conv2d(h, w, b, 1, 1)
    before = layer(x)
    original = merge_delta(layer, dW)
    merged = layer(x)
    assert rel_err(merged, plain_op(x.double(), (original + dW).double(), layer.bias.double())) <= DELTA_TOL
    restore_weight(layer, original)
    assert torch.equal(layer(x), before)


def test_deltas_belong_to_the_calling_thread():
    """Two threads with different deltas on one shared module, overlapping on a barrier many times, and the main
    thread with none: each sees its own result. The delta yields the GIL mid-forward to force interleaving."""
    lin = seeded(Linear(32, 32), 0)
    x = torch.randn(4, 32, generator=gen(1))
    dws = {"a": 0.5 * torch.randn(32, 32, generator=gen(2)), "b": 0.5 * torch.randn(32, 32, generator=gen(3))}
    with torch.inference_mode():
        want = {name: F.linear(x, lin.weight + dw, lin.bias) for name, dw in dws.items()} | {"none": lin(x)}

    def delta(dw):
        def fn(h):
            time.sleep(0)                       # let the other threads run between the lookup and the use
            return F.linear(h, dw)
        return fn

    rounds, barrier = 100, threading.Barrier(3, timeout=30)
    worst, errors = {name: 0.0 for name in want}, []

    def run(name):
        try:
            # Grad mode is per thread: each one enters inference mode itself (the fast path, as in serving).
            with torch.inference_mode():
                for _ in range(rounds):
                    barrier.wait()
                    if name == "none":
                        out = lin(x)
                    else:
                        with deltas_active({lin: [delta(dws[name])]}):
                            out = lin(x)
                    worst[name] = max(worst[name], rel_err(out, want[name]))
        except BaseException as e:              # fail the others fast instead of waiting out the barrier
            errors.append(e)
            barrier.abort()

    workers = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for w in workers:
        w.start()
    run("none")                                 # the main thread is the third party
    for w in workers:
        w.join()
    assert not errors, errors
    # a and b differ by far more than the bound, so a leak from one thread to another would show.
    assert rel_err(want["a"], want["b"]) > 0.1
    assert max(worst.values()) <= DELTA_TOL, worst


# ==== 4. the denoiser seam =============================================================================

class Recorder:
    """An ε-model that remembers what it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x_in, call):
        self.calls.append((x_in, call))
        return torch.zeros_like(x_in)


def fresh_scheduler(name: str, steps: int):
    """A diffusers scheduler for `name` with its timesteps set (fresh: scale_model_input keeps a step index)."""
    sched = reference_scheduler(name)
    sched.set_timesteps(steps)
    return sched


STEPS = 10


def test_denoiser_sigma_space_grid_points():
    plan = make_plan(resolve_sampler("euler_karras"), STEPS)
    model = Recorder()
    denoiser = Denoiser(model, plan)
    x = torch.randn(2, 4, 8, 8, generator=gen(0))
    ref_t = fresh_scheduler("euler_karras", STEPS).timesteps
    for i in range(STEPS):
        denoiser(x, i)
        x_in, call = model.calls[-1]
        sigma = float(plan.sigmas[i])
        assert call == ModelCall(sigma=sigma, t=float(plan.timesteps[i]), step=i, steps=STEPS)
        assert call.progress == i / STEPS
        # diffusers interpolates σ -> t in float32 (tests/test_samplers.py): a float32 ulp or so at t ~ 900.
        assert abs(call.t - float(ref_t[i])) <= 1e-4
        assert rel_err(x_in, x.double() / math.sqrt(sigma ** 2 + 1)) <= 1e-6
        sched = fresh_scheduler("euler_karras", STEPS)                     # diffusers' c_in (float32 σ)
        assert rel_err(x_in, sched.scale_model_input(x, ref_t[i])) <= 1e-6


def test_denoiser_vp_grid_points():
    plan = make_plan(resolve_sampler("ddim"), STEPS)
    model = Recorder()
    denoiser = Denoiser(model, plan)
    x = torch.randn(2, 4, 8, 8, generator=gen(0))
    ref_t = fresh_scheduler("ddim", STEPS).timesteps
    for i in range(STEPS):
        denoiser(x, i)
        x_in, call = model.calls[-1]
        assert torch.equal(x_in, x)                                       # the VP latent goes in as it is
        assert call == ModelCall(sigma=float(plan.sigmas[i]), t=float(ref_t[i]), step=i, steps=STEPS)
        assert call.progress == i / STEPS


def diffusers_log_sigmas() -> np.ndarray:
    """log σ table exactly as EulerDiscreteScheduler.set_timesteps builds it for `_sigma_to_t`."""
    sched = reference_scheduler("euler_karras")
    return np.log(np.array(((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5))


def off_grid_sigmas() -> list[float]:
    """Midpoints (in log σ, as Heun/DPM2 use) between the Karras grid's σs, plus values past both ends (clipped)."""
    s = make_plan(resolve_sampler("euler_karras"), STEPS).sigmas[:-1]
    mids = (s[:-1] * s[1:]).sqrt().tolist()
    return [*mids, 0.5, 3.7, 1e-3, 50.0]


@pytest.mark.parametrize("sampler", ["euler_karras", "ddim"])
def test_denoiser_off_grid_sigma(sampler):
    plan = make_plan(resolve_sampler(sampler), STEPS)
    model = Recorder()
    denoiser = Denoiser(model, plan)
    x = torch.randn(1, 4, 4, 4, generator=gen(0))
    sched, log_sigmas = reference_scheduler("euler_karras"), diffusers_log_sigmas()
    worst = 0.0
    for sigma in off_grid_sigmas():
        denoiser(x, 3, sigma=sigma)
        x_in, call = model.calls[-1]
        assert (call.sigma, call.step, call.steps) == (sigma, 3, STEPS)
        assert call.t == float(timestep_at(torch.tensor(sigma, dtype=torch.float64), plan.schedule))
        t_diffusers = float(sched._sigma_to_t(np.array([sigma]), log_sigmas)[0])
        t_kdiffusion = float(np.clip(np.interp(np.log(sigma), log_sigmas, np.arange(len(log_sigmas))), 0, 999))
        worst = max(worst, abs(call.t - t_diffusers), abs(call.t - t_kdiffusion))
        want = x if plan.sampler.vp else x.double() / math.sqrt(sigma ** 2 + 1)
        assert rel_err(x_in, want) <= 1e-6
    # diffusers' log σ table is float32, ours float64 from the same float32 ᾱ (measured: 1.8e-5).
    assert worst <= 1e-4, worst


@pytest.mark.parametrize("sampler", ["euler_karras", "ddim"])
@pytest.mark.parametrize("i", [0, 4, 9])
def test_predicted_x0_matches_diffusers(sampler, i):
    """x0 = x_σ − σ·ε from the model's input view: diffusers' pred_original_sample of one step (σ-space Euler
    from x_σ; DDIM from the VP latent, (x_t − sqrt(1−ᾱ)ε)/sqrt(ᾱ), the same thing in the other view)."""
    plan = make_plan(resolve_sampler(sampler), STEPS)
    sigma, t = float(plan.sigmas[i]), float(plan.timesteps[i])
    g = gen(i)
    x_sigma, eps = 3 * torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    x_in = x_sigma / math.sqrt(sigma ** 2 + 1)
    got = predicted_x0(x_in, eps, sigma)
    assert rel_err(got, x_sigma.double() - sigma * eps.double()) <= 1e-6

    sched = fresh_scheduler(sampler, STEPS)
    state = x_in if plan.sampler.vp else x_sigma            # each scheduler steps its own view
    want = sched.step(eps, sched.timesteps[i], state).pred_original_sample
    assert rel_err(got, want) <= 1e-5


# ---- input checks found while writing the above ----------------------------------------------------

def test_token_embeds_must_match_the_ids(tiny_models):
    te = tiny_models[1].text_encoder
    ids = torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        embeds = te.token_embedding(ids)
        for bad_ids, bad_embeds in ((ids[:, :1], embeds), (ids, torch.zeros(1, 6, te.cfg.width)),
                                    (ids, torch.zeros(2, 5, te.cfg.width))):
            with pytest.raises(ValueError, match="token_embeds must have shape"):
                te(bad_ids, token_embeds=bad_embeds)


@pytest.mark.parametrize("bad", [1.5, True, "2"])
def test_clip_skip_must_be_an_integer(tiny_models, bad):
    te = tiny_models[1].text_encoder
    with pytest.raises(ValueError, match="clip_skip must be an integer"):
        te(torch.zeros(1, 3, dtype=torch.long), clip_skip=bad)


def test_nested_delta_blocks_add_up():
    """Adapters for the UNet and for the text encoder may be entered separately: inner adds to outer."""
    torch.manual_seed(0)                        # the layer's init: fixed, so the figures below are too
    lin = Linear(4, 4)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    one = lambda t: torch.ones_like(t)          # noqa: E731
    with torch.no_grad():
        plain = lin(x)
        with deltas_active({lin: [one]}):
            with deltas_active({Linear(4, 4): []}):
                assert torch.equal(lin(x), plain + 1)              # the outer delta is still there
            with deltas_active({lin: [one]}):
                # both; (plain + 1) + 1 and plain + 2 may round apart in float32, so not bit for bit
                assert torch.allclose(lin(x), plain + 2, rtol=0, atol=1e-6) and not torch.allclose(lin(x), plain + 1)
            assert torch.equal(lin(x), plain + 1)
        assert torch.equal(lin(x), plain)


def test_residuals_must_have_each_tensor_s_shape_and_take_its_dtype(tiny_models):
    """A residual that would broadcast is refused by name; one in another dtype is cast (a float32
    ControlNet beside a bf16 UNet)."""
    unet = tiny_models[1].unet
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, unet.cfg.context_dim, generator=g)
    with torch.inference_mode():
        shapes = [s.shape for s in _skips(unet, x)]
        mid_shape = (1, unet.cfg.channels * unet.cfg.channel_mult[-1], 2, 2)
        bad = Residuals(tuple(torch.zeros(s[0], s[1], 1, 1) for s in shapes), torch.zeros(mid_shape))
        with pytest.raises(ValueError, match=r"skip residual 0 has shape \(1, 32, 1, 1\)"):
            unet(x, 500.0, ctx, residuals=bad)
        good = Residuals(tuple(torch.randn(s, generator=g) for s in shapes), torch.randn(mid_shape, generator=g))
        wide = Residuals(tuple(r.double() for r in good.skips), good.mid.double())
        assert torch.equal(unet(x, 500.0, ctx, residuals=wide), unet(x, 500.0, ctx, residuals=good))


def _skips(unet, x):
    """The skip tensors the way down saves, by running it (what a ControlNet's outputs must match)."""
    saved = []
    hooks = [level.res[i].register_forward_hook(lambda m, a, out: saved.append(out))
             for level in unet.down for i in range(len(level.res)) if not level.attn]
    hooks += [level.attn[i].register_forward_hook(lambda m, a, out: saved.append(out))
              for level in unet.down for i in range(len(level.attn))]
    hooks.append(unet.conv_in.register_forward_hook(lambda m, a, out: saved.append(out)))
    hooks += [level.resample.register_forward_hook(lambda m, a, out: saved.append(out))
              for level in unet.down if level.resample is not None]
    try:
        unet(x, 500.0, torch.zeros(1, 77, unet.cfg.context_dim))
    finally:
        for h in hooks:
            h.remove()
    return saved
