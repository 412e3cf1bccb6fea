"""The comparison engines ("anchors") of `python -m tools.benchmark --anchors DIR`: OpenVINO and stable-diffusion.cpp.

Each lives in its own venv under DIR (`bash tools/anchors/setup.sh DIR`), never in sd15's, and runs as a
worker subprocess of the benchmark (`DIR/NAME/bin/python -m tools.anchors.NAME_bench`, the checkout on
PYTHONPATH) that talks tools/anchors/protocol.py. An engine whose venv is missing, or whose worker fails to
start, is skipped with a one-line reason; one that fails later is dropped from the rows after that, saying
why. The worker's stderr goes to WORKDIR/anchor-NAME.log.

What the benchmark does with them (see `tools.benchmark.compare`):
- before its own models load, each engine's `prepare` step runs once in a fresh process (OpenVINO: convert
  diffusers' modules to IR in WORKDIR, cached), then its worker starts and loads/compiles what the rows
  need: load and compile times are reported apart from steady state, before sd15 and diffusers fill memory;
- the model inputs of the rows are the benchmark's own tensors, written to WORKDIR/anchor-inputs.safetensors;
- repeat r of a row times ours and diffusers (alternating which goes first), then asks each worker for one
  timed sample of each of its variants (OpenVINO f32 and default, alternating too), so machine noise hits
  every engine of a repeat alike; ratio = median over repeats of (engine / sd15 in the same repeat);
- after the timings, diffusers' output (txt2img: its image) goes to WORKDIR/anchor-ref-KEY.safetensors and
  each worker reports the max rel. diff of its last output (txt2img: max pixel diff / 255).

Memory: everything of a row is resident at once (sd15's and diffusers' fp32 models, ~12 GB with txt2img's
activations; OpenVINO's compiled f32 and bf16 models, ~6 GB); sd.cpp loads one weight type per sample
(4-7 GB) only when MemAvailable allows, and says so otherwise. On a 24 GB machine run sd.cpp's txt2img
apart (`--anchor-engines sdcpp`). Workers are the OOM killer's first choice (tools/anchors/protocol.py):
if memory still runs out, the anchor is reported killed and the benchmark's own rows survive.
"""

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class EngineSpec:
    name: str           # the venv's folder under DIR, and the script's name: tools/anchors/{name}_bench.py
    label: str
    rows: tuple[str, ...]

    @property
    def module(self) -> str:
        return f"tools.anchors.{self.name}_bench"


ENGINES = (EngineSpec("openvino", "OpenVINO", ("unet", "decode", "text", "txt2img")),
           EngineSpec("sdcpp", "stable-diffusion.cpp", ("txt2img",)))


class AnchorError(RuntimeError):
    pass


