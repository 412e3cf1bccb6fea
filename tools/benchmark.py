"""Speed and memory of the engine against diffusers on the same weights, measured in one run.

    python -m tools.benchmark                                   # random full-size SD1.5, CPU fp32
    python -m tools.benchmark --ckpt v1-5-pruned-emaonly.safetensors --steps 20 --out results.json
    python -m tools.benchmark --device cuda --compile           # fp16 on a GPU; torch.compile our UNet
    python -m tools.benchmark --only unet,decode --repeats 5

Without --ckpt it writes a random full-size checkpoint (`tools.make_checkpoint`) as fp16 safetensors,
plus an fp32 Lightning-style .ckpt for the load test, into a temporary folder. Both engines get the same
tensors: ours through `sd15.load`, diffusers through its own LDM converters (built here, lazily, so the
engine never imports diffusers). Timings alternate ours/diffusers repeat by repeat in this process, so
machine noise hits both; the ratio column is the median of the per-repeat ratios (< 1: we are faster).
Loads (to CPU) run each in a fresh subprocess that reports its peak resident memory (VmHWM) above the RSS
it had after importing torch and sd15.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import sd15
from tools.make_checkpoint import random_full_state_dict, save

PROMPT = "a photograph of an astronaut riding a horse"
SECTIONS = ("load", "unet", "decode", "encode", "text", "txt2img", "flops")


# ---- timing --------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all its threads) for one call."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def compare(name, ours, ref, *, repeats, device, warmup=True, check=None) -> dict:
    """Median times of `ours` and `ref`, alternating which runs first; ratio = median of per-repeat ratios.

    The CPU-time ratio is steadier than the wall-clock one when other processes share the machine.
    """
    print(f"  {name} ...", file=sys.stderr, flush=True)
    if warmup:
        timed(ours, device), timed(ref, device)
    t_ours, t_ref = [], []
    for r in range(repeats):
        pair = [(ours, t_ours), (ref, t_ref)]
        for fn, times in (pair if r % 2 == 0 else pair[::-1]):
            times.append(timed(fn, device))
    med = statistics.median
    row = dict(name=name, ours_s=med(w for w, _ in t_ours), diffusers_s=med(w for w, _ in t_ref),
               ratio=med(a[0] / b[0] for a, b in zip(t_ours, t_ref)),
               cpu_ratio=med(a[1] / b[1] for a, b in zip(t_ours, t_ref)),
               ours_all=t_ours, diffusers_all=t_ref)
    if check is not None:
        with torch.inference_mode():
            row["max_rel_diff"] = check()
    return row


def rel_diff(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---- the reference: diffusers / transformers on the same original-layout tensors ---------------------

def reference_models(sd, device, dtype):
    """diffusers UNet + VAE and transformers CLIP text model, filled by diffusers' LDM converters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2, attention_head_dim=8,
        cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)
    vae_cfg = dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4,
                   block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32,
                   scaling_factor=0.18215)
    text_cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, projection_dim=768)

    def fill(model, state):
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    with torch.device("meta"):
        unet, vae, text = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg), CLIPTextModel(text_cfg)
    unet = fill(unet, convert_ldm_unet_checkpoint(sd, unet_cfg))
    vae = fill(vae, convert_ldm_vae_checkpoint(sd, vae_cfg))
    clip = convert_ldm_clip_checkpoint(sd)
    clip.pop("text_model.embeddings.position_ids", None)          # ignored, as the engine does
    if not hasattr(text, "text_model"):                           # transformers >= 5.6 flattened the model
        clip = {k.removeprefix("text_model."): v for k, v in clip.items()}
    embeddings = (text.text_model if hasattr(text, "text_model") else text).embeddings
    embeddings.position_ids = torch.arange(77, device=device)[None]
    return unet, vae, fill(text, clip)


def reference_pipeline(unet, vae, text):
    """StableDiffusionPipeline with DPM++ 2M Karras under SD1.5's scheduler config (as tests build it)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)
    scheduler = DPMSolverMultistepScheduler.from_config(ddim.config, use_karras_sigmas=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- sections ------------------------------------------------------------------------------------

def peak_matmul_flops(device, dtype, n=4096, repeats=5) -> dict:
    """Best FLOP/s of an n x n x n matmul: torch.mm (MKL on CPU) and, on CPU, oneDNN's matmul."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    kernels = {"torch.mm": lambda: torch.mm(a, b)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        kernels["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    peaks = {}
    for name, fn in kernels.items():
        timed(fn, device)
        peaks[name] = 2 * n ** 3 / min(timed(fn, device)[0] for _ in range(repeats))
    return peaks


