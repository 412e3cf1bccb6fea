"""`python -m sd15.generate`: prompt in, PNG out.

    python -m sd15.generate --ckpt v1-5-pruned-emaonly.safetensors --prompt "a lighthouse at dusk" --seed 42
    python -m sd15.generate --from-png outputs/00000-42.png --steps 40     # regenerate, changing one thing
    python -m sd15.generate --demo --prompt "anything"      # tiny random weights: checks the install, draws noise

The arguments become one `Request` (defaults are the request's), checked before the model loads; errors
print one line and exit with status 2.
"""

import argparse
import dataclasses
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from ..pipeline import png
from ..pipeline.validation import check_device
from . import control as control_args
from ..pipeline.stages import ti_name
from ..pipeline.request import (DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_STRENGTH,
                                SEED_MODES, Request)
from ..pipeline.hires import UPSCALERS, Hires
from ..pipeline.masks import BLENDS, FILLS, Inpaint, outpaint_canvas
from ..sampling.registry import SAMPLERS, resolve_sampler
from ..sampling.schedule_types import SCHEDULE_TYPES

CKPT_ENV = "SD15_CKPT"
EMBEDDINGS_ENV = "SD15_EMBEDDINGS"
LORAS_ENV = "SD15_LORAS"
log = logging.getLogger("sd15")
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130

