"""Is int8 faster than sd15's float32 CPU fast path? Per-layer, whole UNet step, and image error.

    python -m tools.bench_int8 --only layers                  # single layers of SD1.5 shapes (~15 s)
    python -m tools.bench_int8 --only unet,image --ckpt /tmp/sd15bench/random-sd15-fp16.safetensors
    python -m tools.bench_int8 --repeats 9 --threads 2 --out int8.json      # everything

Without --ckpt the unet and image parts write a random full-size SD1.5 checkpoint
(`tools.make_checkpoint.random_full_state_dict`, fp16) to a temporary folder first.

layers: each row is one conv or linear layer of the SD1.5 UNet at 512x512 with classifier-free guidance (batch 2)
and random weights / activations. The baseline is our own float32 fast path (`sd15.models.blocks.Conv2d` /
`Linear`: prepacked oneDNN conv on channels-last input, oneDNN matmul), not plain F.conv2d. Against it:

  - int8 onednn: what Inductor's X86InductorQuantizer lowers to. Weights per-output-channel symmetric int8,
    prepacked once (`onednn.qconv_prepack` / `qlinear_prepack`); the activation quantised on every call,
    per tensor, asymmetric uint8 from its min/max (`torch.quantize_per_tensor_dynamic`, one native pass,
    then `int_repr`); float32 output with the weight and input scales folded in by oneDNN. The timing
    INCLUDES the quantisation of the input, which a real dynamic scheme cannot avoid.
  - int8 kernel only: the same oneDNN int8 call on an input quantised beforehand: the ceiling int8 could
    reach if quantisation were free (e.g. fused into the previous op).
  - dynamic (x86/fbgemm): `torch.ao.quantization.quantize_dynamic` on an nn.Linear (linear rows only).
  - bf16: our fast path in bfloat16 (weights and input in bf16), for reference.

Times are CPU time (`time.process_time`, steady under other load on a shared machine), variants alternated
within each repeat; the ratio column is the median of the per-repeat ratios to float32 (< 1: faster).
"rel err" is ||y - y_fp32|| / ||y_fp32|| on the same input.

unet: one full-size UNet step (CFG batch 2, 4x64x64 latents, 77 context tokens) of the float32 engine
against a copy made int8 by `sd15.models.int8.quantize_int8` and the UNet loaded in bfloat16, alternated,
CPU time, median of repeats.

image: txt2img 512x512, 4 steps of DPM++ 2M Karras, CFG 7.5, seed 42, with the UNet in float32, in int8
(`quantize_int8`) and the whole pipeline in bfloat16 (`sd15.load(dtype=torch.bfloat16)`), and the PSNR of
the int8 and bf16 images against the float32 one (8-bit RGB, 255 peak). Random weights give noise images;
the PSNR still measures how far each number format moves the same computation.
"""

import argparse
import json
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import sd15.process

sd15.process.use_fast_memory()          # as the CLI and tools.benchmark run (before torch is imported)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from sd15.models.blocks import Conv2d, Linear  # noqa: E402
from sd15.models.int8 import dequantize_int8, quantize_activation, activation_range, quantize_int8  # noqa: E402

# (name, in_ch, out_ch, kernel, batch, height, width): the convs that carry a UNet step's FLOPs.
CONV_LAYERS = [
    ("conv3x3 320@64x64", 320, 320, 3, 2, 64, 64),
    ("conv3x3 640@32x32", 640, 640, 3, 2, 32, 32),
    ("conv3x3 1280@16x16", 1280, 1280, 3, 2, 16, 16),
    ("conv3x3 1280@8x8", 1280, 1280, 3, 2, 8, 8),
    ("conv3x3 2560->1280@8x8", 2560, 1280, 3, 2, 8, 8),
]
# (name, rows, in_features, out_features): rows = batch x tokens.
LINEAR_LAYERS = [
    ("linear 8192x320->2560", 8192, 320, 2560),
    ("linear 2048x640->640", 2048, 640, 640),
    ("linear 512x1280->5120", 512, 1280, 5120),
]


