"""One run of a batch job, locally or on Ray: read and check the job, work out what is left, make it,
write each result as it arrives, then the contact sheets.

    summary = run_job(Options(job=Path("prompts.jsonl"), out=Path("out"), settings=Settings(...)), stop)
    summary.made, summary.skipped, summary.failed, summary.interrupted

The runners (sd15.batch.local, sd15.batch.ray_runner) only make images and yield results; everything
that touches the output folder happens here, in one process, the same way for both.
"""

import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters.library import Loras
from ..pipeline.png import png_bytes
from .contact import contact_sheet
from .job import GridRow, JobError, read_job
from .output import OutputDir
from .render import Settings, model_hash
from .resume import changed_message, make_plan

log = logging.getLogger("sd15.batch")


class JobChanged(JobError):
    """Rows whose id is in the manifest with other settings (and no --force)."""


@dataclass
class Options:
    job: Path
    out: Path
    settings: Settings
    job_seed: int = 0
    force: bool = False
    ray: str | None = None          # None: run locally; "": Ray (a new local cluster, or $RAY_ADDRESS); else an address
    workers: int | None = None      # Ray actors; default: one per GPU, else one
    progress: bool = True


@dataclass
class Summary:
    total: int = 0                  # images in the job (bad rows not counted)
    made: int = 0                   # this run
    skipped: int = 0                # made before, intact
    redone: int = 0                 # made again: their file was missing or broken
    failed: int = 0                 # rows in errors.jsonl: bad rows and rows that raised
    interrupted: bool = False
    seconds: float = 0.0
    temp_files_removed: int = 0
    duplicates_dropped: int = 0     # results that arrived twice (a Ray task retried after a worker died)
    grids: list[Path] = field(default_factory=list)


class StopFlag:
    """Ctrl-C once: stop after the current image. Twice: stop now (nothing partial is ever written)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def request(self, *_args) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after the current image (Ctrl-C again to stop at once)", file=sys.stderr)

    def __enter__(self) -> "StopFlag":
        try:
            self._previous = signal.signal(signal.SIGINT, self.request)
        except ValueError:              # not the main thread: no signal handling
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def run_job(options: Options, stop: StopFlag) -> Summary:
    started = time.perf_counter()
    settings = options.settings
    job = read_job(options.job, job_seed=options.job_seed, model_hash=model_hash(settings),
                   loras=Loras(settings.lora_dirs))
    summary = Summary(total=len(job.items))
    with OutputDir(options.out) as out:
        summary.temp_files_removed = len(out.remove_temp_files())
        plan = make_plan(job.items, out.manifest(), out, force=options.force)
        if plan.changed and not options.force:
            raise JobChanged(changed_message(plan.changed, options.job.name))
        out.rewrite_manifest(plan.keep)
        out.clear_errors()
        for bad in job.bad:
            out.record_error(bad.row, bad.id, bad.message)
        summary.skipped, summary.redone, summary.failed = len(plan.skipped), len(plan.redone), len(job.bad)
        made_now, finished = _make(plan.todo, options, out, stop, summary)
        summary.interrupted = finished < len(plan.todo)
        done = {e.id for e in plan.keep} | made_now
        for grid in job.grids:      # complete grids whose sheet is missing or shows an image made just now
            if all(i in done for i in grid.ids) and (any(i in made_now for i in grid.ids)
                                                     or not out.grid_path(grid.base_id).exists()):
                summary.grids.append(_write_sheet(out, grid))
    summary.seconds = time.perf_counter() - started
    return summary


def _make(todo, options: Options, out: OutputDir, stop: StopFlag, summary: Summary) -> tuple[set[str], int]:
    """Run the runner over `todo`, writing each result as it comes: (the ids made, the results written)."""
    by_id = {item.id: item for item in todo}
    seen: set[str] = set()
    made: set[str] = set()
    if options.ray is None:
        from .local import local_results
        results = local_results(todo, options.settings, stop)
    else:
        try:
            from .ray_runner import ray_results
        except ImportError as e:
            raise ImportError(f"--ray needs Ray Data ({e}): pip install 'sd15[ray]'") from None
        results = ray_results(todo, options.settings, stop, address=options.ray, workers=options.workers)
    bar = _Progress(summary.total, summary.skipped, enabled=options.progress)
    try:
        for result in results:
            if result.id in seen:             # a retried Ray task gives a row again: same bytes, written once
                summary.duplicates_dropped += 1
                continue
            seen.add(result.id)
            item = by_id[result.id]
            if result.error is None:
                out.write_image(item, result.png, result.seconds)
                made.add(item.id)
                summary.made += 1
            else:
                out.record_error(item.row, item.id, result.error)
                summary.failed += 1
            bar.update(summary)
            if stop.requested:
                break
    finally:
        results.close()
        bar.close()
    return made, len(seen)


def _write_sheet(out: OutputDir, grid: GridRow) -> Path:
    from PIL import Image
    images = {}
    for item_id in grid.ids:
        with Image.open(out.path / f"{item_id}.png") as im:
            images[item_id] = im.convert("RGB")
    return out.write_grid(grid.base_id, png_bytes(contact_sheet(grid, images)))


class _Progress:
    """tqdm on stderr: images done / total (those made before included), images per minute, ETA, failures."""

    def __init__(self, total: int, done_before: int, enabled: bool):
        from tqdm import tqdm
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, initial=done_before, unit="img", file=sys.stderr, disable=not enabled,
                        desc="batch", bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} images "
                                                 "[{elapsed}{postfix}]")

    def update(self, summary: Summary) -> None:
        finished = summary.made + summary.failed
        elapsed = time.perf_counter() - self.started
        per_minute = 60 * summary.made / elapsed if elapsed > 0 else 0.0
        left = self.bar.total - self.bar.n - 1
        eta = left / (finished / elapsed) if finished and elapsed > 0 else float("nan")
        failed = f", {summary.failed} failed" if summary.failed else ""
        self.bar.set_postfix_str(f"{per_minute:.1f} img/min, ETA {_duration(eta)}{failed}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:               # NaN: no rate yet
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"
