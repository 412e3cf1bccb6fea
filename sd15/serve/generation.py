"""An A1111 generation as sd15 runs it: one validated `Request` per batch (A1111's n_iter), in sequence.

    gen = Generation("txt2img", requests=(req0, req1), ...)    # built by `a1111.plan_txt2img`
    outcome = run(gen, pipe, ctx)                               # on the job worker (jobs.JobContext)

Every request is built and checked before the job is queued, so bad input is a 422 at once, never a
failure after minutes in the queue. Stopping: an interrupt ends the job after the batches done so far
(A1111 does the same between batches); a skip drops the current batch and goes on with the next; a
cancel (the client went away) drops everything.
"""

import time
from dataclasses import dataclass, field

from PIL import Image

from ..pipeline.request import ModelInfo, Request
from .jobs import JobContext, Stopped


@dataclass(frozen=True)
class Generation:
    kind: str                          # "txt2img" or "img2img"
    requests: tuple[Request, ...]      # one per batch, seeds fixed
    echo: dict                         # A1111's `parameters`: the request body with the defaults filled in
    ignored: tuple[str, ...] = ()      # fields given that sd15 does not apply (named in `info`)
    send_images: bool = True
    save_images: bool = False
    styles: tuple[str, ...] = ()

    @property
    def num_images(self) -> int:
        return sum(r.num_images for r in self.requests)


@dataclass
class Outcome:
    images: list[Image.Image] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)     # the request each image came from, per image
    index_in_request: list[int] = field(default_factory=list)
    interrupted: bool = False
    skipped_batches: int = 0
    job_timestamp: str = ""
    model: ModelInfo | None = None        # the model that made them (a switch may come between jobs)
    inpainting_model: bool = False        # its UNet takes the mask (9 input channels)


def run(gen: Generation, pipe, ctx: JobContext) -> Outcome:
    out = Outcome(job_timestamp=time.strftime("%Y%m%d%H%M%S"), model=pipe.model_info,
                  inpainting_model=pipe.unet.cfg.in_channels == 9)
    for job_no, request in enumerate(gen.requests):
        if ctx.interrupted.is_set():
            out.interrupted = True
            break
        ctx.begin(job_no, len(gen.requests))
        try:
            images = pipe.generate(request, progress=ctx.step)
        except Stopped as stop:
            if stop.reason == "skip":
                out.skipped_batches += 1
                continue
            if stop.reason == "interrupt":
                out.interrupted = True
                break
            raise
        out.images += images
        out.requests += [request] * len(images)
        out.index_in_request += range(len(images))
    return out
