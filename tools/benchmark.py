"""Speed and memory of the engine against diffusers on the same weights, measured in one run.

    python -m tools.benchmark                                   # random full-size SD1.5, CPU fp32
    python -m tools.benchmark --ckpt v1-5-pruned-emaonly.safetensors --steps 20 --out results.json
    python -m tools.benchmark --only unet,decode --repeats 5 --size 768

On a GPU (fp16 by default; each timed sample is --inner 10 calls between two synchronizes):

    python -m tools.benchmark --device cuda --only unet,txt2img --steps 20 --repeats 5 --out gpu.json
    python -m tools.benchmark --device cuda --only unet,txt2img --steps 20 --repeats 5 --compile
    python -m tools.benchmark --device cuda --only unet,txt2img --steps 20 --repeats 5 --compile --compile-diffusers

Time to an image with LCM-LoRA (the `lcm` row: LCM sampler, 4 steps, CFG 1, a random LoRA of LCM-LoRA's shape
merged into both engines; see compare_lcm), beside the default 25-step DPM++ 2M Karras txt2img:

    python -m tools.benchmark --workdir /tmp/sd15bench --only lcm,txt2img --steps 25 --repeats 1

--compile goes through `Pipeline.compile()` ("max-autotune" on CUDA unless --compile-mode says otherwise);
--compile-diffusers compiles diffusers' UNet the same way, for the compiled-vs-compiled figure. Compiling
happens in each row's first call, reported apart as "first call" (minutes with max-autotune).

Without --ckpt it writes a random full-size checkpoint (`tools.make_checkpoint`) as fp16 safetensors,
plus an fp32 Lightning-style .ckpt for the load test, into a temporary folder. A tiny checkpoint
(`python -m tools.make_checkpoint tiny.safetensors`) works too: model sizes come from the configs the file
records, SD1.5's otherwise. Both engines get the same tensors: ours through `sd15.load`, diffusers
through its own LDM converters (`tools.reference`, imported only here: the engine never imports
diffusers). Timings alternate ours/diffusers repeat by repeat in this process, so machine noise hits
both; the ratio column is the median of the per-repeat ratios (< 1: we are faster). On CUDA each row
also records the peak memory each engine's calls allocated (torch.cuda.max_memory_allocated). Loads:
see `tools.bench_load`.

CPU comparison engines, each in its own venv (`bash tools/anchors/setup.sh DIR`; never sd15 dependencies),
join the same run on the same weights and inputs with --anchors DIR (`tools.bench_anchors`): OpenVINO
(fp32 IR converted from diffusers' modules; INFERENCE_PRECISION_HINT=f32 and its default) for the UNet,
decode, text and txt2img rows, stable-diffusion.cpp for txt2img. Each repeat times ours, diffusers, then
every anchor variant; an engine not installed is skipped with its reason. Keep --workdir so the IR is
converted once:

    python -m tools.benchmark --workdir /tmp/sd15bench --anchors /tmp/sd15-anchors --only unet,decode,text,txt2img
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sd15.process

MEMORY = sd15.process.use_fast_memory()   # our process (both engines): before torch is imported, as the CLI does
HUGE_PAGES = MEMORY["huge_pages"]

import sd15  # noqa: E402
import torch  # noqa: E402

from sd15.files.checkpoint import state_from_raw  # noqa: E402
from sd15.files.readers import read_checkpoint_file  # noqa: E402
from sd15.models.loading import Configs, configs_from_metadata  # noqa: E402
from sd15.models.unet import batch_timesteps  # noqa: E402
from sd15.conditioning import CLIPTokenizer  # noqa: E402
from tools import bench_anchors, bench_load, bench_report  # noqa: E402
from tools.make_checkpoint import random_full_state_dict, save  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
SECTIONS = ("load", "unet", "decode", "encode", "text", "txt2img", "lcm", "flops")


# ---- timing --------------------------------------------------------------------------------------

def timed(fn, device, inner=1) -> tuple[float, float, int | None]:
    """One timed sample of `inner` calls: (wall s per call, CPU s per call: all this process's threads,
    peak CUDA bytes allocated during the calls or None off CUDA).

    GPU work is asynchronous: synchronizing before and after the whole loop times the kernels, and
    `inner` calls per sample keep the two synchronizes and the timer small against ~10 ms calls."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for _ in range(inner):
            fn()
    if cuda:
        torch.cuda.synchronize(device)
    wall, cpu = (time.perf_counter() - wall) / inner, (time.process_time() - cpu) / inner
    return wall, cpu, torch.cuda.max_memory_allocated(device) if cuda else None


