"""Comparison engines ("anchors") for `python -m tools.benchmark --anchors DIR`: setup.sh installs each into its
own venv under DIR; NAME_bench.py is the worker the benchmark runs with that venv's python (see
tools/bench_anchors.py and protocol.py). Nothing here is part of sd15 or imported by it."""
