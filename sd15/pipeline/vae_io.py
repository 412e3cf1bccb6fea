"""The VAE ends of a generation: images -> posterior (img2img), latents -> images (every run).

Large images go through the tiled VAE (`models.vae_tiling`), only when an untiled pass would not fit
in half the free memory: tiling costs several times the time. A fp16/bf16 VAE that overflows to NaN
(the well-known black image) is decoded again by a float32 copy of it, made once per VAE and kept,
as A1111 keeps its VAE in float32 after the first NaN; the shared VAE itself is never changed.
"""

import copy
import logging
import os
import threading
import weakref

import torch

from ..models.latents import to_vae
from ..models.vae import VAE
from ..models.vae_tiling import decode_tiled, encode_distribution_tiled, should_tile

log = logging.getLogger("sd15")


def needs_tiles(vae: VAE, batch: int, height: int, width: int, element_size: int) -> bool:
    """Whether a pass of this size should be tiled. Where free memory cannot be read, vae_tiling's
    fixed budget decides."""
    device = next(vae.parameters()).device
    budget = {}
    if device.type == "cuda":  # free on the device plus what torch holds cached but unused
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = {"budget_bytes": (torch.cuda.mem_get_info(device)[0] + cached) // 2}
    elif device.type == "cpu" and hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        budget = {"budget_bytes": os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2}
    return should_tile(height, width, batch, cfg=vae.cfg, element_size=element_size, **budget)


def decode_raw(vae: VAE, z: torch.Tensor) -> torch.Tensor:
    """Unscaled latents -> images in about [-1, 1], tiled when needed; no NaN handling."""
    f = vae.cfg.downscale
    if needs_tiles(vae, z.shape[0], f * z.shape[-2], f * z.shape[-1], z.element_size()):
        return decode_tiled(vae, z)
    return vae.decode(z)


def encode_distribution(vae: VAE, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] -> posterior (mean, log-variance), tiled when needed."""
    if needs_tiles(vae, images.shape[0], *images.shape[-2:], images.element_size()):
        return encode_distribution_tiled(vae, images)
    return vae.encode_distribution(images)


# float32 copies of half-precision VAEs that overflowed, kept while the VAE lives, each with the identity
# of the parameters it was copied from (a replaced weight, e.g. a merged delta, makes a new copy)
_FLOAT32_COPIES: "weakref.WeakKeyDictionary[VAE, tuple[tuple[int, ...], VAE]]" = weakref.WeakKeyDictionary()
_COPY_LOCK = threading.Lock()


def float32_copy(vae: VAE) -> VAE:
    made_from = tuple(id(p) for p in vae.parameters())
    with _COPY_LOCK, torch.inference_mode(False):      # ordinary tensors, like the VAE's own
        entry = _FLOAT32_COPIES.get(vae)
        if entry is None or entry[0] != made_from:
            entry = _FLOAT32_COPIES[vae] = (made_from, copy.deepcopy(vae).float())
        return entry[1]


@torch.inference_mode()
def decode(vae: VAE, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion latents -> images in about [-1, 1]; a half-precision NaN is decoded again in float32."""
    dtype = next(vae.parameters()).dtype
    z = to_vae(latents).to(dtype)
    images = decode_raw(vae, z)
    if dtype != torch.float32 and not torch.isfinite(images).all():
        log.warning("the VAE produced NaNs in %s (black-image failure); decoding again in float32",
                    str(dtype).removeprefix("torch."))
        images = decode_raw(float32_copy(vae), z.float())
    return images
