"""What a LoRA costs: switching it in and out of a full-size model, and a UNet step with it.

    python -m tools.bench_lora --workdir /tmp/sd15bench [--rank 32] [--dtype float32] [--repeats 3]

Random full-size SD1.5 weights and a random kohya LoRA of the usual shape (the 192 UNet transformer
modules and the 72 text-encoder modules, rank `--rank`). Reports medians of:
  - merge: entering `adapters.merged` (ΔW of every module in float32, one rounding, new weights set) and
    leaving it (the original tensors put back);
  - on the fly: entering `adapters.on_the_fly`;
  - one UNet step (CFG batch 2, 64x64 latents) without a LoRA, with it merged, with it on the fly;
  - the same for diffusers + peft in this process on the same weights and file (`load_lora_weights`,
    `fuse_lora`, `unfuse_lora` + `unload_lora_weights`, a step with the adapter unfused and fused), unless
    --no-diffusers.
"""

import argparse
import re
import statistics
import time
from pathlib import Path

import sd15.process

sd15.process.use_fast_memory()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import sd15  # noqa: E402
from sd15.adapters import Use, merged, on_the_fly, read_adapter  # noqa: E402
from sd15.adapters.names import module_index  # noqa: E402
from tools.make_checkpoint import random_full_state_dict  # noqa: E402


def diffusers_spelling(ldm: str) -> str:
    """input_blocks_4_1_proj_in -> down_blocks_1_attentions_0_proj_in: civitai files (and the only kohya
    spelling diffusers reads) use diffusers' block names; SD1.5 has 2 resnets per level (3 per up level)."""
    if m := re.fullmatch(r"input_blocks_(\d+)_1_(.+)", ldm):
        n = int(m[1]) - 1
        return f"down_blocks_{n // 3}_attentions_{n % 3}_{m[2]}"
    if m := re.fullmatch(r"output_blocks_(\d+)_1_(.+)", ldm):
        n = int(m[1])
        return f"up_blocks_{n // 3}_attentions_{n % 3}_{m[2]}"
    return ldm.replace("middle_block_1_", "mid_block_attentions_0_")


def kohya_targets(index) -> list[tuple[str, str, str]]:
    """(kohya key prefix, component, our module) of what a standard kohya SD1.5 LoRA touches: the UNet
    transformers' Linear and 1x1 layers (192) and the text encoder's attention and MLP (72)."""
    out = []
    for name, (component, path) in index.modules.items():
        if component == "unet":
            hit = ("transformer_blocks" in name and ("attn" in name or "ff_net" in name)) or \
                name.endswith(("_1_proj_in", "_1_proj_out"))
            if hit:
                out.append(("lora_unet_" + diffusers_spelling(name), component, path))
        elif "self_attn" in name or "mlp_fc" in name:
            out.append(("lora_te_" + name, component, path))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sd15bench"))
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-steps", dest="steps", action="store_false",
                   help="switching times only (CPU half-precision UNet steps take minutes each)")
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false",
                   help="ours only (diffusers + peft are test extras)")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / "random-sd15-fp16.safetensors"
    if not ckpt.exists():
        save_file({k: v.half() for k, v in random_full_state_dict().items()}, str(ckpt))
    dtype = getattr(torch, args.dtype)
    pipe = sd15.load(ckpt, device="cpu", dtype=dtype)
    index = module_index(pipe.unet.cfg, pipe.text_encoder.cfg)

    # the LoRA: shapes from the modules it targets
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for prefix, component, path in kohya_targets(index):
        weight = (pipe.text_encoder if component == "text_encoder" else pipe.unet).get_submodule(path).weight
        tensors[prefix + ".alpha"] = torch.tensor(float(args.rank))
        tensors[prefix + ".lora_down.weight"] = torch.randn(args.rank, *weight.shape[1:], generator=g) / weight[0].numel() ** 0.5
        tensors[prefix + ".lora_up.weight"] = torch.randn(weight.shape[0], args.rank, *weight.shape[2:],
                                                         generator=g) * 0.01
    lora_path = args.workdir / f"random-lora-r{args.rank}.safetensors"
    save_file(tensors, str(lora_path))
    adapter = read_adapter(lora_path, index)
    print(f"LoRA: {len(adapter.modules)} modules, rank {args.rank}, {lora_path.stat().st_size / 2**20:.0f} MiB; "
          f"models in {args.dtype}; {torch.get_num_threads()} threads")

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    x = torch.randn(2, 4, 64, 64, generator=g).to(dtype)
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    t = torch.full((2,), 500.0)

    def step():
        with torch.inference_mode():
            pipe.unet(x, t, context)

    rows: dict[str, list[float]] = {}

    def record(name, seconds):
        rows.setdefault(name, []).append(seconds)

    ref = None
    if args.diffusers:
        from tools.reference import reference_models, reference_pipeline
        from sd15.files.checkpoint import read_state
        _fmt, sd, _quirks = read_state(ckpt)
        ref = reference_pipeline(reference_models(sd, dtype=dtype))
        del sd

    def ref_step():
        with torch.inference_mode():
            ref.unet(x, t, context)

    if args.steps:
        step()                                               # warm: prepacked weights, allocator
    if ref is not None and args.steps:
        ref_step()
    for _ in range(args.repeats):
        # ours: read the file, then merge it in (one rounding per weight) / out (originals put back)
        if args.steps:
            record("ours: step, no LoRA", timed(step))
        start = time.perf_counter()
        block = merged(pipe.text_encoder, pipe.unet, [Use(read_adapter(lora_path, index), 0.8, 0.8)])
        block.__enter__()
        record("ours: read + merge in", time.perf_counter() - start)
        if args.steps:       # the first step after a change re-lays-out (prepacks) the changed conv weights
            record("ours: first step, merged", timed(step))
            record("ours: step, merged", timed(step))
        record("ours: merge out", timed(lambda: block.__exit__(None, None, None)))
        start = time.perf_counter()
        block = on_the_fly(pipe.text_encoder, pipe.unet, [Use(read_adapter(lora_path, index), 0.8, 0.8)])
        block.__enter__()
        record("ours: read + on the fly in", time.perf_counter() - start)
        if args.steps:
            record("ours: step, on the fly", timed(step))
        record("ours: on the fly out", timed(lambda: block.__exit__(None, None, None)))
        if ref is None:
            continue
        # diffusers + peft: load_lora_weights (adapter layers, unfused), fuse_lora, unfuse, unload
        if args.steps:
            record("diffusers: step, no LoRA", timed(ref_step))
        record("diffusers: load_lora_weights", timed(lambda: ref.load_lora_weights(str(lora_path),
                                                                                  adapter_name="bench")))
        ref.set_adapters(["bench"], adapter_weights=[0.8])
        if args.steps:
            record("diffusers: first step, unfused adapter", timed(ref_step))
            record("diffusers: step, unfused adapter", timed(ref_step))
        record("diffusers: fuse_lora", timed(lambda: ref.fuse_lora(lora_scale=1.0)))
        if args.steps:
            record("diffusers: first step, fused", timed(ref_step))
            record("diffusers: step, fused", timed(ref_step))
        record("diffusers: unfuse_lora + unload", timed(lambda: (ref.unfuse_lora(), ref.unload_lora_weights())))
    for name, values in rows.items():
        print(f"{name:>34}: {statistics.median(values):7.3f} s   ({', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
