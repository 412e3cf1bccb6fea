"""stable-diffusion.cpp as a comparison engine of `tools.benchmark --anchors DIR`: runs in DIR/sdcpp's venv.

    python -m tools.anchors.sdcpp_bench prepare --ckpt W/random-sd15-fp16.safetensors --workdir W
    python -m tools.anchors.sdcpp_bench serve --ckpt ... --workdir W --inputs W/anchor-inputs.safetensors

sd.cpp (through stable-diffusion-cpp-python) loads the benchmark's original-layout `.safetensors` itself and
casts or quantises the weights while loading, so `prepare` only checks the file. `serve` answers
tools/anchors/protocol.py requests for the txt2img row: one timed sample per weight type, f32, f16 and
q8_0 (its `wtype`; the benchmark's file is fp16, so f32 holds exactly the weights sd15 and diffusers run in
fp32). Each sample loads that weight type, generates the benchmark's image (same prompt, empty negative
prompt, CFG 7.5, N steps of its DPM++ (2M) with the Karras schedule, seed 0, width and height), and frees
it again: one model in memory at a time (an f32 SD1.5 is 4 GB). The load is timed apart from the image,
and the image's parts come from sd.cpp's own log lines (conditioning, sampling, decode). Its peak RSS is
measured per sample (/proc/self/clear_refs resets VmHWM). A weight type for which MemAvailable is short
is skipped in that repeat, saying so, rather than pushing a shared machine into the OOM killer.

sd.cpp draws its initial noise with its own generator (A1111's GPU RNG), so its image cannot be compared
pixel for pixel with diffusers': the row has no deviation figure for it.
"""

import argparse
import ctypes
import json
import os
import re
import sys
import time
from pathlib import Path

import stable_diffusion_cpp
from stable_diffusion_cpp import stable_diffusion_cpp as sd_cpp

from tools.anchors.protocol import memory_available_bytes, reply_channel, rss_bytes, serve, timed

VARIANTS = ("f32", "f16", "q8_0")
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}     # ggml's q8_0: 32 int8 + one fp16 scale
WORKING_SET = 2.5 * 2**30          # compute buffers of a 512² image (its log: UNet 0.56 GB, VAE 1.66 GB)
HEADROOM = 1.5 * 2**30             # left to the rest of a shared machine
GUIDANCE, SAMPLER, SCHEDULE = 7.5, "dpm++2m", "karras"
FIRST_CONV, SD1_FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight", [320, 4, 3, 3]
PARTS = {"text_s": r"get_learned_condition completed, taking ([\d.]+)s",
         "sampling_s": r"sampling completed, taking ([\d.]+)s",
         "decode_s": r"decode_first_stage completed, taking ([\d.]+)s"}


class Log:
    """sd.cpp's log lines: kept for the per-part timings, and passed on to stderr (the worker's log file)."""

    def __init__(self):
        self.lines: list[str] = []

        @sd_cpp.sd_log_callback
        def callback(level, text, data):
            line = text.decode("utf-8", errors="replace")
            self.lines.append(line)
            print(line, end="", file=sys.stderr, flush=True)
        self.callback = callback      # a reference, or ctypes frees the trampoline sd.cpp calls
        sd_cpp.sd_set_log_callback(callback, ctypes.c_void_p(0))

    def parts(self, start: int) -> dict:
        text = "".join(self.lines[start:])
        return {k: float(m[-1]) for k, pattern in PARTS.items() if (m := re.findall(pattern, text))}


