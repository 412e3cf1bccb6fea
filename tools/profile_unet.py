"""Where our time goes: torch.profiler over one UNet step (CFG batch 2, 64x64 latents) or one 512² VAE
decode, summed by operator, beside `tools/anchors/openvino_profile.py` (OpenVINO's, the same shapes).

    python -m tools.profile_unet --ckpt /tmp/sd15bench/random-sd15-fp16.safetensors --threads 1
    python -m tools.profile_unet --ckpt ... --dtype bfloat16 --model decoder

One warm-up call (it prepacks the conv weights), then one timed call without the profiler and one with it;
the table is the profiled call's self CPU time per operator (the profiler adds some overhead, mostly on
the many small ops: compare shares, and the unprofiled time above the table). Huge pages on, as the CLI has.
"""

import argparse
import time
from pathlib import Path

import sd15.process

sd15.process.use_fast_memory()

import torch  # noqa: E402

import sd15  # noqa: E402

GROUPS = {   # operator -> what it is in the model
    "mkldnn::_convolution_pointwise": "convolution (oneDNN, prepacked)",
    "mkldnn::_linear_pointwise": "matmul (oneDNN): projections, feed-forward, attention chunks",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention (SDPA flash kernel)",
    "aten::_softmax": "softmax (attention chunks)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--model", choices=["unet", "decoder"], default="unet")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: compare CPU time)")
    p.add_argument("--rows", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    pipe = sd15.load(args.ckpt, device="cpu", dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    if args.model == "unet":
        x = torch.randn(2, 4, 64, 64, generator=gen).to(dtype)
        ctx = torch.randn(2, 77, pipe.unet.cfg.context_dim, generator=gen).to(dtype)
        t = torch.tensor([500.0, 500.0])
        call = lambda: pipe.unet(x, t, ctx)                   # noqa: E731
    else:
        z = torch.randn(1, 4, 64, 64, generator=gen).to(dtype)
        call = lambda: pipe.vae.decode(z)                     # noqa: E731
    with torch.inference_mode():
        call()
        cpu, wall = time.process_time(), time.perf_counter()
        call()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"sd15 {args.model}, {args.dtype}, {args.threads} thread(s): unprofiled {wall:.3f} s wall, {cpu:.3f} s CPU; "
          f"profiled ops {total:.3f} s")
    print(f"{'operator':<52}{'s':>9}{'share':>8}{'calls':>7}  what")
    for e in events[:args.rows]:
        seconds = e.self_cpu_time_total / 1e6
        print(f"{e.key:<52}{seconds:>9.3f}{seconds / total:>8.1%}{e.count:>7}  {GROUPS.get(e.key, '')}")


if __name__ == "__main__":
    main()
