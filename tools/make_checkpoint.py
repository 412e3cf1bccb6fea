"""Write random-weight checkpoints in the original SD 1.x layout, for tests and for anyone without weights.

    python -m tools.make_checkpoint out.safetensors                 # tiny config (seconds, ~2 MB)
    python -m tools.make_checkpoint out.safetensors --full --dtype float16   # full SD1.5 size (~2 GB)
    python -m tools.make_checkpoint out.ckpt --lightning            # .ckpt with a Lightning-style wrapper

Full size takes its keys and shapes from `tools/sd15_ldm_keys.tsv` (the real checkpoint's table), not
from our models, so it is an independent check of the key map. Tiny checkpoints come from tiny engine
models written back through the inverted key map. The images they give are noise: the weights are random.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

from sd15.config import TextEncoderConfig, UNetConfig, VAEConfig
from weights_map.keymap import text_key_map, unet_key_map, vae_key_map, vae_transforms
from weights_map.remap import invert_map

KEY_TABLE = Path(__file__).with_name("sd15_ldm_keys.tsv")
PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
          "text_encoder": "cond_stage_model.transformer."}

# The tiny family used throughout the tests: every structural feature of SD1.5, a few MB in all.
TINY_UNET = UNetConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1),
                       num_heads=2, context_dim=32, norm_groups=8)
TINY_VAE = VAEConfig(channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8)
TINY_TEXT = TextEncoderConfig(width=32, num_layers=2, num_heads=4)


def tiny_metadata() -> dict[str, str]:
    from sd15.loader import Configs, configs_to_metadata
    return configs_to_metadata(Configs(TINY_UNET, TINY_VAE, TINY_TEXT))


def read_key_table(path: Path = KEY_TABLE) -> dict[str, tuple[int, ...]]:
    table = {}
    for line in path.read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        table[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return table


def random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Weights with fan-in scaling so activations stay O(1) through a deep random network."""
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    if "norm" in key and key.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return 0.05 * torch.randn(shape, generator=gen)


def random_full_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All 1,130 tensors of an SD1.5 checkpoint, random, original names."""
    gen = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, s, gen).to(dtype) for k, s in read_key_table().items()}


def random_state_dict(unet: UNetConfig = TINY_UNET, vae: VAEConfig = TINY_VAE, text: TextEncoderConfig = TINY_TEXT,
                      seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Original-layout tensors for any configs, built from the key map (tiny test checkpoints)."""
    from sd15.text_encoder import TextEncoder
    from sd15.unet import UNet
    from sd15.vae import VAE

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, model, key_map, transforms in (
            ("unet", UNet(unet), unet_key_map(unet), None),
            ("vae", VAE(vae), vae_key_map(vae), vae_transforms(vae)),
            ("text_encoder", TextEncoder(text), text_key_map(text), None)):
        engine = {k: random_tensor(k, tuple(v.shape), gen) for k, v in model.state_dict().items()}
        for key, tensor in invert_map(key_map, engine, transforms).items():
            out[PREFIX[name] + key] = tensor.to(dtype).contiguous()
    return out


def save(state_dict: dict[str, torch.Tensor], path: Path, lightning: bool = False,
         metadata: dict[str, str] | None = None) -> None:
    """safetensors for `.safetensors`, else a torch zip (optionally wrapped as Lightning writes it).

    `metadata` (safetensors only) records non-SD1.5 configs so `sd15.load` can rebuild tiny models.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state_dict, str(path), metadata=metadata)
        return
    payload = {"state_dict": state_dict, "global_step": 0, "epoch": 0} if lightning else state_dict
    torch.save(payload, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="file to write (.safetensors or .ckpt)")
    p.add_argument("--full", action="store_true", help="full SD1.5 size (1.07 B parameters) instead of tiny")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lightning", action="store_true", help="wrap .ckpt as {'state_dict': ..., 'global_step': ...}")
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; not overwriting it", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    if args.full:
        sd, metadata = random_full_state_dict(args.seed, dtype), None
    else:
        sd, metadata = random_state_dict(seed=args.seed, dtype=dtype), tiny_metadata()
    if args.out.suffix != ".safetensors" and metadata:
        print("note: a tiny .ckpt has no place for its config; load it with sd15.load(..., configs=TINY_CONFIGS)")
    save(sd, args.out, lightning=args.lightning, metadata=metadata)
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {args.out}: {len(sd)} tensors, {n:,} parameters, {args.dtype}, random weights "
          f"({'full SD1.5 size' if args.full else 'tiny config'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
