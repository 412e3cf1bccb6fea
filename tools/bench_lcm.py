"""Time to one 512x512 image on this machine: LCM-LoRA at 4 steps and CFG 1 against sd15's default (DPM++ 2M
Karras, 25 steps, CFG 7.5).

    python -m tools.bench_lcm --workdir /tmp/sd15bench [--size 512] [--repeats 1]

Random full-size SD1.5 weights and a random LoRA of LCM-LoRA's shape (rank 64, alpha 64, on what
diffusers' LCM-LoRA training script targets: attention, feed-forward, proj_in/out, the resnets' convs and
time_emb_proj, the down/upsampler convs; about 67 M parameters, as the published file), kohya names. Each
row is a whole `pipe.generate` (text encoder, sampler, VAE decode), the LoRA merged in for the LCM row;
medians of `--repeats`. Random weights make noise images at the speed real weights run.
"""

import argparse
import statistics
import time
from pathlib import Path

import sd15.process

sd15.process.use_fast_memory()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import sd15  # noqa: E402
from sd15.adapters.names import module_index  # noqa: E402
from tools.make_checkpoint import random_full_state_dict  # noqa: E402

SKIPPED = ("input_blocks_0_0", "out_2", "time_embed_")   # conv_in, conv_out, the time MLP: not LCM-LoRA's


def lcm_lora(pipe, path: Path, rank: int = 64, names: dict[str, str] | None = None) -> int:
    """Write a random LoRA on LCM-LoRA's modules; returns its parameter count. Keys are kohya's, with LDM
    module names, or those `names` gives for them (LDM name -> another spelling, e.g. diffusers')."""
    index = module_index(pipe.unet.cfg, pipe.text_encoder.cfg)
    g = torch.Generator().manual_seed(0)
    tensors, count = {}, 0
    for name, (component, module_path) in index.modules.items():
        if component != "unet" or name.startswith(SKIPPED):
            continue
        module = pipe.unet.get_submodule(module_path)
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = module.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.01
        key = f"lora_unet_{(names or {}).get(name, name)}"
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        count += down.numel() + up.numel()
    save_file(tensors, str(path))
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sd15bench"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "random-sd15-fp16.safetensors"
    if not ckpt.exists():
        save_file({k: v.half() for k, v in random_full_state_dict().items()}, str(ckpt))
    loras = args.workdir / "loras"
    loras.mkdir(exist_ok=True)
    pipe = sd15.load(ckpt, device="cpu", lora_dirs=[loras])
    params = lcm_lora(pipe, loras / "lcm-lora-sdv1-5.safetensors")
    print(f"LCM-LoRA-shaped file: {params / 1e6:.1f} M parameters; {args.size}x{args.size}, float32, "
          f"{torch.get_num_threads()} threads", flush=True)
    runs = {
        "LCM-LoRA, LCM, 4 steps, CFG 1": sd15.Request("a lighthouse <lora:lcm-lora-sdv1-5:1>", sampler="lcm", steps=4,
                                                      guidance_scale=1.0, width=args.size, height=args.size, seed=1),
        "default: DPM++ 2M Karras, 25 steps, CFG 7.5": sd15.Request("a lighthouse", width=args.size,
                                                                     height=args.size, seed=1),
    }
    pipe.generate(sd15.Request("warm", steps=1, width=64, height=64, seed=0))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, request in runs.items():
            start = time.perf_counter()
            pipe.generate(request)
            times[name].append(time.perf_counter() - start)
            print(f"{name:>46}: {times[name][-1]:7.1f} s", flush=True)
    lcm, default = (statistics.median(v) for v in times.values())
    print(f"median: LCM-LoRA {lcm:.1f} s, default {default:.1f} s: {default / lcm:.1f}x faster to an image")


if __name__ == "__main__":
    main()
