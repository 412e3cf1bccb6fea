"""The one home of the SD 1.x latent scale.

The VAE's posterior has a standard deviation of about 1/0.18215 on the training images; the diffusion
model was trained on latents multiplied by this factor so they have roughly unit variance.
"""

import torch

LATENT_SCALE = 0.18215


def to_diffusion(vae_latents: torch.Tensor) -> torch.Tensor:
    return vae_latents * LATENT_SCALE


def to_vae(diffusion_latents: torch.Tensor) -> torch.Tensor:
    return diffusion_latents / LATENT_SCALE
