"""The local runner: one process, one model, the job's images one after the other.

    for result in local_results(items, settings, stop):    # a generator: the caller writes each result
        ...

It checks `stop` (set by Ctrl-C) before each image, so an interrupt ends the run after the current one.
"""

import tempfile
from collections.abc import Iterator
from pathlib import Path

from .job import Item
from .render import Result, Settings, attempt, load_pipeline


def local_results(items: list[Item], settings: Settings, stop) -> Iterator[Result]:
    if not items:
        return
    import torch
    previous = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="sd15-batch-") as tmp:
        try:
            if settings.threads:
                torch.set_num_threads(settings.threads)
            pipe = load_pipeline(settings, Path(tmp))
            for item in items:
                if stop.requested:
                    return
                yield attempt(pipe, item, settings)
        finally:
            torch.set_num_threads(previous)        # the caller's process (a test, a notebook) gets its own back
