"""Is there a cheaper 512² VAE decode than the float32 one? Times (median of --repeats, alternating) and
deviations of: the float32 decode; the tiled decode (`sd15.models.vae_tiling`, smaller tiles for the cache);
and a bfloat16 copy of the VAE, with the float32 decode as fallback when the bf16 output is not finite.

    python -m tools.bench_decode --ckpt /tmp/sd15bench/random-sd15-fp16.safetensors [--repeats 3] [--threads N]

Deviation: max |Δ| / max |fp32| of the decoder output, and the PSNR of the 8-bit image against the float32
one's. Random weights decode random latents into noise, at the speed real weights run; the PSNRs are
what random weights give, not a measure of a trained VAE's.
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import sd15.process

sd15.process.use_fast_memory()

import torch  # noqa: E402

import sd15  # noqa: E402
from sd15.models.vae_tiling import decode_tiled  # noqa: E402
from sd15.pipeline.images import tensor_to_pil  # noqa: E402
from tools.bench_int8 import psnr  # noqa: E402


def bf16_with_fallback(vae_bf16, vae_fp32):
    def decode(z):
        out = vae_bf16.decode(z.to(torch.bfloat16)).float()
        return out if torch.isfinite(out).all() else vae_fp32.decode(z)
    return decode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = sd15.load(args.ckpt, device="cpu", dtype=torch.float32)
    vae = pipe.vae
    vae_bf16 = copy.deepcopy(vae).to(torch.bfloat16)
    z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    variants = {
        "float32": vae.decode,
        "float32, tiles of 256 px (overlap 64)": lambda z: decode_tiled(vae, z, tile=32, overlap=8),
        "float32, tiles of 128 px (overlap 32)": lambda z: decode_tiled(vae, z, tile=16, overlap=4),
        "bfloat16, float32 fallback": bf16_with_fallback(vae_bf16, vae),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    outs = {}
    with torch.inference_mode():
        for fn in variants.values():
            fn(z)                                        # prepacks each variant's conv weights
        for r in range(args.repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                start = time.perf_counter()
                outs[name] = variants[name](z).float()
                times[name].append(time.perf_counter() - start)
    ref = outs["float32"]
    image = tensor_to_pil(ref)[0]
    print(f"VAE decode {args.size}x{args.size}, {torch.get_num_threads()} threads, median of {args.repeats}:")
    print(f"{'variant':<40}{'s':>8}{'/ fp32':>8}{'max rel diff':>14}{'PSNR dB':>9}")
    base = statistics.median(times["float32"])
    for name, ts in times.items():
        s = statistics.median(ts)
        diff = ((outs[name] - ref).abs().max() / ref.abs().max()).item()
        print(f"{name:<40}{s:>8.2f}{s / base:>8.2f}{diff:>14.1e}{psnr(tensor_to_pil(outs[name])[0], image):>9.1f}")


if __name__ == "__main__":
    main()
