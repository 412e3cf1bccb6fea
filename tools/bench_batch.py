"""Batch generation throughput on the tiny demo model: the local runner against Ray Data with N workers,
Ray's start-up cost, and whether batching rows through the UNet together would pay (and stay exact).

    python -m tools.bench_batch --workdir /tmp/sd15bench-batch [--rows 40] [--size 128] [--steps 10] [--workers 2]

Each run is a whole `sd15.batch` run in this process (job read, model hashed and loaded, images made and
written with their manifest lines), on a fresh output folder: "first image" is the time to the first image
written (start-up: for Ray, the actor pool starting and each actor loading the model), "steady" the rate
between the first and the last image written; medians of --repeats runs. Ray runs join one
local Ray instance (`ray.init(num_cpus=os.cpu_count())`, timed), token auth off; each run starts its own
actor pool (each actor loads the model; CPU workers get cpus / workers torch threads each). The local runner
is timed with 1 torch thread and with all of them. The UNet batching part compares, in seed mode a1111 (the
only mode where image i of a batch is the single image of seed + i), N single generations with one batch of
N, pixel for pixel, with 1 thread and with all of them.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import sd15.process

sd15.process.use_fast_memory()

import numpy as np  # noqa: E402

import sd15  # noqa: E402
from sd15.batch.output import OutputDir  # noqa: E402
from sd15.batch.render import DEMO_NAME, Settings  # noqa: E402
from sd15.batch.session import Options, StopFlag, run_job  # noqa: E402
from sd15.models.demo import write_demo_checkpoint  # noqa: E402


def write_job(path: Path, rows: int, size: int, steps: int) -> Path:
    samplers = ["DPM++ 2M Karras", "Euler a", "Euler", "DDIM"]
    lines = [json.dumps({"id": f"b{i:04d}", "prompt": f"a lighthouse number {i}, oil painting", "size": f"{size}x{size}",
                         "steps": steps, "sampler": samplers[i % len(samplers)]}) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def timed_run(job: Path, out: Path, ray: str | None, workers: int | None) -> dict:
    """One whole run; the time each image was written is taken from OutputDir.write_image."""
    options = Options(job=job, out=out, settings=Settings(base_dir=str(job.parent), demo=True), ray=ray,
                      workers=workers, progress=False)
    stamps, original = [], OutputDir.write_image

    def write_image(self, *args, **kwargs):
        entry = original(self, *args, **kwargs)
        stamps.append(time.perf_counter())
        return entry
    OutputDir.write_image = write_image
    try:
        start = time.perf_counter()
        summary = run_job(options, StopFlag())
        end = time.perf_counter()
    finally:
        OutputDir.write_image = original
    n = summary.made
    return {"first_image_s": stamps[0] - start, "run_s": end - start, "images_per_min": 60 * n / (end - start),
            "steady_images_per_min": 60 * (n - 1) / (stamps[-1] - stamps[0])}


def runner_figures(workdir: Path, rows: int, size: int, steps: int, ray: str | None, workers: int | None,
                   repeats: int) -> dict:
    """Medians over `repeats` runs, each on a fresh output folder."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = write_job(workdir / "job.jsonl", rows, size, steps)
    runs = [timed_run(job, workdir / f"out-{'local' if ray is None else 'ray'}-{i}", ray, workers)
            for i in range(repeats)]
    return {key: round(statistics.median(r[key] for r in runs), 2 if key.endswith("_s") else 1) for key in runs[0]}


def unet_batching(workdir: Path, count: int, sizes: list[int], steps: int, repeats: int, threads: int) -> list[dict]:
    import torch
    torch.set_num_threads(threads)
    pipe = sd15.load(write_demo_checkpoint(workdir / DEMO_NAME))
    out = []
    for size in sizes:
        kw = dict(width=size, height=size, steps=steps, sampler="Euler a", seed_mode="a1111")
        prompts = tuple(f"prompt number {i}" for i in range(count))
        pipe.generate(sd15.Request("warm-up", seed=1, **kw))
        single_t, batch_t = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            singles = [pipe.generate(sd15.Request(prompts[i], seed=100 + i, **kw))[0] for i in range(count)]
            single_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            batch = pipe.generate(sd15.Request(prompts, seed=100, **kw))
            batch_t.append(time.perf_counter() - start)
        same = sum(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(singles, batch))
        out.append({"threads": threads, "size": size, "images": count, "single_images_per_min": round(60 * count / statistics.median(single_t), 1),
                    "batched_images_per_min": round(60 * count / statistics.median(batch_t), 1),
                    "identical_pixels": f"{same}/{count}"})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sd15bench-batch"))
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    import torch
    all_threads = torch.get_num_threads()
    results: dict = {"cpus": os.cpu_count(), "rows": args.rows, "size": args.size, "steps": args.steps}
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        results[f"local_{threads}_threads"] = runner_figures(args.workdir / f"t{threads}", args.rows, args.size,
                                                             args.steps, None, None, args.repeats)
        print(f"local, {threads} threads", results[f"local_{threads}_threads"], flush=True)
    torch.set_num_threads(all_threads)
    if not args.skip_ray:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray
        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
                 _node_ip_address="127.0.0.1")
        results["ray_init_s"] = round(time.perf_counter() - start, 2)
        try:
            results[f"ray_{args.workers}_workers"] = runner_figures(args.workdir / "ray", args.rows, args.size,
                                                                    args.steps, "", args.workers, args.repeats)
        finally:
            ray.shutdown()
        print("ray", results["ray_init_s"], results[f"ray_{args.workers}_workers"], flush=True)
    results["unet_batching"] = [row for threads in sorted({1, all_threads})
                                for row in unet_batching(args.workdir, 8, [64, args.size], args.steps, 3, threads)]
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
