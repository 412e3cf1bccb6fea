"""OpenVINO as a comparison engine of `tools.benchmark --anchors DIR`: runs in DIR/openvino's venv, never in sd15's.

Two steps, each its own process (started by tools/bench_anchors.py with the checkout on PYTHONPATH):

    python -m tools.anchors.openvino_bench prepare --ckpt W/random-sd15-fp16.safetensors --workdir W
    python -m tools.anchors.openvino_bench serve --ckpt ... --workdir W --inputs W/anchor-inputs.safetensors

`prepare` builds diffusers' UNet2DConditionModel, AutoencoderKL (its decoder) and transformers'
CLIPTextModel from the benchmark's checkpoint exactly as the benchmark's diffusers rows do
(tools.reference: diffusers' own LDM converters, fp32), and converts each with OpenVINO's own
`openvino.convert_model` (example inputs, dynamic shapes) into fp32 IR in W/openvino-ir — `compress_to_fp16=False`, so the
f32 row really computes with fp32 weights. One model at a time, freed before the next (a full-size fp32 UNet
is 3.4 GB). The IR is cached: a `source.json` beside it names the checkpoint (name, size, mtime) and the
OpenVINO version, and a mismatch converts again.

`serve` answers tools/anchors/protocol.py requests. Each model is read, reshaped to the benchmark's static
shapes (what optimum-intel's pipelines do before compiling) and compiled twice: once with
INFERENCE_PRECISION_HINT=f32 ("f32") and once with OpenVINO's defaults ("default": bf16 on CPUs with
AVX512-BF16 or AMX); the precision, threads, streams and performance hint each compiled model reports are
returned, and so are read and compile times, apart from the steady-state timings. The UNet, decoder and
text encoder rows run one synchronous infer per timed sample; the txt2img row is the whole image: the text
encoder, N steps of diffusers' DPM++ 2M Karras scheduler with CFG 7.5 around the OpenVINO UNet (as
optimum-intel's OVStableDiffusionPipeline does), and the decoder, from the same seed-0 latents as
diffusers' pipeline, so its pixels can be compared with diffusers' image.
"""

import argparse
import gc
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import openvino as ov
from safetensors.numpy import load_file

from tools.anchors.protocol import reply_channel, rss_bytes, serve, timed

MODELS = ("unet", "decoder", "text")
IR_FOLDER = "openvino-ir"
VARIANTS = {"f32": {"INFERENCE_PRECISION_HINT": "f32"}, "default": {}}
ROW_MODELS = {"unet": ("unet",), "decode": ("decoder",), "text": ("text",), "txt2img": MODELS}
REPORTED = ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT")
GUIDANCE, LATENT_SCALE = 7.5, 0.18215     # the benchmark's txt2img: CFG 7.5, SD1.5's VAE scaling factor


# ---- convert: diffusers' modules -> fp32 IR, once ------------------------------------------------

def source_stamp(ckpt: Path) -> dict:
    st = ckpt.stat()
    return dict(ckpt=ckpt.name, bytes=st.st_size, mtime_ns=st.st_mtime_ns, openvino=ov.get_version())


def torch_modules(ckpt: Path):
    """(name, module, example inputs) for each model, built one at a time from the checkpoint's tensors."""
    import torch
    from sd15.files.checkpoint import state_from_raw
    from sd15.files.readers import read_checkpoint_file
    from sd15.models.loading import configs_from_metadata
    from tools.reference import reference_text_encoder, reference_unet, reference_vae

    raw = read_checkpoint_file(ckpt)
    configs = configs_from_metadata(raw.metadata)
    _fmt, sd, _quirks = state_from_raw(raw)
    u, v, c = configs.unet, configs.vae, configs.text_encoder
    f32 = dict(dtype=torch.float32)

    class UNet(torch.nn.Module):        # plain tensors in and out: what convert_model traces
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, ctx):
            return self.unet(x, t, ctx, return_dict=False)[0]

    class Decoder(torch.nn.Module):     # AutoencoderKL.decode: post_quant_conv, then the decoder
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, z):
            return self.vae.decode(z, return_dict=False)[0]

    class Text(torch.nn.Module):
        def __init__(self, text):
            super().__init__()
            self.text = text

        def forward(self, ids):
            return self.text(ids, return_dict=False)[0]   # last_hidden_state

    side = 8    # small example shapes: the IR keeps dynamic dimensions, serve reshapes to the real ones
    yield "unet", lambda: UNet(reference_unet(sd, u, **f32)), (
        torch.randn(2, u.in_channels, side, side), torch.full((2,), 999.0), torch.randn(2, c.max_length, u.context_dim))
    yield "decoder", lambda: Decoder(reference_vae(sd, v, **f32)), (torch.randn(1, v.latent_channels, side, side),)
    yield "text", lambda: Text(reference_text_encoder(sd, c, **f32)), (torch.zeros(2, c.max_length, dtype=torch.long),)


