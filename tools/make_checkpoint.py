"""Write random-weight checkpoints in the original SD 1.x layout, for tests and for anyone without weights.

    python -m tools.make_checkpoint out.safetensors                 # tiny config (seconds, ~2 MB)
    python -m tools.make_checkpoint out.safetensors --full --dtype float16   # full SD1.5 size (~2 GB)
    python -m tools.make_checkpoint out.ckpt --lightning            # .ckpt with a Lightning-style wrapper

Full size takes its keys and shapes from `tools/sd15_ldm_keys.tsv` (the real checkpoint's table), not
from our models, so it is an independent check of the key map. Tiny checkpoints are `sd15.models.demo`'s
(tiny engine models written back through the inverted key map). The images they give are noise: the
weights are random.
"""

import argparse
import sys
from pathlib import Path

import torch

from sd15.models.demo import random_state_dict, random_tensor, tiny_metadata

KEY_TABLE = Path(__file__).with_name("sd15_ldm_keys.tsv")


def read_key_table(path: Path = KEY_TABLE) -> dict[str, tuple[int, ...]]:
    table = {}
    for line in path.read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        table[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return table


def random_full_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All 1,130 tensors of an SD1.5 checkpoint, random, original names."""
    gen = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, s, gen).to(dtype) for k, s in read_key_table().items()}


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
        print("note: a tiny .ckpt has no place for its head and group counts; load it with "
              "sd15.load(..., configs=sd15.models.demo.TINY)")
    save(sd, args.out, lightning=args.lightning, metadata=metadata)
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {args.out}: {len(sd)} tensors, {n:,} parameters, {args.dtype}, random weights "
          f"({'full SD1.5 size' if args.full else 'tiny config'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