# command-line option (argparse dest) -> Request field; each defaults to None, meaning "the request's default"
REQUEST_FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps",
                  "cfg_scale": "guidance_scale", "sampler": "sampler", "seed": "seed", "width": "width",
                  "height": "height", "batch_size": "batch_size", "init_image": "init_image", "strength": "strength",
                  "clip_skip": "clip_skip", "seed_mode": "seed_mode", "subseed": "subseed",
                  "subseed_strength": "subseed_strength", "seed_resize_from": "seed_resize_from",
                  "noise_seed_delta": "noise_seed_delta"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sd15.generate", description="Generate images with a Stable Diffusion 1.x checkpoint.")
    p.add_argument("--prompt", help="what to draw (required unless --from-png gives it)")
    p.add_argument("--negative-prompt", help="what to steer away from (the unconditional prompt; default none)")
    p.add_argument("--from-png", metavar="IMAGE",
                   help="take prompt and settings from the A1111 infotext of this PNG (ours, A1111's, or any "
                        "tool that writes it); every other option given overrides what it says")
    p.add_argument("--ckpt", default=os.environ.get(CKPT_ENV),
                   help=f"SD 1.x checkpoint (.safetensors or .ckpt); defaults to ${CKPT_ENV}")
    p.add_argument("--vae", help="separate VAE file replacing the checkpoint's (e.g. vae-ft-mse-840000-ema-pruned)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA UNet weights if it has them")
    p.add_argument("--demo", action="store_true",
                   help="ignore --ckpt and run on a tiny random-weight checkpoint: checks the install end to "
                        "end; the image is NOISE")
    p.add_argument("--steps", type=int, help=f"sampling steps (default {DEFAULT_STEPS})")
    p.add_argument("--cfg-scale", type=float,
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE}; 1 disables the negative "
                        "prompt pass)")
    p.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)}, optionally with a schedule type "
                                     "('euler_a_karras'), or A1111 names such as 'Euler a', 'DPM++ 2M Karras' "
                                     f"(default {DEFAULT_SAMPLER!r}); --list-samplers shows them all")
    p.add_argument("--schedule-type", help="A1111's schedule type for the sampler: Automatic (the sampler's "
                                           f"default), {', '.join(s.label for s in SCHEDULE_TYPES.values())}")
    p.add_argument("--list-samplers", action="store_true",
                   help="print every sampler: A1111 name, schedule types, UNet calls, determinism; then exit")
    for name, (option, samplers) in sampler_options().items():
        p.add_argument(f"--{name.replace('_', '-')}", type=float, dest=f"option_{name}",
                       help=f"{', '.join(samplers)}: {option.help} (default {option.default:g})")
    p.add_argument("--seed", type=int, help="random seed; a random one is picked and printed if omitted")
    p.add_argument("--seed-mode", choices=SEED_MODES,
                   help="diffusers (default): one generator for the batch; a1111: image i of a batch is the image "
                        "seed + i gives alone, as in A1111 (needed by the variation-seed options)")
    p.add_argument("--subseed", type=int, help="a1111: A1111's variation seed (random if --subseed-strength is "
                                               "given without it)")
    p.add_argument("--subseed-strength", type=float,
                   help="a1111: how far toward the variation seed's noise, 0 (none) to 1 (all of it)")
    p.add_argument("--seed-resize-from", type=size_argument, metavar="WxH",
                   help="a1111: draw the seed's noise as at this size, centred (keeps a picture across sizes)")
    p.add_argument("--noise-seed-delta", type=int, metavar="ENSD",
                   help="a1111: A1111's eta noise seed delta: sampler noise from seed + ENSD (often 31337)")
    p.add_argument("--width", type=int,
                   help=f"image width in pixels, a multiple of 8 (default {DEFAULT_SIZE}; img2img: the init "
                        "image's, which is resized when --width and --height are given)")
    p.add_argument("--height", type=int, help=f"image height in pixels, a multiple of 8 (default {DEFAULT_SIZE})")
    p.add_argument("--batch-size", type=int, help="images to draw at once (same seed, one batch; default 1)")
    p.add_argument("--init-image", help="img2img: start from this image (its size, rounded down to x8, is used)")
    p.add_argument("--strength", type=float,
                   help=f"img2img: how much of the schedule to re-run, in (0, 1] (default {DEFAULT_STRENGTH}; "
                        "inpainting 1); 1 ignores the image's content")
    p.add_argument("--clip-skip", type=int,
                   help="A1111's clip skip: 1 = the text encoder's last layer (default), 2 = the one before "
                        "(what most anime fine-tunes expect; diffusers calls it clip_skip=1)")
    p.add_argument("--plain-prompt", action="store_true",
                   help="take the prompts literally: no emphasis (brackets), BREAK, prompt editing, AND or "
                        "<tag> removal (long prompts are still encoded whole)")
    p.add_argument("--embeddings-dir", action="append", metavar="DIR",
                   help=f"folder of textual-inversion embeddings (.pt/.bin/.safetensors; the trigger word is the "
                        f"file name); repeatable; default ${EMBEDDINGS_ENV}")
    p.add_argument("--lora", action="append", metavar="FILE[:W[:UNET_W]]",
                   help="apply a LoRA / LyCORIS file (or the name of one in a --lora-dir) with strength W (default "
                        "1) on the text encoder and on the UNet, or W on the text encoder and UNET_W on the UNet; "
                        "repeatable. Prompts may also name LoRAs, A1111's way: <lora:name:0.8>")
    p.add_argument("--lora-dir", action="append", metavar="DIR",
                   help=f"folder that <lora:name> tags and --lora names are found in; repeatable; default "
                        f"${LORAS_ENV}")
    p.add_argument("--lora-mode", choices=["merge", "on_the_fly"], default="merge",
                   help="merge the LoRAs into the weights for the run (restored exactly afterwards), or apply "
                        "them on the fly")
    p.add_argument("--out", default="outputs",
                   help="output folder (created if missing; files NNNNN-SEED.png) or a .png file name "
                        "(default: outputs)")
    p.add_argument("--device", help="cuda, cuda:1, cpu, mps ...; default CUDA when available")
    p.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                   help="model precision; auto = float16 on CUDA, float32 elsewhere")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: faster steps on a GPU, but every run pays minutes of compiling "
                        "first (partly cached on disk between runs), so it pays only for many steps or a big "
                        "batch; on CPU the default eager path is faster")
    p.add_argument("--int8", action="store_true",
                   help="CPU, float32 only: run the UNet's linear and conv layers in int8 (oneDNN; opt-in, "
                        "~5e-2 relative error per step). Faster than float32, slower than --dtype bfloat16 on "
                        "CPUs with AVX512-BF16 (BENCHMARKS.md, \"int8\")")
    p.add_argument("--mask", help="inpaint: repaint the init image where this image is white (RGBA: its alpha)")
    p.add_argument("--mask-blur", type=float, help="inpaint: A1111's mask blur in pixels (default 4)")
    p.add_argument("--invert-mask", action="store_true", help="inpaint: repaint where the mask is black")
    p.add_argument("--masked-content", choices=FILLS, help="inpaint: how the masked area starts (default original)")
    p.add_argument("--inpaint-only-masked", action="store_true",
                   help="inpaint: A1111's \"Only masked\": paint a crop around the mask at --width x --height, "
                        "paste it back")
    p.add_argument("--mask-padding", type=int, help="inpaint, only masked: pixels around the mask (default 32)")
    p.add_argument("--outpaint", metavar="L,R,T,B",
                   help="extend the init image by these many pixels left, right, top, bottom and paint them")
    p.add_argument("--inpaint-blend", choices=BLENDS,
                   help="inpaint, ordinary checkpoints: diffusers' latent blend (default) or A1111's x0 blend")
    control_args.add_arguments(p)
    p.add_argument("--hires", action="store_true",
                   help="txt2img: A1111's hires fix, a second img2img pass over the upscaled image (implied by any "
                        "--hr- option)")
    p.add_argument("--hr-scale", type=float, help="hires: upscale factor (default 2)")
    p.add_argument("--hr-resize", type=size_argument, metavar="WxH",
                   help="hires: upscale to this size instead (0 for one side keeps the aspect ratio)")
    p.add_argument("--hr-upscaler", help=f"hires: {', '.join(UPSCALERS)} (default Latent)")
    p.add_argument("--hr-steps", type=int, help="hires: second-pass steps (default 0: as many as the first pass)")
    p.add_argument("--hr-denoising-strength", type=float, help="hires: second-pass denoising strength (default 0.7)")
    p.add_argument("--hr-sampler", help="hires: the second pass's sampler (default: the first pass's)")
    p.add_argument("--hr-prompt", help="hires: the second pass's prompt (default: the first pass's)")
    p.add_argument("--hr-negative-prompt", help="hires: the second pass's negative prompt (default: the first's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def size_argument(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x768, got {text!r}")
    return int(width), int(height)


