"""`sd15.load`: a checkpoint file -> a ready `Pipeline`."""

from collections.abc import Sequence
from pathlib import Path

import torch

from ..adapters.library import Loras
from ..conditioning import CLIPTokenizer
from ..models.loading import Configs, load_models
from .pipeline import Pipeline


def load(path: str | Path, *, vae: str | Path | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None, ema: bool = False, configs: Configs | None = None,
         embedding_dirs: Sequence[str | Path] = (), lora_dirs: Sequence[str | Path] = ()) -> Pipeline:
    """Load an original SD 1.x checkpoint (.safetensors, .ckpt, legacy torch file) into a Pipeline.

    vae: a separate VAE file replacing the checkpoint's VAE. device: defaults to CUDA when available,
    else CPU. dtype: defaults to float16 on CUDA, float32 elsewhere. ema: take the EMA UNet weights when
    the file has them (the default follows diffusers and A1111: the regular weights).
    configs: model sizes; by default read from the file's tensors (see sd15.models.loading).
    embedding_dirs: folders of textual-inversion embeddings (every .pt/.bin/.safetensors below them; the
    ones that cannot be used are named in a warning). lora_dirs: folders <lora:name> tags find LoRA files in.
    Raises CheckpointError for any file that cannot or will not be loaded.
    """
    text_encoder, unet, vae_model, ckpt = load_models(path, vae=vae, device=device, dtype=dtype, ema=ema,
                                                      configs=configs)
    param = next(unet.parameters())
    pipe = Pipeline(tokenizer=CLIPTokenizer(), text_encoder=text_encoder, unet=unet, vae=vae_model,
                    device=param.device, dtype=param.dtype, checkpoint_path=Path(path),
                    vae_path=Path(vae) if vae is not None else None, quirks=list(ckpt.quirks),
                    loras=Loras(lora_dirs))
    for folder in embedding_dirs:
        pipe.embeddings.add_dir(folder)
    return pipe
