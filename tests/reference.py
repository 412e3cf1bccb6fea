"""Reference models for parity tests: diffusers / transformers built from the same original-layout tensors.

The builders live in `tools/reference.py` (shared with `tools.benchmark`; docs/architecture.md, "Parity"); this module
re-exports them under the names the tests use, and adds what only tests need: the FULL/TINY config
sets, our own models built straight from a dict (`engine_models`), and the parity metric.

    sd = random_state_dict()                 # or random_full_state_dict(), or a real checkpoint's dict
    ref = reference_models(sd, TINY)         # .unet / .vae / .text_encoder, eval mode, no grad
    ours = engine_models(sd, TINY)

Both load with `load_state_dict(strict=True, assign=True)`, so a missing or stray key fails loudly and
the models share the dict's tensors (no copy: full size costs the dict's memory once, not three times).
"""

import torch

from sd15.models.loading import Configs
from sd15.models.text_encoder import TextEncoder
from sd15.models.unet import UNet
from sd15.models.vae import VAE
from sd15.models.demo import PREFIX, TINY_TEXT, TINY_UNET, TINY_VAE
from tools.reference import (POSITION_IDS, SCHEDULERS, SD15_SCHEDULER, Models, clip_text_config,
                             diffusers_unet_config, diffusers_vae_config, fill, reference_models, reference_scheduler,
                             reference_text_encoder, reference_unet, reference_vae, rel_err)
from sd15.models.keymap import text_key_map, unet_key_map, vae_key_map, vae_transforms
from sd15.files.remap import remap

__all__ = ["Configs", "FULL", "TINY", "Models", "POSITION_IDS", "reference_models", "reference_unet", "reference_vae",
           "reference_text_encoder", "diffusers_unet_config", "diffusers_vae_config", "clip_text_config",
           "engine_models", "component", "rel_err", "pixel_stats", "toy_eps", "recording", "SD15_SCHEDULER", "SCHEDULERS",
           "reference_scheduler", "diffusers_steps", "pipeline_components"]


FULL = Configs()                                  # sd15.models.loading's: the configs sd15.load builds with
TINY = Configs(TINY_UNET, TINY_VAE, TINY_TEXT)


def component(sd: dict, name: str) -> dict:
    """One component's tensors with the checkpoint prefix removed (`name`: unet, vae or text_encoder)."""
    prefix = PREFIX[name]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _engine(module_cls, cfg, sd: dict, name: str, key_map: dict, transforms=None) -> torch.nn.Module:
    with torch.device("meta"):
        model = module_cls(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    source = component(sd, name)
    source.pop(POSITION_IDS, None)            # docs/architecture.md, "Numerics": positions are always 0..76
    state = remap(source, key_map, shapes, component=name, transform_names=transforms)
    return fill(model, state, f"engine {name}")


def engine_models(sd: dict, configs: Configs = FULL) -> Models:
    """Our models from the same dict, through `sd15.files.remap` (what `sd15.models.loading` does for users)."""
    return Models(_engine(UNet, configs.unet, sd, "unet", unet_key_map(configs.unet)),
                  _engine(VAE, configs.vae, sd, "vae", vae_key_map(configs.vae), vae_transforms(configs.vae)),
                  _engine(TextEncoder, configs.text_encoder, sd, "text_encoder", text_key_map(configs.text_encoder)))


def pixel_stats(ours, ref) -> tuple[float, int, float]:
    """Two lists of PIL images: (fraction of identical uint8 values, max |difference|, PSNR in dB)."""
    import numpy as np
    a = np.stack([np.asarray(im, dtype=np.int16) for im in ours])
    b = np.stack([np.asarray(im, dtype=np.int16) for im in ref])
    assert a.shape == b.shape
    diff = np.abs(a - b)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return float(np.mean(diff == 0)), int(diff.max()), float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def toy_eps(x, t):
    """Deterministic stand-in for a UNet: depends on the input and on t (float, or a diffusers 0-d tensor)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.1 * x + torch.sin(t / 100) + 0.05 * torch.cos(3 * x)


def recording(model, log):
    """A (x, t) model as both sides call it: ours with a ModelCall, a reference loop with t; logs (x, t)."""
    from sd15.sampling import ModelCall

    def eps_model(x, t):
        t = t.t if isinstance(t, ModelCall) else t
        log.append((x.clone(), float(t)))
        return model(x, t)
    return eps_model


def pipeline_components(ref: Models, tokenizer) -> dict:
    """The components of a diffusers StableDiffusion*Pipeline from reference models (the scheduler is added
    per run, by `diffusers_steps`)."""
    return dict(vae=ref.vae, text_encoder=ref.text_encoder, unet=ref.unet, tokenizer=tokenizer,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def diffusers_steps(cls, components: dict, sampler: str, seed: int, **kwargs):
    """diffusers' pipeline `cls` built from `components` with the reference scheduler of our `sampler`, run
    with a CPU generator seeded `seed`: (its output, the latents after every step)."""
    pipe = cls(**components, scheduler=reference_scheduler(sampler))
    pipe.set_progress_bar_config(disable=True)
    steps = []

    def on_step_end(_pipe, _i, _t, tensors):
        steps.append(tensors["latents"].clone())
        return {}

    out = pipe(generator=torch.Generator().manual_seed(seed), callback_on_step_end=on_step_end, **kwargs)
    return out, steps
