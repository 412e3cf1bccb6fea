"""The Ray Data runner: the same images as the local runner, made by a pool of Ray actors that each load
the model once (one GPU each where the cluster has GPUs, CPU workers otherwise).

    for result in ray_results(items, settings, stop, address="", workers=2):
        ...                                   # results in the order they finish; the caller writes them

The plan is `from_items(images) -> map_batches(GeneratorActor, compute=ActorPoolStrategy(size=N),
batch_size=1) -> iter_rows()` on the driver. The actors return each PNG's bytes (infotext included) and the
driver writes them through the same OutputDir as a local run, one writer for the files and the manifest:
so the output folder of a Ray run is the local run's, and it needs to be on the driver only. (Ray's own
write_images drops PNG text chunks; a file datasink would write on the workers, with many writers of one
manifest and its lines only at the end.) What the workers read, the checkpoint, init images, LoRA and
embedding folders, must be at the same paths on every node.

Failures: Ray Data recreates a dead actor (max_restarts=-1) and retries its task (max_task_retries=-1),
so a worker that dies (OOM, segfault, a lost node) has its images made again; a result that arrives twice
is written once. A row that kills its worker every time would be retried forever: a small actor counts,
per image, the starts that never finished, and after MAX_DEATHS the image is reported in errors.jsonl
instead. A row that raises is returned as an error result and the job goes on.
"""

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
import ray.data

from .job import Item, JobError
from .render import Result, Settings, attempt, load_pipeline

MAX_DEATHS = 3
MAX_BLOCKS = 10_000      # one block per image up to this many: a retried task redoes as few images as possible


@ray.remote(num_cpus=0)
class RowDeaths:
    """Per image: started and not finished. A start while still "running" means its worker died."""

    def __init__(self):
        self.running: set[str] = set()
        self.deaths: dict[str, int] = {}

    def start(self, item_id: str) -> int:
        if item_id in self.running:
            self.deaths[item_id] = self.deaths.get(item_id, 0) + 1
        self.running.add(item_id)
        return self.deaths.get(item_id, 0)

    def finish(self, item_id: str) -> None:
        self.running.discard(item_id)


class GeneratorActor:
    """A Ray Data actor: loads the pipeline once, then makes the images of each batch it is given."""

    def __init__(self, settings: Settings, deaths, threads: int | None = None):
        import torch
        if threads:
            torch.set_num_threads(threads)
        self.settings, self.deaths = settings, deaths
        self._tmp = tempfile.TemporaryDirectory(prefix="sd15-batch-")      # the demo checkpoint, if any
        self.pipe = load_pipeline(settings, Path(self._tmp.name))

    def __call__(self, batch: dict) -> dict:
        results = []
        for text in batch["item"]:
            item = Item.from_json(str(text))
            deaths = ray.get(self.deaths.start.remote(item.id))
            if deaths >= MAX_DEATHS:
                result = Result(item.id, None, 0.0, f"the worker making this image died {deaths} times (out of "
                                                    "memory, a crash in native code?); it was not made")
            else:
                result = attempt(self.pipe, item, self.settings)
            ray.get(self.deaths.finish.remote(item.id))
            results.append(result)
        return {"id": np.array([r.id for r in results], dtype=object),
                "png": np.array([r.png or b"" for r in results], dtype=object),
                "seconds": np.array([r.seconds for r in results], dtype=np.float64),
                "error": np.array([r.error or "" for r in results], dtype=object)}


def connect(address: str) -> bool:
    """Join the cluster at `address` ("" : $RAY_ADDRESS's, else start a local one); True if we started Ray."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, object] = {"logging_level": logging.WARNING}
    if not address and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False             # a private local instance: no web UI to expose
        kwargs["_node_ip_address"] = "127.0.0.1"         # ... and reached on loopback only, not the LAN address
    ray.init(address=address or None, **kwargs)
    return True


def ray_results(items: list[Item], settings: Settings, stop, *, address: str = "",
                workers: int | None = None) -> Iterator[Result]:
    if not items:
        return
    started = connect(address)
    try:
        yield from _results(items, settings, stop, workers)
    finally:
        if started:
            ray.shutdown()


def _results(items: list[Item], settings: Settings, stop, workers: int | None) -> Iterator[Result]:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False                # ours is the one bar
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if (settings.device or "cuda").startswith("cuda") else 0
    size = min(workers or max(gpus, 1), len(items))         # no idle actors for a short list
    cpus = 1 if gpus else max(1, int(resources.get("CPU", 1)) // size)      # CPU workers share the CPUs
    ds = ray.data.from_items([{"item": item.to_json()} for item in items],
                             override_num_blocks=min(len(items), MAX_BLOCKS))
    ds = ds.map_batches(GeneratorActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=size),
                        fn_constructor_kwargs={"settings": settings, "deaths": RowDeaths.remote(),
                                               "threads": settings.threads or (None if gpus else cpus)},
                        num_gpus=1 if gpus else 0, num_cpus=cpus)
    try:
        for row in ds.iter_rows():
            yield Result(str(row["id"]), bytes(row["png"]) or None, float(row["seconds"]), str(row["error"]) or None)
            if stop.requested:
                return
    except ray.exceptions.RayError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobError(f"the Ray job failed ({type(e).__name__}: {first}); the images written so far are kept: "
                       "run the same command again to resume") from e