def naive_quantize(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """torch's one-call dynamic quantiser plus a uint8 copy: the obvious way, for comparison. Its min/max
    reduction takes the slow strided path on channels-last input (see `activation_range`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)
    return q.int_repr(), q.q_scale(), q.q_zero_point()


def int8_variants(layer: nn.Module, x: torch.Tensor) -> dict[str, Callable]:
    """The int8 ways to run `layer` on inputs like x (see the module docstring)."""
    int8 = deepcopy(layer)
    quantize_int8(int8, keep_float=())
    packed = int8._int8_weight()
    kernel = packed.conv if isinstance(layer, nn.Conv2d) else packed.linear
    scale, zp = activation_range(x)
    ready = (quantize_activation(x, scale, zp), scale, zp)
    return {"int8 sd15": int8,
            "int8 kernel only": lambda _x: kernel(*ready),
            "int8 naive quant": lambda x_: kernel(*naive_quantize(x_))}


def ao_dynamic_linear(linear: nn.Linear, engine: str) -> Callable | None:
    """torch.ao's dynamic-quantised Linear on `engine`, or None where this torch refuses it."""
    if engine not in torch.backends.quantized.supported_engines:
        return None
    plain = nn.Linear(linear.in_features, linear.out_features)
    plain.load_state_dict({"weight": linear.weight.detach(), "bias": linear.bias.detach()})
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmod = torch.ao.quantization.quantize_dynamic(nn.Sequential(plain), {nn.Linear}, dtype=torch.qint8)
    except Exception:                      # noqa: BLE001 — a removed API is a finding, not a crash
        return None
    finally:
        torch.backends.quantized.engine = previous

    def run(x):
        saved = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            return qmod(x)
        finally:
            torch.backends.quantized.engine = saved
    return run


def bf16_variant(module: nn.Module) -> Callable | None:
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    copy = deepcopy(module).to(torch.bfloat16)

    def run(x):
        return copy(x.to(torch.bfloat16)).float()
    return run


def cpu_time(fn: Callable, x) -> float:
    start = time.process_time()
    fn(x)
    return time.process_time() - start


def compare(name: str, variants: dict[str, Callable], x, repeats: int) -> dict:
    """Alternate the variants repeat by repeat; float32 ('fp32') is the reference for time and error."""
    reference = variants["fp32"](x)
    errors = {}
    for label, fn in variants.items():
        y = fn(x).float()
        errors[label] = float((y - reference).norm() / reference.norm())
        fn(x)                                          # warm: caches, prepacks, page faults
    times = {label: [] for label in variants}
    for _ in range(repeats):
        for label, fn in variants.items():
            times[label].append(cpu_time(fn, x))
    ratios = {label: statistics.median(t / f for t, f in zip(times[label], times["fp32"])) for label in variants}
    return {"layer": name, "seconds": {k: statistics.median(v) for k, v in times.items()},
            "ratio": ratios, "rel_err": errors}


def conv_rows(repeats: int) -> list[dict]:
    rows = []
    for name, cin, cout, k, b, h, w in CONV_LAYERS:
        conv = Conv2d(cin, cout, k, padding=k // 2).eval()
        # UNet convs see SiLU outputs (>= -0.28): a small zero point, as in the model
        x = F.silu(torch.randn(b, cin, h, w)).contiguous(memory_format=torch.channels_last)
        variants = {"fp32": conv, **int8_variants(conv, x)}
        if (bf16 := bf16_variant(conv)) is not None:
            variants["bf16"] = bf16
        rows.append(compare(name, variants, x, repeats))
    return rows


def linear_rows(repeats: int) -> list[dict]:
    rows = []
    for name, m, kin, kout in LINEAR_LAYERS:
        linear = Linear(kin, kout).eval()
        x = torch.randn(m, kin)                        # transformer linears see LayerNorm outputs
        variants = {"fp32": linear, **int8_variants(linear, x)}
        for engine in ("x86", "fbgemm"):
            if (fn := ao_dynamic_linear(linear, engine)) is not None:
                variants[f"dynamic {engine}"] = fn
        if (bf16 := bf16_variant(linear)) is not None:
            variants["bf16"] = bf16
        rows.append(compare(name, variants, x, repeats))
    return rows


def print_table(rows: list[dict]) -> None:
    labels = []
    for row in rows:
        labels += [k for k in row["ratio"] if k not in labels and k != "fp32"]
    print("| layer | fp32 ms | " + " | ".join(f"{k} / fp32" for k in labels) + " | "
          + " | ".join(f"{k} rel err" for k in labels) + " |")
    print("|---|---:|" + "---:|" * (2 * len(labels)))
    for row in rows:
        ratios = [f"{row['ratio'][k]:.2f}" if k in row["ratio"] else "–" for k in labels]
        errs = [f"{row['rel_err'][k]:.1e}" if k in row["rel_err"] else "–" for k in labels]
        print(f"| {row['layer']} | {row['seconds']['fp32'] * 1e3:.1f} | " + " | ".join(ratios) + " | "
              + " | ".join(errs) + " |")


# ---- the whole model -----------------------------------------------------------------------------------

def random_checkpoint(folder: Path) -> Path:
    from tools.make_checkpoint import random_full_state_dict, save
    path = folder / "random-sd15-fp16.safetensors"
    save(random_full_state_dict(seed=0, dtype=torch.float16), path)
    return path


def unet_step_row(ckpt: Path, repeats: int) -> dict:
    """One CFG-batch UNet step: the float32 engine against an int8 copy, alternated, CPU time."""
    import sd15
    pipe = sd15.load(ckpt, device="cpu", dtype=torch.float32)
    fp32 = pipe.unet
    int8 = deepcopy(fp32)
    layers = quantize_int8(int8)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=gen)
    context = torch.randn(2, 77, fp32.cfg.context_dim, generator=gen)
    variants = {"fp32": lambda x_: fp32(x_, 500, context), "int8": lambda x_: int8(x_, 500, context)}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():   # the other opt-in: the whole UNet in bfloat16
        bf16 = sd15.load(ckpt, device="cpu", dtype=torch.bfloat16).unet
        variants["bf16"] = lambda x_: bf16(x_.bfloat16(), 500, context.bfloat16()).float()
    with torch.inference_mode():
        row = compare("UNet step, CFG batch 2x4x64x64", variants, x, repeats)
    row["int8_layers"] = layers
    return row


def psnr(a, b) -> float:
    """PSNR in dB of two 8-bit images (PIL), 255 peak."""
    import numpy as np
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def image_row(ckpt: Path) -> dict:
    """txt2img at one seed in float32, int8 UNet and bfloat16: seconds and PSNR against float32."""
    import sd15
    settings = dict(steps=4, sampler="DPM++ 2M Karras", guidance_scale=7.5, seed=42, width=512, height=512)
    prompt = "a lighthouse at dusk, oil painting"
    seconds, images = {}, {}

    def run(label, pipe):
        start = time.process_time()
        images[label] = pipe.txt2img(prompt, **settings)[0]
        seconds[label] = time.process_time() - start

    pipe = sd15.load(ckpt, device="cpu", dtype=torch.float32)
    run("fp32", pipe)
    quantize_int8(pipe.unet)
    run("int8", pipe)
    dequantize_int8(pipe.unet)
    del pipe
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        run("bf16", sd15.load(ckpt, device="cpu", dtype=torch.bfloat16))
    return {"layer": "txt2img 512x512, 4 steps DPM++ 2M Karras, seed 42", "seconds": seconds,
            "psnr_db": {k: psnr(v, images["fp32"]) for k, v in images.items() if k != "fp32"}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="layers,unet,image",
                        help="comma-separated parts: layers, conv, linear, unet, image (default: layers,unet,image)")
    parser.add_argument("--ckpt", type=Path, help="SD1.5 checkpoint for unet and image (default: a random one)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (median; default 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    if unknown := parts - {"layers", "conv", "linear", "unet", "image"}:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; use layers, conv, linear, unet, image")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    if args.ckpt is not None and not args.ckpt.is_file():
        parser.error(f"--ckpt {args.ckpt}: no such file")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), "
          f"{args.repeats} repeats, CPU time")
    result = {"torch": torch.__version__, "threads": args.threads}
    rows = []
    with torch.inference_mode():
        if parts & {"layers", "conv"}:
            rows += conv_rows(args.repeats)
        if parts & {"layers", "linear"}:
            rows += linear_rows(args.repeats)
    if rows:
        print_table(rows)
        result["layers"] = rows
    if parts & {"unet", "image"}:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = args.ckpt or random_checkpoint(Path(tmp))
            if "unet" in parts:
                row = result["unet"] = unet_step_row(ckpt, args.repeats)
                print(f"UNet step ({row['int8_layers']} int8 layers): fp32 {row['seconds']['fp32']:.2f} s; "
                      + "; ".join(f"{k} {row['seconds'][k]:.2f} s, {k}/fp32 {row['ratio'][k]:.2f}, "
                                  f"rel err {row['rel_err'][k]:.1e}" for k in row["ratio"] if k != "fp32"))
            if "image" in parts:
                row = result["image"] = image_row(ckpt)
                print("txt2img 512x512 4 steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in row["seconds"].items())
                      + "; PSNR vs fp32: " + ", ".join(f"{k} {v:.1f} dB" for k, v in row["psnr_db"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