def convert(ckpt: Path, ir: Path) -> dict:
    import torch
    stamp, stamp_file = source_stamp(ckpt), ir / "source.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp and all(
            (ir / f"{m}.xml").exists() and (ir / f"{m}.bin").exists() for m in MODELS):
        return dict(cached=True, ir=str(ir))
    ir.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)          # a half-written IR is never taken for a finished one
    seconds = {}
    for name, build, example in torch_modules(ckpt):
        print(f"openvino: converting {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        module = build()
        with torch.inference_mode(False), torch.no_grad():
            model = ov.convert_model(module, example_input=example)
        ov.save_model(model, ir / f"{name}.xml", compress_to_fp16=False)
        seconds[name] = time.perf_counter() - start
        del model, module
        gc.collect()
    stamp_file.write_text(json.dumps(stamp))
    return dict(cached=False, ir=str(ir), convert_s=seconds, peak_rss_bytes=rss_bytes("VmHWM:"))


# ---- serve: compiled models, timed on request ----------------------------------------------------

def property_text(value) -> str:
    """A compiled model's property as OpenVINO spells it: "bf16", not "<Type: 'bfloat16'>"."""
    return value.to_string() if hasattr(value, "to_string") else str(value)


class Engine:
    """The compiled models of both variants, their last outputs, and what loading them cost."""

    def __init__(self, ir: Path, inputs: Path, threads: int | None):
        self.ir, self.core = ir, ov.Core()
        self.inputs = load_file(str(inputs))
        self.threads = threads
        self.compiled: dict[tuple[str, str], ov.CompiledModel] = {}
        self.last: dict[tuple[str, str], np.ndarray] = {}
        self.base_rss = rss_bytes()

    def shapes(self, name: str) -> list[np.ndarray]:
        i = self.inputs
        return {"unet": [i["x"], i["t"], i["ctx"]], "decoder": [i["z"]], "text": [i["ids"]]}[name]

    def setup(self, keys: list[str], steps: int = 4, size: int = 512, prompt: str = "") -> dict:
        self.steps = steps
        needed = [m for m in MODELS if any(m in ROW_MODELS[k] for k in keys if k in ROW_MODELS)]
        load, props = {}, {}
        for name in needed:
            start = time.perf_counter()
            model = self.core.read_model(self.ir / f"{name}.xml")
            model.reshape({port: ov.PartialShape(list(a.shape)) for port, a in zip(model.inputs, self.shapes(name))})
            read_s = time.perf_counter() - start
            for variant, config in VARIANTS.items():
                config = dict(config, **({"INFERENCE_NUM_THREADS": self.threads} if self.threads else {}))
                anon, start = rss_bytes("RssAnon:"), time.perf_counter()
                compiled = self.core.compile_model(model, "CPU", config)
                load[f"{variant} {name}"] = dict(read_s=read_s, compile_s=time.perf_counter() - start,
                                                 private_added_bytes=rss_bytes("RssAnon:") - anon)
                props[variant] = {p: property_text(compiled.get_property(p)) for p in REPORTED}
                self.compiled[variant, name] = compiled
            del model
            gc.collect()
        if "txt2img" in keys:
            self.prepare_txt2img()
        return dict(variants=list(VARIANTS), properties=props, load=load, version=f"openvino {ov.get_version()}",
                    device=self.core.get_property("CPU", "FULL_DEVICE_NAME"),
                    capabilities=list(self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
                    rss_after_load_bytes=rss_bytes() - self.base_rss, private_after_load_bytes=rss_bytes("RssAnon:"),
                    mapped_after_load_bytes=rss_bytes("RssFile:"))

    def infer(self, variant: str, name: str, args: list[np.ndarray]) -> np.ndarray:
        out = self.compiled[variant, name](args)
        return next(iter(out.values()))

    def run_row(self, variant: str, key: str) -> np.ndarray:
        if key == "txt2img":
            return self.txt2img(variant)
        name = ROW_MODELS[key][0]
        return self.infer(variant, name, self.shapes(name))

    # txt2img: diffusers' scheduler around the compiled models, as optimum-intel's pipeline does
    def prepare_txt2img(self):
        import torch
        from tools.reference import reference_scheduler
        self.torch, self.scheduler = torch, reference_scheduler("dpmpp_2m_karras")

    def txt2img(self, variant: str) -> np.ndarray:
        torch, scheduler = self.torch, self.scheduler
        ctx = self.infer(variant, "text", [self.inputs["ids"]])          # [negative, prompt]
        scheduler.set_timesteps(self.steps)
        z = self.inputs["z"]                                             # only its shape: the latents' size
        latents = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t).numpy()
            eps = self.infer(variant, "unet", [x, np.full((2,), float(t), dtype=np.float32), ctx])
            uncond, cond = torch.from_numpy(eps).chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents).prev_sample
        image = self.infer(variant, "decoder", [(latents / LATENT_SCALE).numpy()])
        image = np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)[0]   # diffusers' postprocess to uint8
        return (image * 255).round().astype(np.uint8)

    # the requests
    def time(self, key: str, repeat: int = 0) -> dict:
        order = list(VARIANTS) if repeat % 2 == 0 else list(VARIANTS)[::-1]   # alternate, as ours/diffusers do
        times = {}
        for variant in order:
            out = {}
            times[variant] = timed(lambda: out.setdefault("y", self.run_row(variant, key)))
            self.last[variant, key] = out["y"]
        return dict(times=times)

    def check(self, key: str, ref: str) -> dict:
        want = load_file(ref)["ref"]
        diffs = {}
        for variant in VARIANTS:
            got = self.last[variant, key]
            if key == "txt2img":   # uint8 images: the largest pixel difference / 255
                diffs[variant] = float(np.abs(got.astype(np.int16) - want.astype(np.int16)).max()) / 255
            else:                  # tools.reference.rel_err
                diffs[variant] = float(np.abs(got.astype(np.float64) - want).max() / np.abs(want.astype(np.float64)).max())
        return dict(max_rel_diff=diffs)

    def quit(self) -> dict:   # peak RSS counts the IR's mapped pages too (see rss_bytes)
        return dict(peak_rss_bytes=rss_bytes("VmHWM:") - self.base_rss, base_rss_bytes=self.base_rss)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    for step, text in (("prepare", "diffusers' models from the checkpoint -> fp32 IR in WORKDIR/openvino-ir (cached)"),
                       ("serve", "answer the benchmark's requests (tools/anchors/protocol.py)")):
        s = sub.add_parser(step, help=text)
        s.add_argument("--ckpt", type=Path, required=True, help="the benchmark's checkpoint")
        s.add_argument("--workdir", type=Path, required=True, help="where the IR is kept")
    s.add_argument("--inputs", type=Path, required=True, help="the benchmark's model inputs (safetensors)")
    s.add_argument("--threads", type=int, help="INFERENCE_NUM_THREADS (default: OpenVINO's choice)")
    args = p.parse_args(argv)
    ir = args.workdir / IR_FOLDER
    if args.step == "prepare":
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python")  # TracerWarnings, by the hundred
        warnings.filterwarnings("ignore", category=FutureWarning)
        print(json.dumps(convert(args.ckpt, ir)))
        return 0
    requests, replies = reply_channel()
    engine = Engine(ir, args.inputs, args.threads)
    serve(dict(setup=engine.setup, time=engine.time, check=engine.check, quit=engine.quit), requests, replies)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