def unusable(ckpt: Path) -> str | None:
    """Why sd.cpp cannot take this file, or None. It tells the model family by tensor shapes and crashes
    (SIGSEGV) on one it does not know, such as the tests' tiny checkpoints: refuse those here, in words."""
    if ckpt.suffix != ".safetensors" or not ckpt.is_file():
        return "sd.cpp's anchor reads an existing .safetensors checkpoint"
    with open(ckpt, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    shape = header.get(FIRST_CONV, {}).get("shape")
    if shape != SD1_FIRST_CONV:
        return (f"not a full-size SD 1.x checkpoint ({FIRST_CONV} has shape {shape}, SD 1.x's is {SD1_FIRST_CONV}); "
                "sd.cpp only runs the model families it knows")
    return None


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class Engine:
    def __init__(self, ckpt: Path, threads: int | None):
        self.ckpt, self.log = ckpt, Log()
        self.threads = threads or os.cpu_count()    # the binding's own default is half the CPUs
        self.params = ckpt.stat().st_size / 2       # the file is fp16: 2 bytes a weight
        self.last_error: dict[str, str] = {}

    def setup(self, keys: list[str], steps: int = 4, size: int = 512, prompt: str = "") -> dict:
        self.steps, self.size, self.prompt = steps, size, prompt
        return dict(variants=list(VARIANTS), version=f"stable-diffusion-cpp-python {stable_diffusion_cpp.__version__}",
                    properties={v: {"wtype": v, "n_threads": str(self.threads), "sampler": f"{SAMPLER} {SCHEDULE}"}
                                for v in VARIANTS},
                    system=sd_cpp.sd_get_system_info().decode().split("System Info:")[-1].strip())

    def needed_bytes(self, variant: str) -> float:
        return self.params * BYTES_PER_WEIGHT[variant] + WORKING_SET + HEADROOM

    def sample(self, variant: str) -> tuple[list[float], dict]:
        reset_peak_rss()
        base, start = rss_bytes(), time.perf_counter()
        model = stable_diffusion_cpp.StableDiffusion(model_path=str(self.ckpt), wtype=variant, n_threads=self.threads,
                                                     vae_decode_only=True, verbose=True)
        load_s, first_line = time.perf_counter() - start, len(self.log.lines)
        try:
            times = timed(lambda: model.generate_image(
                prompt=self.prompt, negative_prompt="", cfg_scale=GUIDANCE, width=self.size, height=self.size,
                sample_method=SAMPLER, scheduler=SCHEDULE, sample_steps=self.steps, seed=0))
        finally:
            model.close()
        return list(times), dict(load_s=load_s, peak_rss_bytes=rss_bytes("VmHWM:") - base, **self.log.parts(first_line))

    def time(self, key: str, repeat: int = 0) -> dict:
        if key != "txt2img":
            raise ValueError(f"sd.cpp has only the txt2img row, not {key!r}")
        order = VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]
        times, extra, skipped = {}, {}, {}
        for variant in order:
            free, need = memory_available_bytes(), self.needed_bytes(variant)
            if free and free < need:
                skipped[variant] = f"MemAvailable {free / 2**30:.1f} GiB < ~{need / 2**30:.1f} GiB needed"
                continue
            times[variant], extra[variant] = self.sample(variant)
        return dict(times=times, extra=extra, skipped=skipped)

    def check(self, key: str, ref: str) -> dict:
        return dict(max_rel_diff={}, note="sd.cpp draws its own initial noise: no pixel comparison with diffusers")

    def quit(self) -> dict:
        return {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    for step, text in (("prepare", "check the checkpoint (sd.cpp reads it directly)"),
                       ("serve", "answer the benchmark's requests (tools/anchors/protocol.py)")):
        s = sub.add_parser(step, help=text)
        s.add_argument("--ckpt", type=Path, required=True, help="the benchmark's checkpoint (original layout)")
        s.add_argument("--workdir", type=Path, required=True)
    s.add_argument("--inputs", type=Path, help="unused: sd.cpp tokenizes the prompt itself")
    s.add_argument("--threads", type=int, help="n_threads (default: all CPUs, as torch and OpenVINO use)")
    args = p.parse_args(argv)
    problem = unusable(args.ckpt)
    if problem:
        print(f"error: {args.ckpt}: {problem}", file=sys.stderr)
        return 2
    if args.step == "prepare":
        print('{"cached": true, "note": "sd.cpp converts the weights while loading"}')
        return 0
    requests, replies = reply_channel()
    engine = Engine(args.ckpt, args.threads)
    serve(dict(setup=engine.setup, time=engine.time, check=engine.check, quit=engine.quit), requests, replies)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
