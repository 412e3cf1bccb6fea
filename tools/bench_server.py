"""The HTTP server under load: requests served, latency percentiles, the server's memory before and after.

    python -m tools.bench_server [--requests 200] [--clients 4] [--size 64] [--steps 10]

Starts `python -m sd15.serve --demo --port 0` as its own process (so its memory is the server's alone),
sends one warm-up request, then `--requests` txt2img requests from `--clients` threads (bounded: each
thread sends its share and stops), each through A1111's JSON API with its own seed, and checks every
answer is complete (200, one decodable PNG whose infotext has the seed asked for). Reports requests/s,
p50/p95/max latency as the client sees it (queueing included), the server's RSS after start-up, after
the warm-up, and after the run, and (once the server has stopped) how long the same generation takes
through the Python API in one process, the part of the latency that is not the server's. The demo model is tiny: the figures are the server's own overhead
(HTTP, JSON, base64, PNG encoding, the queue) plus a small UNet, not SD 1.5's speed.
"""

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import psutil
import requests
from PIL import Image


def start_server(extra_env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "sd15.serve", "--demo", "--port", "0"], stderr=subprocess.PIPE,
                            text=True, env=os.environ | extra_env)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if line.startswith("sd15 serving"):
            url = line.split(" on ", 1)[1].split("/ ", 1)[0]
            threading.Thread(target=proc.stderr.read, daemon=True).start()     # keep draining its log
            return proc, url
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("the server did not start")


def one_request(url: str, seed: int, size: int, steps: int) -> float:
    body = {"prompt": f"benchmark {seed}", "seed": seed, "steps": steps, "width": size, "height": size,
            "sampler_name": "Euler a", "cfg_scale": 7}
    start = time.perf_counter()
    r = requests.post(url + "/sdapi/v1/txt2img", json=body, timeout=600)
    elapsed = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    answer = r.json()
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    if image.size != (size, size) or f"Seed: {seed}," not in image.text["parameters"]:
        raise RuntimeError(f"an incomplete answer for seed {seed}")
    if json.loads(answer["info"])["all_seeds"] != [seed]:
        raise RuntimeError(f"wrong seeds for seed {seed}")
    return elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip timing the same generation through the Python API")
    args = p.parse_args(argv)

    proc, url = start_server({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    server = psutil.Process(proc.pid)
    try:
        rss_start = server.memory_info().rss
        one_request(url, 0, args.size, args.steps)
        rss_warm = server.memory_info().rss
        latencies, errors, lock = [], [], threading.Lock()

        def client(c: int) -> None:
            for k in range(c, args.requests, args.clients):           # this client's share, then stop
                try:
                    t = one_request(url, 1 + k, args.size, args.steps)
                    with lock:
                        latencies.append(t)
                except Exception as e:                              # counted, not fatal
                    with lock:
                        errors.append(str(e))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        rss_end = server.memory_info().rss
    finally:
        proc.terminate()
        proc.wait(30)

    mib = 1 << 20
    print(f"{args.requests} txt2img requests ({args.size}x{args.size}, {args.steps} steps Euler a, demo model) "
          f"from {args.clients} clients")
    print(f"served {len(latencies)}, errors {len(errors)}{': ' + errors[0] if errors else ''}")
    print(f"wall {wall:.1f} s, {len(latencies) / wall:.1f} requests/s")
    if latencies:
        p50, p95 = statistics.median(latencies), percentile(latencies, 0.95)
        print(f"latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    print(f"server RSS: after start {rss_start / mib:.0f} MiB, after warm-up {rss_warm / mib:.0f} MiB, "
          f"after the run {rss_end / mib:.0f} MiB")
    if args.compare:
        print(f"the same generation through the Python API in this process (the server stopped): "
              f"median {python_api_seconds(args.size, args.steps) * 1000:.0f} ms")


def python_api_seconds(size: int, steps: int, repeats: int = 20) -> float:
    """What the server adds is the latency above this: one pipe.generate of the same request."""
    import tempfile
    from pathlib import Path

    import sd15
    from sd15.models.demo import write_demo_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        pipe = sd15.load(write_demo_checkpoint(Path(tmp) / "demo.safetensors"))
        times = []
        for seed in range(repeats + 1):
            req = sd15.Request(f"benchmark {seed}", seed=seed, steps=steps, width=size, height=size,
                               sampler="Euler a", guidance_scale=7, seed_mode="a1111")
            start = time.perf_counter()
            pipe.generate(req)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])          # the first one warms up


if __name__ == "__main__":
    main()
