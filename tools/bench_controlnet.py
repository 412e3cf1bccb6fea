"""What a ControlNet costs per step: a full-size SD1.5 UNet step with and without a full-size ControlNet.

    python -m tools.bench_controlnet --workdir /tmp/sd15bench [--dtype float32] [--repeats 3] [--no-diffusers]

Random full-size SD1.5 weights and a random full-size ControlNet (SD1.5's encoder copy and hint network,
~361 M parameters) written as a pruned .safetensors and loaded by `sd15.load_controlnet`. One step is a
guided UNet call of CFG batch 2 at 64x64 latents (a 512² image), as the pipeline makes it; with the
ControlNet in balanced mode (both rows) and in "ControlNet is more important" mode (the conditional row
only). diffusers' UNet2DConditionModel + ControlNetModel on the same tensors in this process, unless
--no-diffusers. Medians of the repeats, interleaved engine by engine.
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import sd15.process

sd15.process.use_fast_memory()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import sd15  # noqa: E402
from sd15.models.config import ControlNetConfig  # noqa: E402
from sd15.models.demo import random_controlnet_state  # noqa: E402
from sd15.pipeline.control import Control, controlled  # noqa: E402
from sd15.sampling.denoiser import ModelCall  # noqa: E402
from sd15.sampling.guidance import guided  # noqa: E402
from tools.make_checkpoint import random_full_state_dict  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sd15bench"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "random-sd15-fp16.safetensors"
    if not ckpt.exists():
        save_file({k: v.half() for k, v in random_full_state_dict().items()}, str(ckpt))
    cn_path = args.workdir / "random-controlnet-fp16.safetensors"
    if not cn_path.exists():
        save_file({k: v.half() for k, v in random_controlnet_state(ControlNetConfig(), seed=3).items()}, str(cn_path))
    dtype = getattr(torch, args.dtype)
    pipe = sd15.load(ckpt, device="cpu", dtype=dtype)
    cn = sd15.load_controlnet(cn_path, pipe)
    params = sum(t.numel() for t in cn.net.parameters())
    print(f"ControlNet: {params / 1e6:.0f} M parameters; models in {args.dtype}; {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 64, 64, generator=g)
    cond, uncond = (torch.randn(1, 77, 768, generator=g).to(dtype) for _ in range(2))
    hint = torch.rand(1, 3, 512, 512, generator=g)
    call = ModelCall(sigma=1.0, t=500.0, step=0, steps=1)
    models = {"ours: step, no ControlNet": guided(pipe.unet, cond, uncond, 7.5)}
    for mode in ("balanced", "controlnet"):
        control = Control(cn, hint, mode=mode)
        models[f"ours: step + ControlNet ({mode})"] = guided(controlled(pipe.unet, (control,), [hint], 4),
                                                             cond, uncond, 7.5)

    ref_steps = {}
    if args.diffusers:
        from diffusers import ControlNetModel
        from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
        from safetensors.torch import load_file

        from sd15.files.checkpoint import read_state
        from tools.reference import diffusers_unet_config, reference_models
        _fmt, sd, _q = read_state(ckpt)
        ref_unet = reference_models(sd, dtype=dtype).unet
        del sd
        config = {k: v for k, v in diffusers_unet_config(pipe.unet.cfg).items()
                  if k in ("in_channels", "down_block_types", "block_out_channels", "layers_per_block",
                           "cross_attention_dim", "attention_head_dim", "use_linear_projection", "norm_num_groups")}
        ref_cn = ControlNetModel(**config)
        ref_cn.load_state_dict(convert_controlnet_checkpoint({k: v.float() for k, v in load_file(str(cn_path)).items()},
                                                             config))
        ref_cn = ref_cn.to(dtype).eval()
        xx, tt, cc, hh = torch.cat([x, x]).to(dtype), torch.full((2,), 500.0), torch.cat([uncond, cond]), \
            torch.cat([hint, hint]).to(dtype)

        def ref_plain():
            ref_unet(xx, tt, cc)

        def ref_control():
            down, mid = ref_cn(xx, tt, cc, hh, return_dict=False)
            ref_unet(xx, tt, cc, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        ref_steps = {"diffusers: step, no ControlNet": ref_plain, "diffusers: step + ControlNet": ref_control}

    rows: dict[str, list[float]] = {}
    runs = {name: (lambda m=m: m(x, call)) for name, m in models.items()} | ref_steps
    with torch.inference_mode():
        for fn in runs.values():
            fn()                                  # warm: prepacked weights, allocator
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                rows.setdefault(name, []).append(time.perf_counter() - start)
    base = statistics.median(rows["ours: step, no ControlNet"])
    print(f"{'':40s} {'median s':>9s} {'x no-CN':>8s}")
    for name, times in rows.items():
        m = statistics.median(times)
        print(f"{name:40s} {m:9.2f} {m / base:8.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
