"""Peak memory and time of a full-size SD1.5 VAE decode, tiled vs untiled (random weights, fp32, CPU).

    python -m tools.measure_vae_tiling 1024:untiled 1024:tiled 2048:tiled
    python -m tools.measure_vae_tiling 512:untiled 512:tiled --compare      # also max/mean |tiled - untiled|

Each SIZE:MODE runs in its own subprocess and reports that process's peak resident memory (ru_maxrss),
the resident memory just before decoding (weights, latents, the Python/torch runtime), and their
difference: what the decode itself needed. Untiled at 1024x1024 needs ~6 GB and a few minutes on two
cores; 2048x2048 untiled would need ~22 GB, so measure that only on a machine that has it.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def full_vae():
    from sd15.models.vae import VAE
    from sd15.models.demo import random_tensor

    vae = VAE().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, tensor in vae.state_dict().items():
            tensor.copy_(random_tensor(key, tuple(tensor.shape), gen))
    return vae


def image_like_latents(size: int, seed: int = 0) -> torch.Tensor:
    """Unscaled latents with structure at several scales, [1, 4, size/8, size/8]."""
    gen = torch.Generator().manual_seed(seed)
    n = size // 8
    coarse = F.interpolate(torch.randn(1, 4, max(1, n // 16), max(1, n // 16), generator=gen), size=(n, n), mode="bicubic")
    return (coarse + 0.5 * torch.randn(1, 4, n, n, generator=gen)) / 0.18215


def child(size: int, mode: str, refine: int, compare: bool) -> None:
    from sd15.models.vae_tiling import decode_tiled

    torch.set_grad_enabled(False)
    vae, z = full_vae(), image_like_latents(size)
    before = current_rss_bytes()
    start = time.perf_counter()
    images = vae.decode(z) if mode == "untiled" else decode_tiled(vae, z, refine=refine)
    seconds = time.perf_counter() - start
    result = dict(size=size, mode=mode, refine=refine if mode == "tiled" else None, seconds=round(seconds, 1),
                  rss_before_gb=before / 1e9, peak_rss_gb=peak_rss_bytes() / 1e9,
                  decode_gb=(peak_rss_bytes() - before) / 1e9, threads=torch.get_num_threads())
    if compare:
        ref = vae.decode(z)
        diff = (images - ref).abs()
        result.update(max_abs_err=diff.max().item(), mean_abs_err=diff.mean().item(), ref_std=ref.std().item())
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", default=["1024:untiled", "1024:tiled"], help="SIZE:MODE, MODE tiled|untiled")
    parser.add_argument("--refine", type=int, default=1, help="refine passes of the tiled decode (memory is the same)")
    parser.add_argument("--compare", action="store_true", help="also decode untiled in the tiled run and report errors")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, mode = args.child.split(":")
        return child(int(size), mode, args.refine, args.compare)
    for run in args.runs:
        size, mode = run.split(":")
        if mode not in ("tiled", "untiled") or not size.isdigit() or int(size) % 8:
            sys.exit(f"bad run {run!r}: expected SIZE:MODE with SIZE a multiple of 8 and MODE tiled or untiled")
        cmd = [sys.executable, "-m", "tools.measure_vae_tiling", "--child", run, "--refine", str(args.refine)]
        out = subprocess.run(cmd + (["--compare"] if args.compare else []), capture_output=True, text=True)
        print(out.stdout.strip() or f"{run}: failed (exit {out.returncode})\n{out.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
