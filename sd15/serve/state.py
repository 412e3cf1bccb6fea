"""What a running server holds: its settings and the few services the routes use.

    loader = PipelineLoader(device="cpu", lora_dirs=[...], embedding_dirs=[...])
    state = ServerState.start(ckpt, models_dir=..., loader=loader, access=Access(credentials={"u": "p"}))
    app = build_app(state)                          # sd15.serve.app
    state.close()                                   # stops the job worker

Each part has one job: `models` (which checkpoints, which is loaded), `jobs` (one at a time, progress,
stopping), `options` (A1111's settings), `outputs` (save_images), `access` and `limits` (what the
middlewares and the mapping check). The loader builds a pipeline the way the server needs it: LoRA and
embedding folders that only serve files really inside them.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..conditioning.embeddings import EXTENSIONS as EMBEDDING_EXTENSIONS
from ..pipeline.loading import load
from .controlnet import ControlNetLibrary
from .jobs import JobQueue
from .limits import Limits
from .models import ContainedLoras, ModelStore, contained_files
from .options import Options
from .security import is_loopback_host
from .outputs import OutputFolder

log = logging.getLogger("sd15.serve")


@dataclass(frozen=True)
class Access:
    """Who may use the server, and from where."""
    credentials: dict[str, str] = field(default_factory=dict)     # --api-auth; empty: no auth
    cors_origins: tuple[str, ...] = ()                            # --cors-allow-origins; empty: CORS off
    loopback_only: bool = True          # bound to loopback: only Host names that are loopback (DNS rebinding)
    allowed_hosts: tuple[str, ...] = ()                           # --allowed-hosts: names allowed besides

    def host_allowed(self, name: str) -> bool:
        if name.lower() in (h.lower() for h in self.allowed_hosts):
            return True
        return is_loopback_host(name) if self.loopback_only else not self.allowed_hosts


@dataclass
class PipelineLoader:
    """path -> Pipeline with the server's device, dtype and folders; remembers the embeddings it skipped."""
    device: str | None = None
    dtype: object = None
    lora_dirs: Sequence[Path] = ()
    embedding_dirs: Sequence[Path] = ()
    skipped_embeddings: dict[str, str] = field(default_factory=dict)

    def __call__(self, path: Path):
        pipe = load(path, device=self.device, dtype=self.dtype)
        pipe.loras = ContainedLoras(self.lora_dirs)
        skipped = {}
        for folder in self.embedding_dirs:
            for name, real in contained_files(folder, EMBEDDING_EXTENSIONS):
                try:
                    pipe.add_embedding(real)
                except ValueError as e:       # CheckpointError too; named without the server's paths
                    skipped[Path(name).stem] = str(e).replace(str(real), name)
                    log.warning("embedding %s skipped: %s", name, skipped[Path(name).stem])
        self.skipped_embeddings = skipped
        pipe.model_hash               # read now (the file was just read), not during the first request
        return pipe


@dataclass
class ServerState:
    models: ModelStore
    jobs: JobQueue
    loader: PipelineLoader
    options: Options = field(default_factory=Options)
    access: Access = field(default_factory=Access)
    limits: Limits = field(default_factory=Limits)
    outputs: OutputFolder | None = None
    controlnets: ControlNetLibrary = field(default_factory=lambda: ControlNetLibrary(None))

    @classmethod
    def start(cls, ckpt: Path, *, models_dir: Path | None = None, loader: PipelineLoader | None = None,
              access: Access | None = None, limits: Limits | None = None, outputs: Path | None = None,
              controlnet_dir: Path | None = None) -> "ServerState":
        """Load `ckpt`, start the job worker and the background hashing of the models folder."""
        loader = loader or PipelineLoader()
        limits = limits or Limits()
        models = ModelStore(models_dir, Path(ckpt), loader)
        models.start_hashing()
        return cls(models, JobQueue(limits.max_queue), loader, access=access or Access(), limits=limits,
                   outputs=OutputFolder(outputs) if outputs is not None else None,
                   controlnets=ControlNetLibrary(controlnet_dir))

    def scrub(self, message: str) -> str:
        """An engine message without the server's absolute folder paths (LoRA errors name the folders)."""
        folders = [("<models>", self.models.models_dir), ("<controlnets>", self.controlnets.folder),
                   *(("<loras>", d) for d in self.loader.lora_dirs),
                   *(("<embeddings>", d) for d in self.loader.embedding_dirs)]
        for label, folder in folders:
            if folder is not None:
                for spelled in {str(folder), str(Path(folder).resolve())}:
                    message = message.replace(spelled, label)
        return message

    def close(self) -> None:
        self.jobs.close()
