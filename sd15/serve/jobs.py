"""One job at a time per device: a bounded queue in front of the pipeline, with progress and stopping.

    jobs = JobQueue(max_waiting=16)
    future = jobs.submit(Job("txt2img", work))      # work(ctx) runs on the worker thread; QueueFull when full
    jobs.progress()                                 # what the running job reports (A1111's shared.state)
    jobs.interrupt()                                # the running job stops at its next sampler step

Why a queue and not A1111's lock: a lock lets every waiting request hold a server thread, without limit;
here at most `max_waiting` jobs wait and the next request is told 503 with Retry-After. Model switches
are jobs too, so a switch waits for the generation before it and the ones after it see the new model.

Stopping works through the pipeline's progress callback, which `JobContext.step` is: after each sampler
step it raises `Stopped` when the job was interrupted (POST /interrupt), skipped (POST /skip: only the
current batch), or cancelled (its client went away). A cancelled job that has not started never runs.
"""

import concurrent.futures
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Stopped(Exception):
    """Raised from the progress callback; `reason` is "interrupt", "skip" or "cancel"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Cancelled(Exception):
    """The job's client went away before it ran (or the server is shutting down)."""


@dataclass(eq=False)
class Job:
    kind: str                                  # "txt2img", "img2img", "switch model": A1111's state "job"
    work: Callable[["JobContext"], Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class JobContext:
    """What a running job reports and checks: batches (A1111's job_no/job_count) and sampler steps."""

    def __init__(self, job: Job):
        self.job = job
        self.started = time.time()
        self.job_count, self.job_no = 1, 0
        self.step_no, self.steps = 0, 0
        self.latents: torch.Tensor | None = None      # the first image's latents after the last step
        self.interrupted = threading.Event()
        self.skipped = threading.Event()
        self._lock = threading.Lock()

    def begin(self, job_no: int, job_count: int) -> None:
        with self._lock:
            self.job_no, self.job_count, self.step_no, self.steps = job_no, job_count, 0, 0
        self.skipped.clear()

    def step(self, step: int, total: int, latents: torch.Tensor) -> None:
        """The pipeline's progress callback."""
        with self._lock:
            self.step_no, self.steps = step, total
            self.latents = latents[0].detach().clone()
        if self.job.cancelled.is_set():
            raise Stopped("cancel")
        if self.interrupted.is_set():
            raise Stopped("interrupt")
        if self.skipped.is_set():
            raise Stopped("skip")

    def snapshot(self) -> dict:
        with self._lock:
            return {"job": self.job.kind, "job_count": self.job_count, "job_no": self.job_no,
                    "sampling_step": self.step_no, "sampling_steps": self.steps, "started": self.started,
                    "interrupted": self.interrupted.is_set(), "skipped": self.skipped.is_set(),
                    "latents": self.latents}


class JobQueue:
    """A worker thread and the jobs waiting for it (at most `max_waiting`)."""

    def __init__(self, max_waiting: int = 16):
        if max_waiting < 0:
            raise ValueError("max_waiting must be 0 or more")
        self.max_waiting = max_waiting
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: JobContext | None = None
        self._closed = False
        self._mean_seconds = 5.0          # of the last jobs; the Retry-After estimate
        self._thread = threading.Thread(target=self._work, name="sd15-jobs", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._cond:
            if self._closed:
                raise Cancelled("the server is shutting down")
            self._drop_cancelled()
            if len(self._waiting) >= self.max_waiting and (self._running is not None or self._waiting):
                raise QueueFull(self.retry_after())
            self._waiting.append(job)
            self._cond.notify()
        return job.future

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the mean job time times the jobs ahead."""
        return max(1, math.ceil(self._mean_seconds * (len(self._waiting) + 1)))

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.cancelled.is_set()]:
            self._waiting.remove(job)
            _fail(job, Cancelled("the client went away"))

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def current(self) -> JobContext | None:
        return self._running

    def interrupt(self) -> None:
        if (ctx := self._running) is not None:
            ctx.interrupted.set()

    def skip(self) -> None:
        if (ctx := self._running) is not None:
            ctx.skipped.set()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, fail the waiting ones, stop the running one, end the worker."""
        with self._cond:
            self._closed = True
            while self._waiting:
                _fail(self._waiting.popleft(), Cancelled("the server is shutting down"))
            if self._running is not None:
                self._running.job.cancel()
            self._cond.notify_all()
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    _fail(job, Cancelled("the client went away"))
                    continue
                if not job.future.set_running_or_notify_cancel():      # its future was cancelled
                    continue
                ctx = self._running = JobContext(job)
            try:
                job.future.set_result(job.work(ctx))
            except BaseException as e:          # the waiting request reports it; the worker lives on
                job.future.set_exception(e)
            finally:
                seconds = time.time() - ctx.started
                with self._cond:
                    self._running = None
                    self._mean_seconds = 0.7 * self._mean_seconds + 0.3 * seconds


def _fail(job: Job, error: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(error)
