"""The line protocol between `tools.benchmark` and an anchor engine's worker process (tools/anchors/*_bench.py).

The benchmark starts `ANCHOR_VENV/bin/python -m tools.anchors.X_bench serve ...` and talks to it in JSON
lines: one request ({"cmd": ..., ...}) on the worker's stdin, one reply on its stdout ({"ok": true, ...} or
{"ok": false, "error": "..."}). The worker keeps its engine's compiled models between requests, so the
benchmark can time one repeat of each engine in turn (ours, diffusers, then each anchor variant).

Native libraries print to file descriptor 1 (OpenVINO, ggml); `reply_channel` moves the protocol onto a
private copy of stdout and points fd 1 at stderr, so a stray print can never corrupt a reply. It also makes
the worker expendable: it dies with the benchmark (no orphan holding gigabytes), and it is the kernel's
first choice when memory runs out (oom_score_adj), so an anchor that does not fit is the process that goes:
the benchmark reports it killed and carries on, rather than losing its own run or another user's process.

Standard library only: the workers run in venvs that have neither sd15's nor the benchmark's packages
beyond their engine's, and this module is imported on both sides.
"""

import ctypes
import json
import os
import signal
import sys
import time

OOM_SCORE_ADJ = 800     # of -1000..1000: far ahead of ordinary processes (0) in the OOM killer's choice
PR_SET_PDEATHSIG = 1


def expendable() -> None:
    """Die with the parent (Linux prctl), and be what the OOM killer takes first. Best effort elsewhere."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:           # the parent died before prctl took effect
            os._exit(1)
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except (OSError, AttributeError):
        pass


def reply_channel():
    """(requests, replies): stdin as text lines, and a private duplicate of the original stdout. Makes the
    process `expendable` first."""
    expendable()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                       # whatever writes to fd 1 from now on lands on stderr
    sys.stdout = sys.stderr
    return sys.stdin, replies


def serve(handlers: dict, requests, replies) -> None:
    """Answer requests until "quit" (or end of input); a handler's exception becomes an error reply."""
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        cmd = request.pop("cmd")
        try:
            if cmd not in handlers:
                raise ValueError(f"unknown command {cmd!r}; this worker knows {', '.join(sorted(handlers))}")
            answer = dict(ok=True, **(handlers[cmd](**request) or {}))
        except Exception as e:   # the benchmark reports it and carries on without this engine
            answer = dict(ok=False, error=f"{type(e).__name__}: {e}")
        replies.write(json.dumps(answer) + "\n")
        if cmd == "quit":
            return


def proc_kib(path: str, key: str) -> int:
    """A "Key:   N kB" figure of a /proc file, in bytes; 0 where there is none (off Linux)."""
    try:
        with open(path) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    except (OSError, StopIteration):
        return 0


def rss_bytes(key: str = "VmRSS:") -> int:
    """This process's resident memory: VmRSS:, its peak VmHWM:, or its parts RssAnon: (private: what the
    engine allocated) and RssFile: (mapped files, e.g. OpenVINO's mmap of the IR: clean pages the kernel can
    drop and read again)."""
    return proc_kib("/proc/self/status", key)


def memory_available_bytes() -> int:
    return proc_kib("/proc/meminfo", "MemAvailable:")


def timed(fn) -> tuple[float, float]:
    """(wall s, CPU s of all this process's threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu
