"""The three networks of SD 1.x (CLIP text encoder, UNet, VAE), their shared layers, and their loading.

Depends only on `sd15.files`; everything above (conditioning, sampling, the pipeline) uses these.
"""

from .config import TextEncoderConfig, UNetConfig, VAEConfig
from .loading import Configs, load_models
from .text_encoder import TextEncoder
from .unet import UNet, Residuals
from .vae import VAE

__all__ = ["Configs", "TextEncoderConfig", "UNetConfig", "VAEConfig", "TextEncoder", "UNet", "Residuals", "VAE",
           "load_models"]