def counted_flops(fn) -> int:
    """FLOPs of one call (torch.utils.flop_counter: matmuls and convolutions; norms/elementwise not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return counter.get_total_flops()


def meta_flops() -> dict:
    """Counted on meta-device models: no weights, no compute, same ops."""
    from sd15.text_encoder import TextEncoder
    from sd15.unet import UNet
    from sd15.vae import VAE
    with torch.device("meta"):
        unet, vae, text = UNet(), VAE(), TextEncoder()
        x, ctx, t = torch.empty(2, 4, 64, 64), torch.empty(2, 77, 768), torch.empty(2)
        return {"unet": counted_flops(lambda: unet(x, t, ctx)),
                "decode": counted_flops(lambda: vae.decode(torch.empty(1, 4, 64, 64))),
                "encode": counted_flops(lambda: vae.encode_distribution(torch.empty(1, 3, 512, 512))),
                "text": counted_flops(lambda: text(torch.zeros(2, 77, dtype=torch.long)))}


LOAD_SNIPPET = r"""
import sys, time, torch, sd15
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = vm("VmRSS:")
start = time.perf_counter()
pipe = sd15.load(sys.argv[1], device="cpu", dtype=getattr(torch, sys.argv[2]))
loaded = time.perf_counter() - start
with torch.inference_mode():   # touch every page of every weight: mmap-backed tensors are read lazily
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        for p in m.parameters():
            p.reshape(-1)[::max(1, 4096 // p.element_size())].sum()
touched = time.perf_counter() - start
print(f"{base} {vm('VmHWM:')} {loaded} {touched}")
"""


def raw_read_seconds(path: Path, chunk=64 << 20) -> tuple[float, float]:
    """Plain reads of the whole file, after one read to warm the page cache: (into one reused 64 MiB buffer,
    into one fresh buffer of the file's size, which also pays for the new pages as a loader would)."""
    size = path.stat().st_size

    def read_reused():
        view = memoryview(bytearray(chunk))
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass

    def read_fresh():
        buf = torch.empty(size, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            view, done = memoryview(buf.numpy()), 0
            while done < size:
                done += f.readinto(view[done:done + chunk])

    read_reused()
    times = []
    for fn in (read_reused, read_fresh):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def load_rows(files: list[tuple[Path, str]], repeats: int) -> list[dict]:
    rows = []
    for path, dtype in files:
        print(f"  load {path.name} -> {dtype} ...", file=sys.stderr, flush=True)
        size = path.stat().st_size
        reads = [raw_read_seconds(path) for _ in range(2)]
        raw, fresh = min(r[0] for r in reads), min(r[1] for r in reads)
        runs = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, str(path), dtype], check=True,
                                 capture_output=True, text=True).stdout.split()
            base, hwm, loaded, touched = int(out[-4]), int(out[-3]), float(out[-2]), float(out[-1])
            runs.append((touched, loaded, hwm - base))
        touched, loaded, peak = sorted(runs)[len(runs) // 2]
        rows.append(dict(file=path.name, dtype=dtype, file_bytes=size, raw_read_s=raw, fresh_read_s=fresh, load_s=loaded,
                         load_touched_s=touched, ratio_to_read=touched / raw, peak_bytes=peak,
                         peak_to_file=peak / size))
    return rows


# ---- main ----------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0) \
        if os.path.exists("/proc/meminfo") else 0
    return dict(cpu=cpu, cores=os.cpu_count(), ram_bytes=mem, torch=torch.__version__, threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def prepare_files(args, tmp: Path) -> tuple[Path, list[tuple[Path, str]]]:
    """The checkpoint both engines use, and the (file, dtype) pairs for the load test."""
    if args.ckpt is not None:
        return args.ckpt, [(args.ckpt, "float16"), (args.ckpt, "float32")]
    ckpt, st = tmp / "random-sd15.ckpt", tmp / "random-sd15-fp16.safetensors"
    want_ckpt = "load" in args.only and not ckpt.exists()
    if want_ckpt or not st.exists():
        print(f"writing random full-size checkpoints to {tmp} ...", file=sys.stderr, flush=True)
        sd = random_full_state_dict(seed=0, dtype=torch.float32)
        if want_ckpt:
            save(sd, ckpt, lightning=True)
        if not st.exists():
            save({k: v.half() for k, v in sd.items()}, st)
        del sd
    files = [(st, "float16"), (st, "float32")] + ([(ckpt, "float32")] if ckpt.exists() else [])
    return st, files


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = dict(machine=machine(), device=str(device), dtype=str(dtype).removeprefix("torch."),
                   steps=args.steps, repeats=args.repeats, command=" ".join(sys.argv), rows=[])
    with tempfile.TemporaryDirectory(prefix="sd15-bench-") as tmp:
        path, load_files = prepare_files(args, args.workdir or Path(tmp))
        if "load" in args.only:          # before the big models exist in this process
            results["load"] = load_rows(load_files, args.load_repeats)
        if set(args.only) - {"load", "flops"}:
            results["rows"] = compare_models(args, path, device, dtype)
    if "flops" in args.only:
        counts = meta_flops()
        peak = peak_matmul_flops(device, dtype)
        results["flops"] = dict(peak_matmul=peak, counted=counts)
    return results


def compare_models(args, path, device, dtype):
    from weights_map.checkpoint import read_state
    print("loading both engines ...", file=sys.stderr, flush=True)
    pipe = sd15.load(path, device=device, dtype=dtype)
    _fmt, sd, _quirks = read_state(path)
    unet_ref, vae_ref, text_ref = reference_models(sd, device, dtype)
    del sd
    unet = pipe.unet
    if args.compile:
        if device.type == "cpu":        # inference only: let Inductor fold and prepack the weights
            import torch._inductor.config
            torch._inductor.config.freezing = True
        print("compiling our UNet (the first call compiles) ...", file=sys.stderr, flush=True)
        unet = pipe.unet = torch.compile(pipe.unet)
    gen = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["", PROMPT]).to(device)
    x = torch.randn(2, 4, 64, 64, generator=gen).to(device, dtype)
    t = torch.tensor([999.0, 999.0], device=device)
    ctx = torch.randn(2, 77, 768, generator=gen).to(device, dtype)
    z = torch.randn(1, 4, 64, 64, generator=gen).to(device, dtype)
    img = (torch.rand(1, 3, 512, 512, generator=gen) * 2 - 1).to(device, dtype)
    kw = dict(repeats=args.repeats, device=device)
    rows = []
    if "unet" in args.only:
        rows.append(compare("UNet step, CFG batch 2x4x64x64", lambda: unet(x, t, ctx),
                            lambda: unet_ref(x, t, ctx).sample,
                            check=lambda: rel_diff(unet(x, t, ctx), unet_ref(x, t, ctx).sample), **kw))
    if "decode" in args.only:
        rows.append(compare("VAE decode 512x512", lambda: pipe.vae.decode(z), lambda: vae_ref.decode(z).sample,
                            check=lambda: rel_diff(pipe.vae.decode(z), vae_ref.decode(z).sample), **kw))
    if "encode" in args.only:
        rows.append(compare("VAE encode 512x512", lambda: pipe.vae.encode_distribution(img),
                            lambda: vae_ref.encode(img).latent_dist,
                            check=lambda: rel_diff(pipe.vae.encode(img), vae_ref.encode(img).latent_dist.mean), **kw))
    if "text" in args.only:
        rows.append(compare("text encoder, batch 2", lambda: pipe.text_encoder(ids),
                            lambda: text_ref(ids).last_hidden_state,
                            check=lambda: rel_diff(pipe.text_encoder(ids), text_ref(ids).last_hidden_state), **kw))
    if "txt2img" in args.only:
        ref = reference_pipeline(unet_ref, vae_ref, text_ref)
        images = {}

        def ours():
            images["ours"] = pipe.txt2img(PROMPT, steps=args.steps, seed=0, sampler="DPM++ 2M Karras")[0]

        def theirs():   # the same work: the prompt through the text encoder, then the pipeline
            states = text_ref(ids).last_hidden_state
            images["ref"] = ref(prompt_embeds=states[1:], negative_prompt_embeds=states[:1], guidance_scale=7.5,
                                num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                                height=512, width=512).images[0]

        def pixels_diff():
            import numpy as np
            a, b = (np.asarray(images[k], dtype=np.int16) for k in ("ours", "ref"))
            return float(np.abs(a - b).max()) / 255

        rows.append(compare(f"txt2img 512x512, {args.steps} steps DPM++ 2M Karras", ours, theirs, warmup=False,
                            check=pixels_diff, **kw))
    return rows


def markdown(results: dict) -> str:
    m = results["machine"]
    out = [f"{m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM, torch {m['torch']}, "
           f"{m['threads']} threads; {results['device']} {results['dtype']}", ""]
    if results["rows"]:
        out += ["| measurement | ours (s) | diffusers (s) | ours / diffusers | same, CPU time | max rel. diff |",
                "|---|---:|---:|---:|---:|---:|"]
        for r in results["rows"]:
            out.append(f"| {r['name']} | {r['ours_s']:.3f} | {r['diffusers_s']:.3f} | **{r['ratio']:.2f}** | "
                       f"{r['cpu_ratio']:.2f} | {r.get('max_rel_diff', float('nan')):.1e} |")
        out.append("(txt2img: the last column is the largest pixel difference / 255 between the two images.)")
        unet = next((r for r in results["rows"] if r["name"].startswith("UNet")), None)
        if unet:
            out += ["", f"UNet it/s (CFG batch 2): ours {1 / unet['ours_s']:.3f}, diffusers {1 / unet['diffusers_s']:.3f}"]
        out.append("")
    if "load" in results:
        out += ["| load | file | raw read (s) | read to new memory (s) | sd15.load (s) | load + touch (s) | / raw read "
                "| peak RSS | / file |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["load"]:
            out.append(f"| {r['file']} -> {r['dtype']} | {r['file_bytes'] / 2**30:.2f} GiB | {r['raw_read_s']:.2f} | "
                       f"{r['fresh_read_s']:.2f} | "
                       f"{r['load_s']:.2f} | {r['load_touched_s']:.2f} | **{r['ratio_to_read']:.2f}** | "
                       f"{r['peak_bytes'] / 2**30:.2f} GiB | **{r['peak_to_file']:.2f}** |")
        out.append("")
    if "flops" in results:
        f = results["flops"]
        peaks = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in f["peak_matmul"].items())
        peak = max(f["peak_matmul"].values())
        out += [f"matmul peak (4096² x 4096², {results['dtype']}, GFLOP/s): {peaks}", "",
                "| component | counted GFLOP | ours (s) | ours GFLOP/s | % of best peak | diffusers GFLOP/s |",
                "|---|---:|---:|---:|---:|---:|"]
        names = {"unet": "UNet", "decode": "VAE decode", "encode": "VAE encode", "text": "text encoder"}
        for key, flops in f["counted"].items():
            row = next((r for r in results["rows"] if r["name"].startswith(names[key])), None)
            if row is None:
                out.append(f"| {names[key]} | {flops / 1e9:.0f} | | | | |")
                continue
            ours, ref = flops / row["ours_s"], flops / row["diffusers_s"]
            out.append(f"| {names[key]} | {flops / 1e9:.0f} | {row['ours_s']:.3f} | {ours / 1e9:.0f} | "
                       f"{100 * ours / peak:.0f}% | {ref / 1e9:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, help="a real SD1.x checkpoint (default: random full-size weights)")
    p.add_argument("--steps", type=int, default=4, help="txt2img steps (default 4: ~10 s per step on a small CPU)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed repeats per measurement")
    p.add_argument("--load-repeats", type=int, default=1, help="fresh-process loads per file")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of: {', '.join(SECTIONS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: fp16 on cuda, else fp32")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile our UNet (opt-in)")
    p.add_argument("--workdir", type=Path, help="keep the random checkpoints here and reuse them (default: a temp dir)")
    p.add_argument("--out", type=Path, help="also write the results as JSON")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if args.ckpt is not None and not args.ckpt.is_file():
        p.error(f"{args.ckpt}: no such file")
    results = run(args)
    print(markdown(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
