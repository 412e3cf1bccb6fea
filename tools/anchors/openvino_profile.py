"""Where OpenVINO's time goes: its own per-node profile of the benchmark's UNet step (or VAE decode), summed
by the kind of node, to set beside `python -m tools.profile_unet` (ours, the same shapes).

Run with the OpenVINO venv's Python, after `python -m tools.benchmark --anchors DIR` has converted the IR
and written the inputs (both in the work dir):

    DIR/openvino/bin/python tools/anchors/openvino_profile.py --workdir /tmp/sd15bench --threads 1
    DIR/openvino/bin/python tools/anchors/openvino_profile.py --workdir /tmp/sd15bench --model decoder

It compiles the model with PERF_COUNT on, once with INFERENCE_PRECISION_HINT=f32 and once with OpenVINO's
default, runs it `--repeats` times, and prints for the last run each node type's total time (OpenVINO's
`real_time`), its share, its node count and the kernels (`exec_type`) that ran it: convolutions as "brgconv"
are oneDNN's brgemm kernels, "jit_avx512" its JIT ones; fused post-ops show as part of the node they fold into.
"""

import argparse
import collections
import time
from pathlib import Path

import numpy as np
import openvino as ov
from safetensors.numpy import load_file

VARIANTS = {"f32": {"INFERENCE_PRECISION_HINT": "f32"}, "default": {}}


def inputs(workdir: Path, model: str) -> list[np.ndarray]:
    t = load_file(str(workdir / "anchor-inputs.safetensors"))
    return {"unet": [t["x"], t["t"], t["ctx"]], "decoder": [t["z"]], "text": [t["ids"]]}[model]


def profile(compiled: ov.CompiledModel, args: list[np.ndarray], repeats: int) -> tuple[float, list]:
    request = compiled.create_infer_request()
    wall = []
    for _ in range(repeats):
        start = time.perf_counter()
        request.infer(args)
        wall.append(time.perf_counter() - start)
    return min(wall), request.get_profiling_info()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sd15bench"))
    p.add_argument("--model", choices=["unet", "decoder", "text"], default="unet")
    p.add_argument("--threads", type=int, default=1, help="INFERENCE_NUM_THREADS (default 1: compare CPU time)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    core = ov.Core()
    model = core.read_model(args.workdir / "openvino-ir" / f"{args.model}.xml")
    data = inputs(args.workdir, args.model)
    model.reshape({port: ov.PartialShape(list(a.shape)) for port, a in zip(model.inputs, data)})
    for variant, config in VARIANTS.items():
        config = dict(config, PERF_COUNT="YES", INFERENCE_NUM_THREADS=args.threads)
        compiled = core.compile_model(model, "CPU", config)
        precision = compiled.get_property("INFERENCE_PRECISION_HINT")
        best, info = profile(compiled, data, args.repeats)
        by_type: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, collections.Counter()])
        for node in info:
            seconds = node.real_time.total_seconds()
            if seconds <= 0:
                continue
            entry = by_type[node.node_type]
            entry[0] += seconds
            entry[1] += 1
            entry[2][node.exec_type] += 1
        total = sum(e[0] for e in by_type.values())
        print(f"\nOpenVINO {ov.get_version()} {args.model}, {variant} (precision {precision}), "
              f"{args.threads} thread(s): best of {args.repeats} runs {best:.3f} s wall; profiled nodes {total:.3f} s")
        print(f"{'node type':<28}{'s':>9}{'share':>8}{'nodes':>7}  kernels")
        for name, (seconds, count, kernels) in sorted(by_type.items(), key=lambda kv: -kv[1][0])[:18]:
            top = ", ".join(f"{k} x{n}" for k, n in kernels.most_common(3))
            print(f"{name:<28}{seconds:>9.3f}{seconds / total:>8.1%}{count:>7}  {top}")
        del compiled


if __name__ == "__main__":
    main()
