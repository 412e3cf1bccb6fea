"""The reference implementation (docs/architecture.md, "Parity"): diffusers / transformers models holding the same tensors.

diffusers' `UNet2DConditionModel` and `AutoencoderKL` and transformers' `CLIPTextModel`, configured from
our config dataclasses, built on the meta device and filled with diffusers' own LDM converters
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`) applied to
an original-layout state dict. Those converters are an independent witness of the checkpoint layout:
if `sd15.models.keymap` is wrong, the two sets of models disagree.

    ref = reference_models(sd, configs)     # tests: the models share sd's tensors
    ref = reference_models(sd, configs, device="cuda", dtype=torch.float16)  # benchmark: cast while loading

Used by the tests (`tests/reference.py`) and by `tools.benchmark`. diffusers and transformers are
test/benchmark dependencies only: the engine (`sd15/`) never imports this module.
"""

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel

from sd15.models.config import TextEncoderConfig, UNetConfig, VAEConfig
from sd15.models.loading import Configs

# Merged checkpoints carry a `position_ids` buffer (sometimes broken floats); both sides ignore it.
POSITION_IDS = "text_model.embeddings.position_ids"


@dataclass
class Models:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module


# ---- config translation: our dataclasses -> diffusers / transformers keyword arguments ---------------

def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """SD1.5's `unet/config.json` for the defaults; the same translation for tiny configs."""
    levels = range(len(cfg.channel_mult))
    down = [("CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D") for i in levels]
    up = [("CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D") for i in reversed(levels)]
    return dict(
        sample_size=64, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult),
        down_block_types=tuple(down), up_block_types=tuple(up), mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=cfg.num_res_blocks,
        attention_head_dim=cfg.num_heads,       # sic: SD1.5's diffusers config names the head *count* so
        cross_attention_dim=cfg.context_dim, norm_num_groups=cfg.norm_groups, norm_eps=1e-5,
        act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
        center_input_sample=False, use_linear_projection=False, upcast_attention=False,
        transformer_layers_per_block=1,
    )


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    """SD1.5's `vae/config.json` for the defaults."""
    n = len(cfg.channel_mult)
    return dict(
        sample_size=512, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        latent_channels=cfg.latent_channels, block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.norm_groups, act_fn="silu",
        scaling_factor=0.18215,
    )


def clip_text_config(cfg: TextEncoderConfig, **overrides) -> CLIPTextConfig:
    """SD1.5's `text_encoder/config.json` (openai/clip-vit-large-patch14) for the defaults.

    bos/eos/pad ids are the published file's (0/2/1, pre-#24773); they only pick the pooled output,
    which SD does not use (tests check that `last_hidden_state` ignores them).
    """
    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_ratio * cfg.width,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  max_position_embeddings=cfg.max_length, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                  attention_dropout=0.0, dropout=0.0)
    return CLIPTextConfig(**(kwargs | overrides))


# ---- building ------------------------------------------------------------------------------------

def fill(model: torch.nn.Module, state_dict: dict, name: str, device=None, dtype=None) -> torch.nn.Module:
    """Load a meta-built `model` from `state_dict` (strict, no copy unless device/dtype ask for one)."""
    if device is not None or dtype is not None:   # cast one tensor at a time: no second full copy at once
        state_dict = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                      for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)   # raises on missing/unexpected keys
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{name}: tensors still on the meta device after loading: {left}")
    return model.eval().requires_grad_(False)


def reference_unet(sd: dict, cfg: UNetConfig, *, device=None, dtype=None) -> UNet2DConditionModel:
    config = diffusers_unet_config(cfg)
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    return fill(model, convert_ldm_unet_checkpoint(sd, config), "diffusers UNet", device, dtype)


def reference_vae(sd: dict, cfg: VAEConfig, *, device=None, dtype=None) -> AutoencoderKL:
    config = diffusers_vae_config(cfg)
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    return fill(model, convert_ldm_vae_checkpoint(sd, config), "diffusers VAE", device, dtype)


def reference_text_encoder(sd: dict, cfg: TextEncoderConfig, *, device=None, dtype=None,
                           **config_overrides) -> CLIPTextModel:
    with torch.device("meta"):
        model = CLIPTextModel(clip_text_config(cfg, **config_overrides))
    # The converter only strips `cond_stage_model.transformer.`; it leaves any `position_ids` in, and
    # that buffer is non-persistent in transformers (not a state_dict key), so drop it here.
    state = convert_ldm_clip_checkpoint(sd)
    state.pop(POSITION_IDS, None)
    if not hasattr(model, "text_model"):   # transformers >= 5.6 flattened CLIPTextModel (as diffusers handles)
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    # The non-persistent position_ids buffer was created on meta and load_state_dict does not touch it.
    embeddings = (model.text_model if hasattr(model, "text_model") else model).embeddings
    embeddings.position_ids = torch.arange(cfg.max_length, device=device)[None]
    return fill(model, state, "transformers CLIPTextModel", device, dtype)


def reference_models(sd: dict, configs: Configs = Configs(), *, device=None, dtype=None) -> Models:
    """diffusers/transformers models filled from an original-layout dict by diffusers' converters.

    Without device/dtype they share the dict's tensors; with them, each tensor is cast as it is loaded.
    """
    kw = dict(device=device, dtype=dtype)
    return Models(reference_unet(sd, configs.unet, **kw), reference_vae(sd, configs.vae, **kw),
                  reference_text_encoder(sd, configs.text_encoder, **kw))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref| (the parity metric: relative to the reference's largest magnitude)."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ---- schedulers: diffusers' SD1.5 scheduler config, and the scheduler for each of our sampler names ----

SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)


SCHEDULERS = {  # our sampler name -> (diffusers scheduler class name, from_config overrides)
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_uniform": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler_exponential": ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    "dpmpp_2m_exponential": ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}),
    # -- ODE samplers in σ space --
    # -- SDE samplers --
    "dpmpp_2m_sde_uniform": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "dpmpp_2m_sde_exponential": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                 "use_exponential_sigmas": True}),
    "dpmpp_2m_sde_heun_uniform": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                  "solver_type": "heun"}),
    "dpmpp_2m_sde_heun_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                 "solver_type": "heun", "use_karras_sigmas": True}),
    "dpmpp_2m_sde_heun_exponential": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                                      "solver_type": "heun",
                                                                      "use_exponential_sigmas": True}),
    # -- multistep VP samplers --
    # -- consistency samplers --
}


def reference_scheduler(name: str):
    """What users do: DDIMScheduler(**SD15 config), then X.from_config(its config) for the others."""
    import diffusers
    cls, overrides = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(diffusers.DDIMScheduler(**SD15_SCHEDULER).config, **overrides)


def reference_pipeline(models: Models, sampler: str = "dpmpp_2m_karras"):
    """diffusers' StableDiffusionPipeline over `models` (no tokenizer: callers pass prompt_embeds)."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=None,
                                   unet=models.unet, scheduler=reference_scheduler(sampler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
