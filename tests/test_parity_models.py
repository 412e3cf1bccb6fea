"""Parity of the engine's text encoder, UNet and VAE with diffusers/transformers on the same tensors.

Both sides load one original-layout state dict: ours through `sd15.files` (key map + remap), the
reference through diffusers' own LDM converters (see `tests/reference.py`, docs/architecture.md, "Parity").

Metric: relative error = max|ours - ref| / max|ref| over the whole output tensor, in float32.
Bound: 1e-4 for every component, on the tiny configs and once at full SD1.5 size (random weights from
the real checkpoint's key table, small spatial sizes so the CPU run stays short).
"""

import gc

import pytest
import torch

from reference import (FULL, TINY, clip_text_config, diffusers_unet_config, diffusers_vae_config, engine_models,
                       reference_models, reference_text_encoder, rel_err)
from tools.make_checkpoint import random_full_state_dict

TOL = 1e-4
BOS, EOS = 49406, 49407
# "a photograph of an astronaut riding a horse" as SD1.5's tokenizer gives it, padded to 77 with EOS.
PROMPT_IDS = [BOS, 320, 8853, 539, 550, 18376, 6765, 320, 4558, EOS]


def token_ids(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([row + [EOS] * (77 - len(row)) for row in rows])


def random_prompt_ids(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    ids = torch.randint(0, BOS, (batch, length), generator=gen)
    return token_ids([[BOS, *row.tolist(), EOS] for row in ids])


@pytest.fixture(scope="module")
def full():
    """Full SD1.5 size, built once: ~4.3 GB of fp32 tensors shared by both sets of models (tiny ones live
    in conftest.py)."""
    sd = random_full_state_dict(seed=0)
    models = reference_models(sd, FULL), engine_models(sd, FULL)
    del sd
    yield models
    del models
    gc.collect()


# ---- text encoder --------------------------------------------------------------------------------

@torch.no_grad()
def test_text_encoder_tiny(tiny_models):
    ref, ours = tiny_models
    ids = torch.cat([token_ids([PROMPT_IDS, [BOS, EOS]]), random_prompt_ids(2, 75, torch.Generator().manual_seed(1))])
    err = rel_err(ours.text_encoder(ids), ref.text_encoder(ids).last_hidden_state)
    assert err <= TOL


@torch.no_grad()
def test_text_encoder_output_ignores_special_token_config(tiny_models, tiny_state_dict):
    """The reference's bos/eos/pad ids only choose the pooled output; SD uses all 77 hidden states."""
    ref, _ = tiny_models
    other = reference_text_encoder(tiny_state_dict, TINY.text_encoder, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    ids = token_ids([PROMPT_IDS])
    assert torch.equal(other(ids).last_hidden_state, ref.text_encoder(ids).last_hidden_state)


# ---- UNet ----------------------------------------------------------------------------------------

def _unet_case(models, shape, t, seed=0):
    ref, ours = models
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    context = torch.randn(shape[0], 77, ours.unet.cfg.context_dim, generator=gen)
    with torch.no_grad():
        return rel_err(ours.unet(x, t, context), ref.unet(x, t, context).sample)


@pytest.mark.parametrize("t", [0, 999, 500.5, torch.tensor(500.5)], ids=["t0", "t999", "t500.5", "tensor500.5"])
def test_unet_tiny_timesteps(tiny_models, t):
    assert _unet_case(tiny_models, (2, 4, 16, 16), t) <= TOL


def test_unet_tiny_per_sample_timesteps(tiny_models):
    assert _unet_case(tiny_models, (3, 4, 16, 16), torch.tensor([0.0, 500.5, 999.0])) <= TOL


@pytest.mark.parametrize("hw", [(16, 24), (24, 8), (9, 13), (7, 5)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_unet_tiny_spatial_sizes(tiny_models, hw):
    """Non-square and odd sizes: odd ones exercise the upsample-to-skip-size path (diffusers' upsample_size)."""
    assert _unet_case(tiny_models, (2, 4, *hw), torch.tensor([10.0, 981.0])) <= TOL


# ---- VAE -----------------------------------------------------------------------------------------

def _vae_encode_case(models, shape, seed=0):
    ref, ours = models
    images = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.vae.encode_distribution(images)
        posterior = ref.vae.encode(images).latent_dist
        assert torch.equal(ours.vae.encode(images), mean)
    return rel_err(mean, posterior.mean), rel_err(logvar, posterior.logvar)


def _vae_decode_case(models, shape, seed=0):
    ref, ours = models
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return rel_err(ours.vae.decode(latents), ref.vae.decode(latents).sample)


@pytest.mark.parametrize("hw", [(32, 32), (32, 48), (40, 24)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_vae_encode_tiny(tiny_models, hw):
    err_mean, err_logvar = _vae_encode_case(tiny_models, (2, 3, *hw))
    assert err_mean <= TOL and err_logvar <= TOL


@pytest.mark.parametrize("hw", [(4, 4), (4, 6), (5, 7)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_vae_decode_tiny(tiny_models, hw):
    assert _vae_decode_case(tiny_models, (2, 4, *hw)) <= TOL


@pytest.mark.parametrize("grad", [False, True], ids=["no-onednn", "grad-enabled"])
def test_plain_pytorch_path_tiny(tiny_models, grad):
    """The tests above run sd15's CPU fast path (oneDNN linears, prepacked channels-last convs, sd15.models.blocks).
    CUDA, half precision and autograd take the plain PyTorch ops instead: prove those agree too."""
    ref, ours = tiny_models
    gen = torch.Generator().manual_seed(3)
    x, context = torch.randn(2, 4, 9, 13, generator=gen), torch.randn(2, 77, ours.unet.cfg.context_dim, generator=gen)
    latents, images = torch.randn(1, 4, 5, 7, generator=gen), torch.rand(1, 3, 40, 24, generator=gen) * 2 - 1
    t = torch.tensor([10.0, 981.0])
    ids = token_ids([PROMPT_IDS])
    flags = torch.backends.mkldnn.flags(enabled=grad)        # grad on: the fast path steps aside by itself
    with flags, torch.set_grad_enabled(grad):
        pairs = [(ours.unet(x, t, context), ref.unet(x, t, context).sample),
                 (ours.vae.decode(latents), ref.vae.decode(latents).sample),
                 (ours.vae.encode(images), ref.vae.encode(images).latent_dist.mean),
                 (ours.text_encoder(ids), ref.text_encoder(ids).last_hidden_state)]
    for mine, theirs in pairs:
        assert rel_err(mine.detach(), theirs.detach()) <= TOL


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 on this CPU")
@torch.no_grad()
def test_bfloat16_fast_path_tiny(tiny_state_dict, tiny_models):
    """bf16 on CPU runs the oneDNN fast path too: no further from float32 than diffusers' bf16 models."""
    ref32 = tiny_models[0]
    sd16 = {k: v.to(torch.bfloat16) for k, v in tiny_state_dict.items()}
    ref16, ours16 = reference_models(sd16, TINY), engine_models(sd16, TINY)
    gen = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 4, 9, 13, generator=gen), torch.randn(2, 77, TINY.unet.context_dim, generator=gen)
    latents, t = torch.randn(1, 4, 5, 7, generator=gen), torch.tensor([10.0, 981.0])
    bf = torch.bfloat16
    with torch.profiler.profile() as prof:
        ours = [ours16.unet(x.to(bf), t, context.to(bf)), ours16.vae.decode(latents.to(bf))]
    ran = {e.key for e in prof.key_averages()}
    assert {"mkldnn::_convolution_pointwise", "mkldnn::_linear_pointwise"} <= ran   # the fast path ran
    theirs = [ref16.unet(x.to(bf), t, context.to(bf)).sample, ref16.vae.decode(latents.to(bf)).sample]
    exact = [ref32.unet(x, t, context).sample, ref32.vae.decode(latents).sample]
    for mine, diffusers_bf16, fp32 in zip(ours, theirs, exact):
        assert mine.dtype == bf
        # Measured over 4 seeds: ours 1.1e-2-2.1e-2, diffusers 1.5e-2-1.9e-2 (bf16 keeps 8 bits).
        assert rel_err(mine.float(), fp32) <= 1.5 * rel_err(diffusers_bf16.float(), fp32)
        assert rel_err(mine.float(), fp32) <= 0.05


# ---- full SD1.5 size: once per component, small spatial sizes --------------------------------------

@torch.no_grad()
def test_full_size_text_encoder_and_unet(full):
    ref, ours = full
    ids = token_ids([PROMPT_IDS, [BOS, EOS]])                   # a prompt and the empty (unconditional) one
    context = ref.text_encoder(ids).last_hidden_state
    assert rel_err(ours.text_encoder(ids), context) <= TOL
    x = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))   # one UNet call each: ~1 s idle
    t = torch.tensor([999.0, 500.5])
    assert rel_err(ours.unet(x, t, context), ref.unet(x, t, context).sample) <= TOL


def test_full_size_vae(full):
    err_mean, err_logvar = _vae_encode_case(full, (1, 3, 64, 64))
    assert err_mean <= TOL and err_logvar <= TOL
    assert _vae_decode_case(full, (1, 4, 8, 8)) <= TOL


# ---- the reference itself --------------------------------------------------------------------------

@torch.no_grad()
def test_checkpoint_position_ids_are_ignored(tiny_models, tiny_state_dict):
    """Merged checkpoints carry a float `position_ids` (docs/architecture.md, "Numerics"): both sides load and ignore it."""
    sd = dict(tiny_state_dict)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] * 0.99
    ids = token_ids([PROMPT_IDS])
    want = tiny_models[0].text_encoder(ids).last_hidden_state
    assert torch.equal(reference_text_encoder(sd, TINY.text_encoder)(ids).last_hidden_state, want)
    assert rel_err(engine_models(sd, TINY).text_encoder(ids), want) <= TOL


def test_reference_configs_are_sd15s():
    """The translation of our default configs gives the published SD1.5 diffusers/transformers configs."""
    unet = diffusers_unet_config(FULL.unet)
    assert unet | SD15_UNET == unet
    vae = diffusers_vae_config(FULL.vae)
    assert vae | SD15_VAE == vae
    text = clip_text_config(FULL.text_encoder).to_dict()
    assert text | SD15_TEXT == text


# Values from runwayml/stable-diffusion-v1-5's unet/, vae/ and text_encoder/ config.json (sizes that
# only matter to pipelines, like the VAE's sample_size, left out).
SD15_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, center_input_sample=False,
    sample_size=64)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu")
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1)
