"""Making one image of a job: the same code in the local runner and in every Ray worker.

    settings = Settings(ckpt="v1-5.safetensors", base_dir="/jobs")
    pipe = load_pipeline(settings, tmp_dir)      # once per process
    png = render(pipe, item, settings)           # the PNG file's bytes, infotext included

`Settings` is plain data (it travels to Ray workers): file paths must mean the same on every machine
(shared storage, or the same layout), since each worker opens the checkpoint, init images and LoRAs itself.
"""

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..pipeline.png import png_bytes
from .fields import request_of
from .job import Item

DEMO_NAME = "tiny-random-demo.safetensors"      # the CLI's name: the infotext says "Model: tiny-random-demo"
# Test-only: a JSON {"id": ..., "marker": ...} making the process die (os._exit) when it starts that image,
# once if a marker file is named (it is created first), else every time. Read from the environment of the
# process that starts the run, never from a job file, so no job can trigger it.
CRASH_ENV = "SD15_BATCH_TEST_CRASH"
CRASH_STATUS = 86


@dataclass(frozen=True)
class CrashHook:
    id: str
    marker: str | None = None

    @classmethod
    def from_env(cls) -> "CrashHook | None":
        text = os.environ.get(CRASH_ENV)
        return cls(**json.loads(text)) if text else None

    def before(self, item_id: str) -> None:
        if item_id != self.id:
            return
        if self.marker is not None:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return                          # crashed once already
        os._exit(CRASH_STATUS)


@dataclass(frozen=True)
class Result:
    """What making one image gave: its PNG, or the error that stopped it."""
    id: str
    png: bytes | None
    seconds: float
    error: str | None = None


@dataclass(frozen=True)
class Settings:
    base_dir: str                           # the job file's folder: relative paths in rows start there
    ckpt: str | None = None                 # None with demo=True
    demo: bool = False
    device: str | None = None
    lora_dirs: tuple[str, ...] = ()
    embedding_dirs: tuple[str, ...] = ()
    crash: CrashHook | None = None
    # torch threads of each generating process (local, or each Ray worker); None: torch's default locally, a
    # Ray worker's CPU share. CPU kernels split their sums by thread, so equal images need equal counts.
    threads: int | None = None


def checkpoint_path(settings: Settings, tmp: Path) -> Path:
    """The checkpoint file: the given one, or the demo one written into `tmp` (the same bytes everywhere)."""
    if not settings.demo:
        return Path(settings.ckpt)
    from ..models.demo import write_demo_checkpoint
    path = Path(tmp) / DEMO_NAME
    if not path.exists():
        write_demo_checkpoint(path)
    return path


def model_hash(settings: Settings) -> str:
    """The checkpoint's A1111 hash (10 hex digits of its sha256), without loading it."""
    from ..files.hashing import sha256_short
    with tempfile.TemporaryDirectory(prefix="sd15-batch-") as tmp:
        return sha256_short(checkpoint_path(settings, Path(tmp)))


def load_pipeline(settings: Settings, tmp: Path):
    from ..pipeline.loading import load
    return load(checkpoint_path(settings, tmp), device=settings.device, embedding_dirs=settings.embedding_dirs,
                lora_dirs=settings.lora_dirs)


def render(pipe, item: Item, settings: Settings) -> bytes:
    """The PNG of one image of the job, with its A1111 infotext."""
    if settings.crash is not None:
        settings.crash.before(item.id)
    request = request_of(item.fields, Path(settings.base_dir))
    image = pipe.generate(request)[0]
    return png_bytes(image, image.info.get("parameters"))


def attempt(pipe, item: Item, settings: Settings) -> Result:
    """render(), timed, with a row's exception turned into its error line (the job goes on)."""
    start = time.perf_counter()
    try:
        png = render(pipe, item, settings)
    except Exception as e:           # noqa: BLE001 -- any failure of one row is that row's, reported
        return Result(item.id, None, time.perf_counter() - start, describe(e))
    return Result(item.id, png, time.perf_counter() - start)


def describe(error: BaseException) -> str:
    """A row's failure as one line for errors.jsonl: our errors say what to fix; others name their type."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if isinstance(error, ValueError) and text else f"{type(error).__name__}: {text or repr(error)}"