def sampler_options() -> dict[str, tuple]:
    """Every sampler option in the table -> (the option, the samplers that have it): one flag each."""
    found: dict[str, tuple] = {}
    for spec in SAMPLERS.values():
        for option in spec.options:
            found.setdefault(option.name, (option, []))[1].append(spec.name)
    return found


def build_request(args):
    """The Request the arguments describe (with `--from-png`: the PNG's, overridden by the arguments given),
    and the read-back details of the PNG (None without it)."""
    given = {field: getattr(args, dest) for dest, field in REQUEST_FIELDS.items() if getattr(args, dest) is not None}
    if args.plain_prompt:
        given["prompt_syntax"] = "plain"
    if args.lora:
        from ..adapters.library import LoraSpec
        given["loras"] = [LoraSpec.parse(text) for text in args.lora]
    options = {name: getattr(args, f"option_{name}") for name in sampler_options()
               if getattr(args, f"option_{name}") is not None}
    if options:
        given["sampler_options"] = options
    if args.schedule_type is not None and args.sampler is not None:
        given["sampler"] = resolve_sampler(args.sampler, args.schedule_type).full_name
    if args.outpaint is not None:
        if args.mask is not None or args.init_image is None:
            raise ValueError("--outpaint extends the --init-image (and makes its own mask: drop --mask)")
        canvas, mask = outpaint_canvas(args.init_image, *outpaint_sides(args.outpaint))
        given["init_image"], args.mask = canvas, mask
    if args.mask is not None:
        given["inpaint"] = inpaint_settings(args)
    elif any(v is not None for v in (args.mask_blur, args.masked_content, args.inpaint_blend, args.mask_padding)) \
            or args.invert_mask or args.inpaint_only_masked:
        raise ValueError("--mask-blur, --invert-mask, --masked-content, --inpaint-blend, --inpaint-only-masked and "
                         "--mask-padding set up inpainting: give the mask (--mask FILE) and the image (--init-image)")
    if args.controlnet:          # the ControlNets load with the models; their place in the request is taken
        given["control"] = ()
    alone = None if args.sampler is not None else args.schedule_type      # --schedule-type without --sampler
    if args.from_png is None:
        request = Request(**given)
        return with_hires(with_schedule_type(request, alone), args), None
    text = read_infotext(Path(args.from_png))
    back = Request.from_infotext(text, **given)
    back = dataclasses.replace(back, request=with_hires(with_schedule_type(back.request, alone), args))
    if back.unsupported:
        log.warning("%s: not applied (fields sd15 does not support, or that do not apply to this request): %s",
                    args.from_png, ", ".join(f"{k}: {v}" for k, v in back.unsupported.items()))
    if not back.found:
        log.warning("%s: its text has no settings line (Steps: ..., Sampler: ...): all of it is taken as the "
                    "prompt, with sd15's default settings", args.from_png)
    elif "Seed" not in back.found and args.seed is None:
        log.warning("%s: its infotext has no Seed: a random one is used", args.from_png)
    if "Denoising strength" in back.unsupported and back.request.init_image is None:
        log.warning("the PNG was made by img2img: pass --init-image (the image it started from) to "
                    "regenerate it; running txt2img with its settings instead")
    return back.request, back