@dataclass
class Worker:
    """One engine's worker process, and what it reported."""
    spec: EngineSpec
    proc: subprocess.Popen
    log: Path
    log_file: object = None
    variants: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def label(self, variant: str) -> str:
        return f"{self.spec.label} {variant}"

    def request(self, cmd: str, **kw) -> dict:
        try:
            self.proc.stdin.write(json.dumps(dict(cmd=cmd, **kw)) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:         # BrokenPipeError: it died before or while reading the request
            line = ""
        if not line:
            raise AnchorError(self.death())
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise AnchorError(reply["error"])
        return reply

    def death(self) -> str:
        """How the worker ended, and the last telling line of its log."""
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            return f"worker stopped answering; its log says: {last_line(self.log)}"
        how = f"exited with code {code}" if code >= 0 else (
            "killed (SIGKILL: on Linux most likely the OOM killer, which takes an anchor first; see dmesg)"
            if code == -9 else f"killed by signal {-code}")
        return f"worker {how}; its log says: {last_line(self.log)}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.log_file is not None:
            self.log_file.close()


def last_line(path: Path) -> str:
    """What a worker said last: its last line naming an error among its last 30 lines, else its last line."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()] \
        if path.exists() else []
    telling = [line for line in lines[-30:] if any(w in line.lower() for w in ("error", "failed", "exception"))]
    return (telling or lines or [f"nothing in {path}"])[-1]


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("VIRTUAL_ENV", None)
    return env


def save_arrays(path: Path, arrays: dict) -> Path:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    return path


class Anchors:
    """The running workers and the per-row figures they gave; `results()` is what the JSON records."""

    def __init__(self, workers: list[Worker], status: dict, workdir: Path):
        self.workers, self.status, self.workdir = workers, status, workdir
        self.samples: dict[tuple[str, str], list] = {}     # (row key, label) -> [(repeat, wall, cpu, extra), ...]
        self.first: dict[tuple[str, str], float] = {}
        self.skipped: dict[tuple[str, str], list[str]] = {}   # samples a worker left out, and why
        self.notes: dict[tuple[str, str], str] = {}

    @classmethod
    def start(cls, directory: Path, *, ckpt: Path, workdir: Path, inputs: dict, keys: list[str], steps: int,
              size: int, prompt: str, threads: int | None, wanted=None, engines=ENGINES) -> "Anchors":
        """Prepare and start every engine (of those `wanted`, default all) found under `directory` that has a
        row in `keys`; skip the rest, saying why."""
        workers, status = [], {}
        inputs_file = save_arrays(workdir / "anchor-inputs.safetensors", inputs)
        for spec in engines:
            rows = [k for k in keys if k in spec.rows]
            python = directory / spec.name / "bin" / "python"
            if wanted is not None and spec.name not in wanted:
                status[spec.name] = dict(status="skipped", reason="left out by --anchor-engines")
            elif not rows:
                status[spec.name] = dict(status="skipped", reason=f"no row of it asked for (it has: {', '.join(spec.rows)})")
            elif not python.exists():
                status[spec.name] = dict(status="skipped", reason=f"not installed: no {python} "
                                                                  f"(bash tools/anchors/setup.sh {directory} {spec.name})")
            else:
                try:
                    worker = start_worker(spec, python, ckpt=ckpt, workdir=workdir, inputs_file=inputs_file,
                                          rows=rows, steps=steps, size=size, prompt=prompt, threads=threads)
                except AnchorError as e:
                    status[spec.name] = dict(status="skipped", reason=f"failed to start: {e}")
                else:
                    workers.append(worker)
                    status[spec.name] = dict(status="ok", rows=rows, **worker.info)
            if status[spec.name]["status"] == "skipped":
                print(f"  {spec.label}: skipped, {status[spec.name]['reason']}", file=sys.stderr, flush=True)
        return cls(workers, status, workdir)

    def for_row(self, key: str) -> list[Worker]:
        return [w for w in self.workers if key in self.status[w.spec.name]["rows"]]

    def drop(self, worker: Worker, key: str, error: Exception) -> None:
        print(f"  {worker.spec.label}: failed in {key}, dropped: {error}", file=sys.stderr, flush=True)
        worker.stop()
        self.workers.remove(worker)
        self.status[worker.spec.name] |= dict(status="failed", reason=f"{key}: {error}")

    def each(self, key: str, cmd: str, **kw):
        """(worker, reply) for each worker with this row; a failing worker is dropped."""
        for worker in self.for_row(key):
            try:
                yield worker, worker.request(cmd, key=key, **kw)
            except AnchorError as e:
                self.drop(worker, key, e)

    def warm_up(self, key: str) -> None:
        for worker, reply in self.each(key, "time", repeat=0):
            for variant, (wall, _cpu) in reply["times"].items():
                self.first[key, worker.label(variant)] = wall

    def time(self, key: str, repeat: int) -> None:
        for worker, reply in self.each(key, "time", repeat=repeat):
            for variant, (wall, cpu) in reply["times"].items():
                extra = reply.get("extra", {}).get(variant, {})
                self.samples.setdefault((key, worker.label(variant)), []).append((repeat, wall, cpu, extra))
            for variant, why in reply.get("skipped", {}).items():
                self.skipped.setdefault((key, worker.label(variant)), []).append(f"repeat {repeat}: {why}")

    def check(self, key: str, reference: np.ndarray) -> dict:
        if not self.for_row(key):
            return {}
        ref = save_arrays(self.workdir / f"anchor-ref-{key}.safetensors", {"ref": reference})
        diffs = {}
        for worker, reply in self.each(key, "check", ref=str(ref)):
            diffs |= {worker.label(v): d for v, d in reply["max_rel_diff"].items()}
            if reply.get("note"):
                self.notes[key, worker.spec.label] = reply["note"]
        return diffs

    def row(self, key: str, ours: list, diffusers: list, diffs: dict) -> dict:
        """{engine label: figures} for one row; ratios pair each sample with ours (and diffusers') of the
        same repeat, so a sample left out (or a worker dropped mid-row) never shifts the pairs."""
        med, out = statistics.median, {}
        for (k, label), samples in self.samples.items():
            if k != key:
                continue
            out[label] = a = dict(s=med(s[1] for s in samples), cpu_s=med(s[2] for s in samples),
                                  ratio=med(wall / ours[r][0] for r, wall, _, _ in samples),
                                  cpu_ratio=med(cpu / ours[r][1] for r, _, cpu, _ in samples),
                                  ratio_to_diffusers=med(wall / diffusers[r][0] for r, wall, _, _ in samples),
                                  all=[[wall, cpu] for _, wall, cpu, _ in samples])
            extras = [s[3] for s in samples]
            for field_ in sorted({f for e in extras for f in e}):   # e.g. sd.cpp's load_s, sampling_s, decode_s
                a[field_] = med(e[field_] for e in extras if field_ in e)
            if (key, label) in self.first:
                a["first_s"] = self.first[key, label]
            if label in diffs:
                a["max_rel_diff"] = diffs[label]
        for (k, label), why in self.skipped.items():
            if k == key:
                out.setdefault(label, {})["skipped"] = why
        for (k, engine), note in self.notes.items():
            if k == key:
                for label, a in out.items():
                    if label.startswith(engine + " "):
                        a["note"] = note
        return out

    def close(self) -> dict:
        for worker in list(self.workers):
            try:
                self.status[worker.spec.name] |= worker.request("quit")
            except AnchorError as e:
                self.status[worker.spec.name] |= dict(quit_error=str(e))
            try:
                worker.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass                        # stop() kills it
            worker.stop()
        self.workers = []
        return self.status


def start_worker(spec: EngineSpec, python: Path, *, ckpt: Path, workdir: Path, inputs_file: Path, rows: list[str],
                 steps: int, size: int, prompt: str, threads: int | None) -> Worker:
    """Run the engine's one-shot prepare step, then start its worker and let it load what `rows` need."""
    log, env = workdir / f"anchor-{spec.name}.log", worker_env()
    print(f"  {spec.label}: preparing (log: {log}) ...", file=sys.stderr, flush=True)
    with open(log, "w") as err:
        done = subprocess.run([str(python), "-m", spec.module, "prepare", "--ckpt", str(ckpt), "--workdir", str(workdir)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode != 0:
        raise AnchorError(last_line(log))
    prepared = json.loads(done.stdout.strip().splitlines()[-1])
    argv = [str(python), "-m", spec.module, "serve", "--ckpt", str(ckpt), "--workdir", str(workdir),
            "--inputs", str(inputs_file)] + (["--threads", str(threads)] if threads else [])
    log_file = open(log, "a")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=log_file, text=True, bufsize=1)
    worker = Worker(spec, proc, log, log_file)
    print(f"  {spec.label}: loading/compiling for {', '.join(rows)} ...", file=sys.stderr, flush=True)
    try:
        setup = worker.request("setup", keys=rows, steps=steps, size=size, prompt=prompt)
    except AnchorError:
        worker.stop()
        raise
    worker.variants, worker.info = setup.pop("variants"), dict(prepare=prepared, **setup)
    return worker


# ---- report --------------------------------------------------------------------------------------

def figure(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def engine_lines(status: dict) -> list[str]:
    """One line per engine: version and what each variant's compiled model reports, or why it is absent."""
    out = []
    for name, s in status.items():
        if s["status"] != "ok":
            out.append(f"- {name}: {s['status']}, {s['reason']}")
            continue
        props = "; ".join(f"**{v}**: " + ", ".join(f"{k} {p}" for k, p in ps.items())
                          for v, ps in s.get("properties", {}).items())
        out.append(f"- {name} ({s.get('version', '?')}): {props}")
        if s.get("load"):
            out.append("  - load (read + compile, before sd15 loads): " + "; ".join(
                f"{part} {f['read_s']:.1f} + {f['compile_s']:.1f} s, +{gib(f['private_added_bytes'])} private"
                for part, f in s["load"].items()))
        if s.get("prepare", {}).get("convert_s"):
            out.append("  - converted to IR in this run: " + ", ".join(
                f"{k} {v:.0f} s" for k, v in s["prepare"]["convert_s"].items()))
        if "private_after_load_bytes" in s:
            out.append(f"  - memory after loading: {gib(s['private_after_load_bytes'])} private + "
                       f"{gib(s['mapped_after_load_bytes'])} mapped IR; worker peak RSS (both) "
                       f"{gib(s.get('peak_rss_bytes', 0))}")
    return out


def markdown(results: dict) -> list[str]:
    """The anchors table: one line per measurement and engine variant, with ratios to sd15 and diffusers."""
    status = results.get("anchors")
    if not status:
        return []
    out = ["Comparison engines (same weights, same inputs, same run; ratio < 1: the engine is faster than sd15):", ""]
    out += engine_lines(status)
    out += ["", "| measurement | engine | s/call | engine / sd15 | same, CPU time | engine / diffusers | first call (s) "
                "| max rel. diff vs diffusers |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    notes, remarks = [], []
    for r in results["rows"]:
        for label, a in r.get("anchors", {}).items():
            if "s" in a:
                out.append(f"| {r['name']} | {label} | {a['s']:.4f} | **{a['ratio']:.2f}** | {a['cpu_ratio']:.2f} | "
                           f"{a['ratio_to_diffusers']:.2f} | {figure(a.get('first_s'), '.2f')} | "
                           f"{figure(a.get('max_rel_diff'), '.1e')} |")
            parts = {k: a[k] for k in ("load_s", "text_s", "sampling_s", "decode_s") if k in a}
            if parts:
                notes.append(f"{label}, {r['key']}: " + ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in parts.items())
                             + (f", peak RSS {gib(a['peak_rss_bytes'])}" if "peak_rss_bytes" in a else ""))
            if a.get("skipped"):
                notes.append(f"{label}, {r['key']}: samples left out: " + "; ".join(a["skipped"]))
            if a.get("note") and a["note"] not in remarks:
                remarks.append(a["note"])
    out.append("(txt2img: the last column is the largest pixel difference / 255 from diffusers' image.)")
    return out + notes + remarks + [""]