def compare(key, name, ours, ref, *, repeats, device, inner=1, warmup=True, check=None, anchors=None,
            reference=None) -> dict:
    """Median times of `ours` and `ref`, alternating which runs first; ratio = median of per-repeat ratios.

    The first call of each is timed apart (`*_first_s`: it compiles, when compiled). On CUDA two more
    untimed calls follow: CUDA graphs are recorded on the second. The CPU-time ratio is steadier than
    the wall-clock one when other processes share the machine.

    anchors (tools.bench_anchors.Anchors): each repeat ends with one timed sample of every anchor variant
    that has this row; after the check, `reference()` (diffusers' output as a numpy array) is what their
    deviation is measured against. row["anchors"] holds their figures.
    """
    print(f"  {name} ...", file=sys.stderr, flush=True)
    row = dict(key=key, name=name, inner=inner)
    if warmup:
        row["ours_first_s"], row["diffusers_first_s"] = timed(ours, device)[0], timed(ref, device)[0]
        if anchors:
            anchors.warm_up(key)
        if device.type == "cuda":
            timed(ours, device, 2), timed(ref, device, 2)
    if device.type == "cuda":   # what both engines hold (weights, inputs): the peaks below include it
        row["resident_bytes"] = torch.cuda.memory_allocated(device)
    t_ours, t_ref = [], []
    for r in range(repeats):
        pair = [(ours, t_ours), (ref, t_ref)]
        for fn, times in (pair if r % 2 == 0 else pair[::-1]):
            times.append(timed(fn, device, inner))
        if anchors:        # separate processes: they run after ours and diffusers in each repeat
            anchors.time(key, r)
    med = statistics.median
    row |= dict(ours_s=med(s[0] for s in t_ours), diffusers_s=med(s[0] for s in t_ref),
                ratio=med(a[0] / b[0] for a, b in zip(t_ours, t_ref)),
                cpu_ratio=med(a[1] / b[1] for a, b in zip(t_ours, t_ref)),
                ours_all=[s[:2] for s in t_ours], diffusers_all=[s[:2] for s in t_ref])
    if device.type == "cuda":
        row["ours_peak_bytes"], row["diffusers_peak_bytes"] = max(s[2] for s in t_ours), max(s[2] for s in t_ref)
    if check is not None:
        with torch.inference_mode():
            row["max_rel_diff"] = check()
    if anchors:
        diffs = anchors.check(key, reference()) if reference is not None else {}
        row["anchors"] = anchors.row(key, t_ours, t_ref, diffs)
    return row


def parity(ours, ref, keep=None):
    """A check: tools.reference.rel_err of the two outputs. Ours is copied out (.double()) before ref runs:
    the output of a CUDA-graph (max-autotune) call is overwritten by the next compiled call. `keep`, a
    dict, gets ref's output as "ref" (what the anchors are compared with)."""
    from tools.reference import rel_err   # diffusers only where the reference runs

    def check():
        a = ours().double()
        b = ref()
        if keep is not None:
            keep["ref"] = b.float().cpu().numpy()
        return rel_err(a, b)
    return check


# ---- sections ------------------------------------------------------------------------------------