def inpaint_settings(args) -> Inpaint:
    given = {"blur": args.mask_blur, "fill": args.masked_content, "blend": args.inpaint_blend,
             "padding": args.mask_padding}
    return Inpaint(args.mask, invert=args.invert_mask, only_masked=args.inpaint_only_masked,
                   **{k: v for k, v in given.items() if v is not None})


def outpaint_sides(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--outpaint takes LEFT,RIGHT,TOP,BOTTOM in pixels such as 0,128,0,0, got {text!r}")
    return tuple(int(p) for p in parts)


def with_schedule_type(request: Request, schedule_type: str | None) -> Request:
    """--schedule-type alone: the request's sampler (the default, or the PNG's) on that schedule type."""
    if schedule_type is None:
        return request
    return dataclasses.replace(request, sampler=resolve_sampler(request.spec.name, schedule_type).full_name)


HIRES_FLAGS = {"hr_scale": "scale", "hr_resize": "resize", "hr_upscaler": "upscaler", "hr_steps": "steps",
               "hr_denoising_strength": "denoising_strength", "hr_sampler": "sampler", "hr_prompt": "prompt",
               "hr_negative_prompt": "negative_prompt"}


def with_hires(request: Request, args) -> Request:
    """--hires / --hr-*: the request's hires fix (the PNG's, or the defaults) with the options given."""
    given = {field: getattr(args, flag) for flag, field in HIRES_FLAGS.items() if getattr(args, flag) is not None}
    if not given and not args.hires:
        return request
    if "scale" in given and "resize" not in given:
        given["resize"] = None           # --hr-scale replaces the PNG's resize, and --hr-resize its scale
    elif "resize" in given and "scale" not in given:
        given["scale"] = 2.0
    return dataclasses.replace(request, hires=dataclasses.replace(request.hires or Hires(), **given))


def nfe_formula(nfe) -> str:
    """A sampler's UNet calls for N steps as a formula: "N", "2N-1", "N+1"."""
    slope = nfe(3) - nfe(2)
    offset = nfe(2) - 2 * slope
    if any(nfe(n) != slope * n + offset for n in (10, 25, 50)):
        return ", ".join(f"{nfe(n)} for {n}" for n in (1, 10, 25))
    formula = (f"{slope}N" if slope != 1 else "N") + (f"{offset:+d}" if offset else "")
    return formula if nfe(1) == slope + offset else f"{formula} ({nfe(1)} for 1)"


def list_samplers() -> str:
    rows = [("name", "A1111 name", "Automatic is", "schedule types", "UNet calls", "deterministic")]
    for spec in SAMPLERS.values():
        schedules = ("all" if spec.schedules is None else
                     ", ".join(SCHEDULE_TYPES[s].label for s in spec.accepted_schedules))
        rows.append((spec.name, spec.label, SCHEDULE_TYPES[spec.default_schedule].label, schedules,
                     nfe_formula(spec.nfe), "yes" if spec.deterministic else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + ["", "schedule types: " + ", ".join(f"{s.label} ({s.name})" for s in SCHEDULE_TYPES.values()),
                              "a name with a schedule: SAMPLER_SCHEDULE (euler_a_karras) or A1111's 'DPM++ 2M Karras'; "
                              "UNet calls are per guidance pass (CFG doubles the batch, not the calls)"])


def read_infotext(path: Path) -> str:
    from ..pipeline.images import open_image
    image = open_image(path, what="--from-png image")
    text = getattr(image, "text", {}).get("parameters") or image.info.get("parameters")
    if not text:
        raise ValueError(f"--from-png: {path} carries no A1111 'parameters' text (nothing to regenerate)")
    return text


def _device(name: str | None):
    """The torch device a --device value means (none: the loader's default)."""
    import torch
    from ..models.loading import default_device
    return torch.device(name) if name else default_device()


def check_files(args) -> None:
    """Files and the device, checked before anything loads."""
    check_device(args.device)
    if args.int8 and (args.dtype not in ("auto", "float32") or args.compile or _device(args.device).type != "cpu"):
        raise ValueError("--int8 is for the float32 CPU engine: use it without --dtype (or with float32), without "
                         "--compile, and with --device cpu")
    if args.demo and args.vae is not None:
        raise ValueError("--demo runs its own tiny model, whose VAE no real VAE file fits; drop --vae")
    for flag, given, env in (("--embeddings-dir", args.embeddings_dir, EMBEDDINGS_ENV),
                             ("--lora-dir", args.lora_dir, LORAS_ENV)):
        for folder in folders(given, env):
            if not Path(folder).is_dir():
                raise ValueError(f"folder {folder} ({flag if given else '$' + env}) does not exist or is not a folder")
    if args.lora:
        from ..adapters.library import LoraSpec, Loras
        library = Loras(folders(args.lora_dir, LORAS_ENV))
        for text in args.lora:
            library.find(LoraSpec.parse(text).name, paths_allowed=True)    # names a file that is there
    if not args.demo and not args.ckpt:
        raise ValueError(f"no checkpoint: pass --ckpt FILE or set ${CKPT_ENV} (or try --demo)")
    if not args.demo and not Path(args.ckpt).exists():
        raise ValueError(f"checkpoint {args.ckpt} does not exist")
    if args.vae is not None and not Path(args.vae).exists():
        raise ValueError(f"VAE file {args.vae} does not exist")


def folders(given: list[str] | None, env: str = EMBEDDINGS_ENV) -> list[str]:
    """The folders given on the command line, else those of the variable (separated by the path separator)."""
    if given:
        return given
    return [d for d in os.environ.get(env, "").split(os.pathsep) if d]


def output_paths(out: str, seeds: list[int]) -> list[Path]:
    """Where each image goes: a .png name (NAME-i.png for a batch) or NNNNN-SEED.png in a folder (each image's
    own seed: they differ in a1111 seed mode).

    Folders are created; existing files are never reused.
    """
    out_path = Path(out)
    if out_path.suffix.lower() in (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"):
        raise ValueError(f"--out {out}: sd15 writes PNG files (they carry the infotext); use a .png name or a folder")
    is_file, count = out_path.suffix.lower() == ".png", len(seeds)
    folder = out_path.parent if is_file else out_path
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {out}: {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write to {folder}: permission denied")
    if is_file:
        paths = [out_path] if count == 1 else [out_path.with_name(f"{out_path.stem}-{i}.png") for i in range(count)]
    else:
        taken = [int(m.group(1)) for f in folder.iterdir() if (m := re.match(r"(\d{5})-", f.name))]
        start = max(taken, default=-1) + 1
        paths = [folder / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} already exists; not overwriting it (choose another --out)")
    return paths


def load_pipeline(args, tmp: Path):
    import torch

    from ..models.demo import write_demo_checkpoint
    from ..pipeline import load
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.demo:
        ckpt = write_demo_checkpoint(tmp / "tiny-random-demo.safetensors")
        print("DEMO: tiny random-weight checkpoint; the image will be noise. "
              "Pass --ckpt with real SD 1.5 weights for real images.", file=sys.stderr)
        pipe = load(ckpt, device=args.device, dtype=dtype, embedding_dirs=folders(args.embeddings_dir),
                    lora_dirs=folders(args.lora_dir, LORAS_ENV))
    else:
        pipe = load(args.ckpt, vae=args.vae, device=args.device, dtype=dtype, ema=args.ema,
                    embedding_dirs=folders(args.embeddings_dir), lora_dirs=folders(args.lora_dir, LORAS_ENV))
    pipe.lora_mode = args.lora_mode
    if args.int8:
        from ..models.int8 import quantize_int8
        quantize_int8(pipe.unet)
    return pipe


def warn_about_model(back, pipe) -> None:
    """--from-png on another model (or embeddings) than the ones that made the image: say so."""
    loaded = {ti_name(name): name for name in pipe.embeddings.names()}       # as A1111 writes the names
    for written, used in back.ti_hashes.items():
        name = loaded.get(written, written)
        if name not in pipe.embeddings:
            log.warning("the PNG used the embedding %s [%s], which is not loaded (--embeddings-dir): its name "
                        "is read as words", name, used)
        elif pipe.embeddings[name].hash != used:
            log.warning("the PNG used the embedding %s [%s]; the loaded one is [%s]", name, used,
                        pipe.embeddings[name].hash)
    from ..adapters.files import adapter_hash
    for name, used in back.lora_hashes.items():
        try:
            path = pipe.loras.find(name, paths_allowed=False)
        except ValueError:
            continue                   # a tag naming it fails on its own, with the folders it looked in
        if adapter_hash(path) != used:
            log.warning("the PNG used the LoRA %s [%s]; the one in the LoRA folders is [%s]", name, used,
                        adapter_hash(path))
    made_with = back.model
    if made_with.hash and pipe.model_hash and made_with.hash.lower() != pipe.model_hash.lower():
        log.warning("the PNG was made with model %s [%s]; this run uses %s [%s], so expect a different picture",
                    made_with.name or "?", made_with.hash, pipe.model_info.name, pipe.model_hash)


def run(args) -> list[Path]:
    from tqdm import tqdm

    request, back = build_request(args)
    units = control_args.units(args)
    check_files(args)
    request = request.with_seed()
    paths = output_paths(args.out, request.all_seeds)

    with tempfile.TemporaryDirectory(prefix="sd15-") as tmp:
        pipe = load_pipeline(args, Path(tmp))
        if back is not None and not args.demo:
            warn_about_model(back, pipe)
        if units:
            request = dataclasses.replace(request, control=tuple(unit.control(pipe) for unit in units))
        if args.compile:
            if pipe.device.type == "cpu":
                log.warning("--compile on CPU: the eager fast path measured faster; compiling anyway")
            log.warning("--compile: the first step compiles the UNet, which takes minutes")
            pipe.compile()
        bar = tqdm(total=request.steps, desc="sampling", unit="step", disable=args.quiet, file=sys.stderr)

        def progress(step, total, _latents):
            bar.total = total
            bar.update(step - bar.n)

        try:
            images = pipe.generate(request, progress)
        except Exception as e:
            if args.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):  # no C++ compiler, no Triton
                raise ValueError(f"--compile failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                                 "run without --compile") from None
            raise
        finally:
            bar.close()
    for image, path in zip(images, paths):
        png.save_png(image, path, image.info.get("parameters"))
        print(path)
    if back is not None and back.batch_pos is not None and len(paths) > back.batch_pos:
        print(f"the PNG was image {back.batch_pos} of its batch: {paths[back.batch_pos]}", file=sys.stderr)
    seeds = dict.fromkeys(request.all_seeds)
    print(f"seed: {request.seed}" if len(seeds) == 1 else f"seeds: {', '.join(map(str, seeds))}", file=sys.stderr)
    return paths


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_samplers:
        print(list_samplers())
        return 0
    if args.prompt is None and args.from_png is None:
        parser.error("the following arguments are required: --prompt (or --from-png IMAGE)")
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    try:
        run(args)
    except KeyboardInterrupt:
        print("interrupted; no partial image was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileExistsError, OSError, ImportError) as e:   # CheckpointError, ImageError: ValueErrors;
        # ImportError: an optional extra a feature needs (torchsde for the SDE samplers), named in the message
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0
