#!/usr/bin/env bash
# Install the CPU comparison engines ("anchors") of `python -m tools.benchmark --anchors DIR`, each in its
# own venv under DIR. They are never dependencies of sd15 (not in setup.cfg, not in the `test` extra): the
# benchmark runs each one's script (tools/anchors/*_bench.py) as a subprocess with that venv's python, and
# skips an engine whose venv is missing, saying so.
#
#     bash tools/anchors/setup.sh                     # both, into /tmp/sd15-anchors
#     bash tools/anchors/setup.sh /data/anchors openvino
#     bash tools/anchors/setup.sh /data/anchors sdcpp  # builds stable-diffusion.cpp from source (~11 min, 2 cores)
#     python -m tools.benchmark --workdir /tmp/sd15bench --anchors /tmp/sd15-anchors --only unet,decode,text,txt2img
#     python -m tools.benchmark --workdir /tmp/sd15bench --anchors /tmp/sd15-anchors --anchor-engines sdcpp --only txt2img
#
# (On a 24 GB machine sd.cpp's txt2img does not fit beside sd15, diffusers and OpenVINO's compiled models:
# its worker then skips each weight type, saying so; the second command gives it the room.)
#
# DIR/openvino: openvino, plus torch, diffusers and transformers, because the IR is converted
#   (openvino.convert_model) from diffusers' own modules filled with the benchmark's weights by
#   tools.reference, exactly as the benchmark's diffusers rows are. torch is the sd15 venv's version, so
#   pip takes the same local CPU wheel (a bare `torch` from PyPI would pull a multi-GB CUDA build).
# DIR/sdcpp: stable-diffusion-cpp-python, compiled here for this CPU (GGML_NATIVE: AVX-512 where present).
#
# The scripts import sd15 and tools from the checkout (the benchmark runs them with the repository on
# PYTHONPATH), so nothing of sd15 is installed into these venvs. Versions are pinned: figures in
# BENCHMARKS.md name them. Rerunning the script reuses a venv that already imports its engine.
set -euo pipefail
cd "$(dirname "$0")/../.."

DIR="${1:-${SD15_ANCHORS:-/tmp/sd15-anchors}}"
WHICH="${2:-all}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
OPENVINO_VERSION=2026.4.1
DIFFUSERS_VERSION=0.42.1
TRANSFORMERS_VERSION=5.24.0
SDCPP_VERSION=0.4.7

case "$WHICH" in all|openvino|sdcpp) ;; *) echo "error: unknown engine '$WHICH'; choose all, openvino or sdcpp" >&2; exit 2;; esac
mkdir -p "$DIR"

fresh_venv() {   # $1: venv folder; a half-made one (no bin/python) is replaced
    [ -x "$1/bin/python" ] || { rm -rf "$1"; "$PYTHON" -m venv "$1"; }
    "$1/bin/pip" install -q --upgrade pip
}

if [ "$WHICH" = all ] || [ "$WHICH" = openvino ]; then
    V="$DIR/openvino"
    if [ -x "$V/bin/python" ] && "$V/bin/python" -c "import openvino, diffusers, transformers, torch" 2>/dev/null; then
        echo "openvino: $V already set up"
    else
        echo "openvino: installing into $V ..."
        fresh_venv "$V"
        "$V/bin/pip" install -q "torch==$TORCH_VERSION"
        "$V/bin/pip" install -q "openvino==$OPENVINO_VERSION" "diffusers==$DIFFUSERS_VERSION" \
            "transformers==$TRANSFORMERS_VERSION" safetensors numpy pillow regex ftfy tqdm
    fi
    "$V/bin/python" -c "import openvino as ov; print('openvino', ov.get_version(), ov.Core().get_property('CPU', 'FULL_DEVICE_NAME'))"
fi

if [ "$WHICH" = all ] || [ "$WHICH" = sdcpp ]; then
    V="$DIR/sdcpp"
    if [ -x "$V/bin/python" ] && "$V/bin/python" -c "import stable_diffusion_cpp" 2>/dev/null; then
        echo "sdcpp: $V already set up"
    else
        echo "sdcpp: building stable-diffusion-cpp-python $SDCPP_VERSION into $V (compiles stable-diffusion.cpp) ..."
        fresh_venv "$V"
        "$V/bin/pip" install -q numpy pillow
        # -DGGML_NATIVE=ON: ggml's kernels for this CPU's instruction set (what a user building it gets)
        CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
            "$V/bin/pip" install -v --no-cache-dir "stable-diffusion-cpp-python==$SDCPP_VERSION" > "$DIR/sdcpp-build.log" 2>&1 \
            || { echo "error: the stable-diffusion.cpp build failed; see $DIR/sdcpp-build.log" >&2; exit 1; }
    fi
    "$V/bin/python" -c "import stable_diffusion_cpp; print('stable-diffusion-cpp-python', stable_diffusion_cpp.__version__)"
fi