def peak_matmul_flops(device, dtype, n=4096, repeats=5) -> dict:
    """Best FLOP/s of an n x n x n matmul: torch.mm (MKL on CPU, cuBLAS on CUDA) and, on CPU, oneDNN's."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    kernels = {"torch.mm": lambda: torch.mm(a, b)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        kernels["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    inner = 10 if device.type == "cuda" else 1
    peaks = {}
    for name, fn in kernels.items():
        timed(fn, device, inner)
        peaks[name] = 2 * n ** 3 / min(timed(fn, device, inner)[0] for _ in range(repeats))
    return peaks


def counted_flops(fn) -> int:
    """FLOPs of one call (torch.utils.flop_counter: matmuls and convolutions; norms/elementwise not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return counter.get_total_flops()


def meta_flops(configs: Configs, size: int) -> dict:
    """Counted on meta-device models at the benchmark's shapes: no weights, no compute, same ops."""
    from sd15.models.text_encoder import TextEncoder
    from sd15.models.unet import UNet
    from sd15.models.vae import VAE
    u, v, c = configs.unet, configs.vae, configs.text_encoder
    side = size // v.downscale
    with torch.device("meta"):
        unet, vae, text = UNet(u), VAE(v), TextEncoder(c)
        x, ctx, t = torch.empty(2, u.in_channels, side, side), torch.empty(2, c.max_length, u.context_dim), torch.empty(2)
        return {"unet": counted_flops(lambda: unet(x, t, ctx)),
                "decode": counted_flops(lambda: vae.decode(torch.empty(1, v.latent_channels, side, side))),
                "encode": counted_flops(lambda: vae.encode_distribution(torch.empty(1, v.in_channels, size, size))),
                "text": counted_flops(lambda: text(torch.zeros(2, c.max_length, dtype=torch.long)))}


def compile_unets(args, pipe, unet_ref, device) -> None:
    """--compile: ours through the engine's own Pipeline.compile; --compile-diffusers: theirs alike."""
    if device.type == "cpu":        # inference only: let Inductor fold and prepack the weights
        import torch._inductor.config
        torch._inductor.config.freezing = True
    if args.compile:
        pipe.compile(args.compile_mode)
    if args.compile_diffusers:
        mode = args.compile_mode or ("max-autotune" if device.type == "cuda" else "default")  # Pipeline.compile's
        if device.type == "cuda":   # NHWC, as Pipeline.compile gives ours (and diffusers' docs advise)
            unet_ref.to(memory_format=torch.channels_last)
        unet_ref.compile(mode=mode, fullgraph=True, dynamic=False)


@torch.inference_mode()
def inputs(tokenizer, configs: Configs, size: int, device, dtype):
    """Model inputs at the configs' widths, made as the pipeline makes its own: inference tensors, and t
    made by torch.full (a compiled UNet guards on both, so it then reuses its graph in txt2img)."""
    u, v, c = configs.unet, configs.vae, configs.text_encoder
    side, gen = size // v.downscale, torch.Generator().manual_seed(0)
    ids = tokenizer(["", PROMPT]).to(device)
    x = torch.randn(2, u.in_channels, side, side, generator=gen).to(device, dtype)
    t = batch_timesteps(999.0, 2, device)
    ctx = torch.randn(2, c.max_length, u.context_dim, generator=gen).to(device, dtype)
    z = torch.randn(1, v.latent_channels, side, side, generator=gen).to(device, dtype)
    img = (torch.rand(1, v.in_channels, size, size, generator=gen) * 2 - 1).to(device, dtype)
    return ids, x, t, ctx, z, img


def compare_models(args, path, raw, configs: Configs, device, dtype, tensors, anchors=None) -> list[dict]:
    from tools.reference import reference_models, reference_pipeline
    print("loading both engines ...", file=sys.stderr, flush=True)
    pipe = sd15.load(path, device=device, dtype=dtype)
    _fmt, sd, _quirks = state_from_raw(raw)
    ref = reference_models(sd, configs, device=device, dtype=dtype)
    del sd
    if args.compile or args.compile_diffusers:
        print("compiling (each row's first call compiles) ...", file=sys.stderr, flush=True)
        compile_unets(args, pipe, ref.unet, device)
    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    ids, x, t, ctx, z, img = tensors
    u, v, size = configs.unet, configs.vae, args.size
    side = size // v.downscale
    kw = dict(repeats=args.repeats, device=device, inner=args.inner, anchors=anchors)
    rows, kept = [], {}

    def add(key, name, ours, theirs):
        if key in args.only:
            rows.append(compare(key, name, ours, theirs, check=parity(ours, theirs, kept),
                                reference=lambda: kept["ref"], **kw))

    add("unet", f"UNet step, CFG batch 2x{u.in_channels}x{side}x{side}", lambda: unet(x, t, ctx),
        lambda: ref.unet(x, t, ctx).sample)
    add("decode", f"VAE decode {size}x{size}", lambda: vae.decode(z), lambda: ref.vae.decode(z).sample)
    add("encode", f"VAE encode {size}x{size}", lambda: vae.encode(img), lambda: ref.vae.encode(img).latent_dist.mean)
    add("text", "text encoder, batch 2", lambda: text(ids), lambda: ref.text_encoder(ids).last_hidden_state)
    for row in rows:
        if row["key"] == "unet":   # one call = one sampling step
            row["ours_it_s"], row["diffusers_it_s"] = 1 / row["ours_s"], 1 / row["diffusers_s"]
    if "txt2img" in args.only:
        rows.append(compare_txt2img(args, pipe, reference_pipeline(ref), ref.text_encoder, ids, device, anchors))
    if "lcm" in args.only:
        rows.append(compare_lcm(args, pipe, reference_pipeline(ref), ref.text_encoder, ids, device))
    return rows


def _lora_modules(path: Path) -> set[str]:
    """The module names a kohya file (written by tools.bench_lcm.lcm_lora) covers."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k.removeprefix("lora_unet_").split(".")[0] for k in f.keys()}


def compare_lcm(args, pipe, ref_pipe, text_ref, ids, device) -> dict:
    """Time to an image with LCM-LoRA: the LCM sampler, 4 steps, CFG 1 (one UNet pass a step), with a random
    LoRA of LCM-LoRA's shape (`tools.bench_lcm.lcm_lora`, rank 64, 67 M parameters) merged into both engines:
    ours from the request (merged on the first call and kept, as A1111 keeps it), diffusers' with
    `load_lora_weights` + `fuse_lora` before the row and LCMScheduler on the SD1.5 DDIM config, as LCM-LoRA's
    model card does. The first call of each is timed apart (ours merges then). Last, since it changes
    both UNets; both are restored afterwards."""
    from diffusers import DDIMScheduler, LCMScheduler
    from sd15.adapters.names import diffusers_to_ldm
    from tools.bench_lcm import lcm_lora
    from tools.reference import SD15_SCHEDULER
    lora = Path(tempfile.mkdtemp(prefix="sd15-lcm-")) / "lcm-lora-sdv1-5.safetensors"
    # kohya keys with diffusers' module names, as kohya's SD1.5 LoRAs have them: diffusers' converter for
    # LDM names assumes SD1.5's block layout, and a tiny checkpoint's differs; ours reads both spellings
    diffusers_names = {diffusers_to_ldm(n.replace(".", "_"), pipe.unet.cfg): n.replace(".", "_")
                       for n, m in ref_pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    lcm_lora(pipe, lora, names=diffusers_names)
    ref_pipe.scheduler = LCMScheduler.from_config(DDIMScheduler(**SD15_SCHEDULER).config)
    ref_pipe.load_lora_weights(str(lora), adapter_name="lcm")
    wrapped = sum(1 for m in ref_pipe.unet.modules() if "lcm" in getattr(m, "lora_A", {}))
    if wrapped != len(in_file := _lora_modules(lora)):      # a silent partial load would flatter it
        raise RuntimeError(f"diffusers took the LCM LoRA on {wrapped} modules of the file's {len(in_file)}")
    ref_pipe.fuse_lora()
    images, size = {}, args.size
    request = sd15.Request(PROMPT, sampler="lcm", steps=4, guidance_scale=1.0, seed=0, width=size, height=size,
                           loras=[(lora, 1.0)])

    def ours():
        images["ours"] = pipe.generate(request)[0]

    def theirs():   # the same work: the prompt through the text encoder, then the pipeline
        states = text_ref(ids[1:]).last_hidden_state
        images["ref"] = ref_pipe(prompt_embeds=states, guidance_scale=1.0, num_inference_steps=4,
                                 generator=torch.Generator().manual_seed(0), height=size, width=size).images[0]

    def pixels_diff():
        import numpy as np
        a, b = (np.asarray(images[k], dtype=np.int16) for k in ("ours", "ref"))
        return float(np.abs(a - b).max()) / 255

    try:
        row = compare("lcm", f"txt2img {size}x{size}, LCM-LoRA, 4 steps LCM, CFG 1", ours, theirs,
                      repeats=args.repeats, device=device, warmup=True, check=pixels_diff)
    finally:
        ref_pipe.unfuse_lora()
        ref_pipe.unload_lora_weights()
        with pipe.original_weights():      # our kept merge out again
            pass
        lora.unlink()
        lora.parent.rmdir()
    row["ours_it_s"], row["diffusers_it_s"] = 4 / row["ours_s"], 4 / row["diffusers_s"]
    return row


def compare_txt2img(args, pipe, ref_pipe, text_ref, ids, device, anchors=None) -> dict:
    """Whole txt2img, DPM++ 2M Karras, one call per sample; warmed up only where the first call is
    special (CUDA, compiled): on a CPU a full-size warm-up would cost a whole generation per engine."""
    images, size = {}, args.size

    def ours():
        images["ours"] = pipe.txt2img(PROMPT, steps=args.steps, seed=0, sampler="DPM++ 2M Karras",
                                      width=size, height=size)[0]

    def theirs():   # the same work: the prompt through the text encoder, then the pipeline
        states = text_ref(ids).last_hidden_state
        images["ref"] = ref_pipe(prompt_embeds=states[1:], negative_prompt_embeds=states[:1], guidance_scale=7.5,
                                 num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                                 height=size, width=size).images[0]

    def pixels_diff():
        import numpy as np
        a, b = (np.asarray(images[k], dtype=np.int16) for k in ("ours", "ref"))
        return float(np.abs(a - b).max()) / 255

    warmup = device.type == "cuda" or args.compile or args.compile_diffusers
    import numpy as np
    row = compare("txt2img", f"txt2img {size}x{size}, {args.steps} steps DPM++ 2M Karras", ours, theirs,
                  repeats=args.repeats, device=device, warmup=warmup, check=pixels_diff, anchors=anchors,
                  reference=lambda: np.asarray(images["ref"]))
    row["ours_it_s"], row["diffusers_it_s"] = args.steps / row["ours_s"], args.steps / row["diffusers_s"]
    return row


# ---- main ----------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0) \
        if os.path.exists("/proc/meminfo") else 0
    return dict(cpu=cpu, cores=os.cpu_count(), ram_bytes=mem, torch=torch.__version__, threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                # what torch read at import (see sd15.process.use_huge_pages)
                thp_mem_alloc=HUGE_PAGES, keep_freed_memory=MEMORY["keep_freed_memory"],
                # 1/5/15-minute load averages when the run started: on a shared machine, how busy it was
                load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)


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


def start_anchors(args, path: Path, workdir: Path, tensors) -> "bench_anchors.Anchors":
    """The anchor workers, prepared and loaded before our models and diffusers' take their memory."""
    ids, x, t, ctx, z, _img = tensors
    arrays = dict(ids=ids.cpu().numpy(), **{k: v.float().cpu().numpy() for k, v in dict(x=x, t=t, ctx=ctx, z=z).items()})
    print("starting the comparison engines ...", file=sys.stderr, flush=True)
    return bench_anchors.Anchors.start(args.anchors, ckpt=path, workdir=workdir, inputs=arrays, keys=args.only,
                                       steps=args.steps, size=args.size, prompt=PROMPT, threads=args.threads,
                                       wanted=args.anchor_engines)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = dict(machine=machine(), device=str(device), dtype=str(dtype).removeprefix("torch."), size=args.size,
                   steps=args.steps, repeats=args.repeats, inner=args.inner, command=args.command, rows=[],
                   compile=dict(ours=args.compile, diffusers=args.compile_diffusers, mode=args.compile_mode))
    with tempfile.TemporaryDirectory(prefix="sd15-bench-") as tmp:
        path, load_files = prepare_files(args, args.workdir or Path(tmp))
        if "load" in args.only:          # before the big models exist in this process
            results["load"] = bench_load.load_rows(load_files, args.load_repeats)
        raw = read_checkpoint_file(path)
        configs = configs_from_metadata(raw.metadata)   # a tools.make_checkpoint file's; SD1.5's otherwise
        tensors = inputs(CLIPTokenizer(), configs, args.size, device, dtype)
        anchors = start_anchors(args, path, args.workdir or Path(tmp), tensors) if args.anchors else None
        try:
            if set(args.only) - {"load", "flops"}:
                results["rows"] = compare_models(args, path, raw, configs, device, dtype, tensors, anchors)
        finally:
            if anchors:
                results["anchors"] = anchors.close()
        del raw
    if hasattr(os, "getloadavg"):
        results["load_average_end"] = list(os.getloadavg())
    if "flops" in args.only:
        results["flops"] = dict(peak_matmul=peak_matmul_flops(device, dtype, args.matmul_size),
                                matmul_size=args.matmul_size, counted=meta_flops(configs, args.size))
    return results


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, help="an SD1.x checkpoint, real or tiny (default: random full-size weights)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels, a multiple of 8 (default 512)")
    p.add_argument("--steps", type=int, default=4, help="txt2img steps (default 4: ~10 s per step on a small CPU)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed samples per measurement")
    p.add_argument("--inner", type=int, help="calls per timed sample of a model (default: 10 on CUDA, 1 on CPU); "
                                             "txt2img is always one call")
    p.add_argument("--load-repeats", type=int, default=1, help="fresh-process loads per file")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of: {', '.join(SECTIONS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: fp16 on cuda, else fp32")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="our UNet through Pipeline.compile() (opt-in)")
    p.add_argument("--compile-diffusers", action="store_true", help="torch.compile diffusers' UNet the same way")
    p.add_argument("--compile-mode", help="torch.compile mode for both (default: Pipeline.compile's: "
                                          "max-autotune on CUDA, default on CPU)")
    p.add_argument("--matmul-size", type=int, default=4096, help="n of the n x n x n matmul peak (flops section)")
    p.add_argument("--workdir", type=Path, help="keep the random checkpoints here and reuse them (default: a temp dir)")
    p.add_argument("--out", type=Path, help="also write the results as JSON")
    p.add_argument("--anchors", type=Path, metavar="DIR",
                   help="also time the CPU comparison engines installed under DIR by tools/anchors/setup.sh "
                        "(OpenVINO, stable-diffusion.cpp); each one missing is skipped with its reason")
    p.add_argument("--anchor-engines", default=",".join(e.name for e in bench_anchors.ENGINES),
                   help="comma list of the anchors to run (default: all); e.g. sdcpp alone leaves it the memory "
                        "OpenVINO's compiled models would hold")
    args = p.parse_args(argv)
    args.command = " ".join(["python -m tools.benchmark", *(sys.argv[1:] if argv is None else argv)])
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if args.ckpt is not None and not args.ckpt.is_file():
        p.error(f"{args.ckpt}: no such file")
    if args.size <= 0 or args.size % 8:
        p.error(f"--size {args.size}: the image side must be a positive multiple of 8")
    if min(args.repeats, args.load_repeats, args.inner or 1) < 1:
        p.error("--repeats, --load-repeats and --inner must be at least 1")
    args.anchor_engines = [s.strip() for s in args.anchor_engines.split(",") if s.strip()]
    known = {e.name for e in bench_anchors.ENGINES}
    if set(args.anchor_engines) - known:
        p.error(f"--anchor-engines: unknown {', '.join(sorted(set(args.anchor_engines) - known))}; "
                f"choose from {', '.join(sorted(known))}")
    if args.anchors is not None and not args.device.startswith("cpu"):
        p.error("--anchors: the comparison engines run on the CPU; use them with --device cpu")
    if args.inner is None:
        args.inner = 10 if args.device.startswith("cuda") else 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(bench_report.markdown(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
