"""`python -m sd15.generate`: prompt in, PNG out.

    python -m sd15.generate --ckpt v1-5-pruned-emaonly.safetensors --prompt "a lighthouse at dusk" --seed 42
    python -m sd15.generate --demo --prompt "anything"      # tiny random weights: checks the install, draws noise

Every argument is checked before the model loads; errors print one line and exit with status 2.
"""

import argparse
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

from . import validation
from .pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
from .samplers import SAMPLERS

CKPT_ENV = "SD15_CKPT"
log = logging.getLogger("sd15")
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sd15.generate", description="Generate images with a Stable Diffusion 1.x checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (the unconditional prompt)")
    p.add_argument("--ckpt", default=os.environ.get(CKPT_ENV),
                   help=f"SD 1.x checkpoint (.safetensors or .ckpt); defaults to ${CKPT_ENV}")
    p.add_argument("--vae", help="separate VAE file replacing the checkpoint's (e.g. vae-ft-mse-840000-ema-pruned)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA UNet weights if it has them")
    p.add_argument("--demo", action="store_true",
                   help="ignore --ckpt and run on a tiny random-weight checkpoint: checks the install end to "
                        "end; the image is NOISE")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps")
    p.add_argument("--cfg-scale", type=float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance scale (1 disables the negative prompt pass)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER,
                   help=f"one of {', '.join(SAMPLERS)}, or A1111 names such as 'Euler a', 'DPM++ 2M Karras'")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM only: 0 deterministic, 1 DDPM-like noise")
    p.add_argument("--seed", type=int, help="random seed; a random one is picked and printed if omitted")
    p.add_argument("--width", type=int, default=512, help="image width in pixels, a multiple of 8")
    p.add_argument("--height", type=int, default=512, help="image height in pixels, a multiple of 8")
    p.add_argument("--batch-size", type=int, default=1, help="images to draw at once (same seed, one batch)")
    p.add_argument("--init-image", help="img2img: start from this image (its size, rounded down to x8, is used)")
    p.add_argument("--strength", type=float, default=0.75,
                   help="img2img: how much of the schedule to re-run, in (0, 1]; 1 ignores the image's content")
    p.add_argument("--out", default="outputs",
                   help="output folder (created if missing; files NNNNN-SEED.png) or a .png file name")
    p.add_argument("--device", help="cuda, cuda:1, cpu, mps ...; default CUDA when available")
    p.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                   help="model precision; auto = float16 on CUDA, float32 elsewhere")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: faster steps on a GPU, but every run pays minutes of compiling "
                        "first (partly cached on disk between runs), so it pays only for many steps or a big "
                        "batch; on CPU the default eager path is faster")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(args) -> None:
    """Every cheap check, before the model is loaded."""
    if args.init_image is None:
        validation.check_size(args.width, args.height)
    validation.check_sampling(args.steps, args.cfg_scale, args.batch_size, args.eta, args.seed, args.sampler,
                              strength=1.0 if args.init_image is None else args.strength)
    if not args.demo and not args.ckpt:
        raise ValueError(f"no checkpoint: pass --ckpt FILE or set ${CKPT_ENV} (or try --demo)")
    if not args.demo and not Path(args.ckpt).exists():
        raise ValueError(f"checkpoint {args.ckpt} does not exist")
    if args.vae is not None and not Path(args.vae).exists():
        raise ValueError(f"VAE file {args.vae} does not exist")


def output_paths(out: str, count: int, seed: int) -> list[Path]:
    """Where each image goes: a .png name (NAME-i.png for a batch) or NNNNN-SEED.png in a folder.

    Folders are created; existing files are never reused.
    """
    out_path = Path(out)
    is_file = out_path.suffix.lower() == ".png"
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
        paths = [folder / f"{start + i:05d}-{seed}.png" for i in range(count)]
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} already exists; not overwriting it (choose another --out)")
    return paths


def load_pipeline(args, tmp: Path):
    import torch

    import sd15
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.demo:
        from tools.make_checkpoint import random_state_dict, save, tiny_metadata
        ckpt = tmp / "tiny-random-demo.safetensors"
        save(random_state_dict(seed=0), ckpt, metadata=tiny_metadata())
        print("DEMO: tiny random-weight checkpoint; the image will be noise. "
              "Pass --ckpt with real SD 1.5 weights for real images.", file=sys.stderr)
        return sd15.load(ckpt, device=args.device, dtype=dtype)
    return sd15.load(args.ckpt, vae=args.vae, device=args.device, dtype=dtype, ema=args.ema)


def run(args) -> list[Path]:
    from tqdm import tqdm

    from .images import init_image_tensor
    from .png import save_png
    from .pipeline import random_seed

    check_args(args)
    if args.init_image is not None:
        init_image_tensor(args.init_image)          # a missing or broken image fails before the load
    seed = random_seed() if args.seed is None else args.seed
    paths = output_paths(args.out, args.batch_size, seed)

    with tempfile.TemporaryDirectory(prefix="sd15-") as tmp:
        pipe = load_pipeline(args, Path(tmp))
        if args.compile:
            if pipe.device.type == "cpu":
                log.warning("--compile on CPU: the eager fast path measured faster; compiling anyway")
            log.warning("--compile: the first step compiles the UNet, which takes minutes")
            pipe.compile()
        bar = tqdm(total=args.steps, desc="sampling", unit="step", disable=args.quiet, file=sys.stderr)

        def progress(step, total, _latents):
            bar.total = total
            bar.update(step - bar.n)

        common = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.cfg_scale,
                      sampler=args.sampler, seed=seed, batch_size=args.batch_size, eta=args.eta,
                      progress=progress)
        try:
            if args.init_image is not None:
                images = pipe.img2img(args.init_image, args.prompt, strength=args.strength, **common)
            else:
                images = pipe.txt2img(args.prompt, width=args.width, height=args.height, **common)
        except Exception as e:
            if args.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):  # no C++ compiler, no Triton
                raise ValueError(f"--compile failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                                 "run without --compile") from None
            raise
        finally:
            bar.close()
    for image, path in zip(images, paths):
        save_png(image, path, image.info.get("parameters"))
        print(path)
    print(f"seed: {seed}", file=sys.stderr)
    return paths


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    try:
        run(args)
    except KeyboardInterrupt:
        print("interrupted; no partial image was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileExistsError, OSError) as e:      # CheckpointError and ImageError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
