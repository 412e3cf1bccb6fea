"""`python -m sd15.batch JOB --out DIR`: the command line of batch jobs.

    python -m sd15.batch prompts.jsonl --out out --ckpt v1-5-pruned-emaonly.safetensors
    python -m sd15.batch prompts.csv --out out --demo                 # tiny random model: checks a job file
    python -m sd15.batch prompts.jsonl --out /shared/out --ckpt /shared/v1-5.safetensors --ray auto

Exit status: 0 when every image was made; else the number of failed rows (lines of errors.jsonl), at
most 100; 101 when the job could not run at all (bad arguments, an unreadable job file, rows changed
since the images in --out were made); 130 when interrupted (run the same command again to resume).
"""

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from ..pipeline.validation import check_device
from .job import JobError
from .render import CrashHook, Settings
from .session import Options, StopFlag, run_job

EXIT_JOB_ERROR, EXIT_INTERRUPTED, MAX_FAILED_STATUS = 101, 130, 100
CKPT_ENV, EMBEDDINGS_ENV, LORAS_ENV = "SD15_CKPT", "SD15_EMBEDDINGS", "SD15_LORAS"     # as sd15.generate's


class _Parser(argparse.ArgumentParser):
    def error(self, message):           # status 2 would read as "2 rows failed"
        self.print_usage(sys.stderr)
        self.exit(EXIT_JOB_ERROR, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sd15.batch",
                description="Make one image per row of a JSONL or CSV job file (list values make a grid). "
                            "Running the same command again resumes: images already made are skipped.",
                epilog="Exit status: 0 all made; N = rows that failed (errors.jsonl), at most 100; 101 the job "
                       "could not run; 130 interrupted. Columns: see the README, 'Generating many images'.")
    p.add_argument("job", type=Path, nargs="?",
                   help="the job: .jsonl (a JSON object per line) or .csv (a header of columns)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder: ID.png per image, manifest.jsonl, errors.jsonl, grids/")
    p.add_argument("--ckpt", default=os.environ.get(CKPT_ENV),
                   help=f"SD 1.x checkpoint (.safetensors or .ckpt); defaults to ${CKPT_ENV}")
    p.add_argument("--demo", action="store_true",
                   help="ignore --ckpt and use a tiny random-weight checkpoint: the images are NOISE")
    p.add_argument("--seed", type=int, default=0,
                   help="job seed: rows without a seed get one derived from it and their id (default 0)")
    p.add_argument("--force", action="store_true",
                   help="make rows again whose settings changed since their image in --out was made")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data: a new local Ray instance (or $RAY_ADDRESS's cluster), or the cluster "
                        "at ADDRESS (auto, ray://host:10001, host:6379); needs pip install 'sd15[ray]'")
    p.add_argument("--workers", type=int, help="Ray: generator workers (default: one per GPU, else one)")
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: CUDA when available)")
    p.add_argument("--threads", type=int,
                   help="torch threads per generating process (default: torch's locally, a Ray worker's CPU "
                        "share); CPU results are bit-equal between runs with the same count")
    p.add_argument("--lora-dir", action="append", help=f"folder of LoRA files (repeatable; default ${LORAS_ENV})")
    p.add_argument("--embeddings-dir", action="append",
                   help=f"folder of textual-inversion embeddings (repeatable; default ${EMBEDDINGS_ENV})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str]):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.job is None:        # `--ray job.jsonl`: argparse gave the job to --ray's optional address
        if not (args.ray and Path(args.ray).is_file()):
            parser.error("the following arguments are required: job")
        args.job, args.ray = Path(args.ray), ""
    return args


def options_of(args) -> Options:
    """The run's options, every argument checked (ValueError) before any model is loaded."""
    if not args.demo and not args.ckpt:
        raise ValueError(f"no checkpoint: pass --ckpt FILE or set ${CKPT_ENV} (or try --demo)")
    if not args.demo and not Path(args.ckpt).is_file():
        raise ValueError(f"checkpoint {args.ckpt} does not exist")
    if args.workers is not None and (args.ray is None or args.workers < 1):
        raise ValueError("--workers N (N >= 1) sets the number of Ray workers: use it with --ray")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    check_device(args.device)
    lora_dirs, embedding_dirs = folders(args.lora_dir, LORAS_ENV), folders(args.embeddings_dir, EMBEDDINGS_ENV)
    for flag, given in (("--lora-dir", lora_dirs), ("--embeddings-dir", embedding_dirs)):
        for folder in given:
            if not Path(folder).is_dir():
                raise ValueError(f"{flag} {folder}: no such folder")
    settings = Settings(base_dir=str(args.job.resolve().parent),
                        ckpt=None if args.demo else str(Path(args.ckpt).resolve()), demo=args.demo,
                        device=args.device, lora_dirs=tuple(str(Path(d).resolve()) for d in lora_dirs),
                        embedding_dirs=tuple(str(Path(d).resolve()) for d in embedding_dirs),
                        crash=CrashHook.from_env(), threads=args.threads)
    return Options(job=args.job, out=args.out, settings=settings, job_seed=args.seed, force=args.force,
                   ray=args.ray, workers=args.workers, progress=not args.quiet)


def folders(given: list[str] | None, env: str) -> list[str]:
    """The folders given on the command line, else those of the variable (separated by the path separator)."""
    return given or [d for d in os.environ.get(env, "").split(os.pathsep) if d]


def exit_status(failed: int) -> int:
    return min(failed, MAX_FAILED_STATUS)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]      # paths welcome from Python
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    resume = shlex.join(["python", "-m", "sd15.batch", *argv])
    try:
        with StopFlag() as stop:
            summary = run_job(options_of(args), stop)
    except KeyboardInterrupt:
        print(f"interrupted; every image written is complete. To resume, run the same command again:\n  {resume}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except (JobError, ValueError, OSError, ImportError) as e:    # ImportError: the ray extra, named in the message
        print(f"error: {e}", file=sys.stderr)
        return EXIT_JOB_ERROR
    rate = f", {60 * summary.made / summary.seconds:.1f} img/min" if summary.made and summary.seconds else ""
    if summary.temp_files_removed:
        print(f"removed {summary.temp_files_removed} temporary file(s) an interrupted run left", file=sys.stderr)
    errors = f" (see {args.out / 'errors.jsonl'})" if summary.failed else ""
    again = f" ({summary.redone} of them again: file missing or broken)" if summary.redone else ""
    print(f"{summary.made} made{again}, {summary.skipped} already there, {summary.failed} failed{errors}, "
          f"{summary.total} in the job; {summary.seconds:.1f} s{rate}", file=sys.stderr)
    if summary.interrupted:
        print(f"interrupted after the current image. To resume, run the same command again:\n  {resume}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return exit_status(summary.failed)
