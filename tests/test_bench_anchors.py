"""`tools.benchmark --anchors DIR` without the comparison engines installed: each one is skipped with its reason.

The anchors (OpenVINO, stable-diffusion.cpp) live in venvs that tools/anchors/setup.sh makes and CI never
has; these tests need neither. A folder with no venvs gives "not installed" and the setup command; a venv
whose python lacks the engine (here: sd15's own python, linked in) gives "failed to start" and the import
error its worker died of. Either way the benchmark's own rows are still measured and the report says why
each engine is missing. The worker protocol (tools/anchors/protocol.py) is tested with a real worker process
that has no engine: replies survive native prints on fd 1, errors come back as errors, a killed worker is
reported as killed. The engines themselves are exercised by running the benchmark (see BENCHMARKS.md).
"""

import json
import sys

import pytest

from tools import bench_report, benchmark
from sd15.models.demo import random_state_dict, tiny_metadata
from tools.make_checkpoint import save


def run_with_anchors(tmp, anchors) -> dict:
    ckpt, out = tmp / "tiny.safetensors", tmp / "results.json"
    if not ckpt.exists():
        save(random_state_dict(seed=3), ckpt, metadata=tiny_metadata())
    argv = ["--ckpt", str(ckpt), "--workdir", str(tmp), "--device", "cpu", "--size", "64", "--repeats", "1",
            "--steps", "1", "--only", "text,txt2img", "--anchors", str(anchors), "--out", str(out)]
    assert benchmark.main(argv) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def absent(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("no-anchors")
    return tmp / "anchors", run_with_anchors(tmp, tmp / "anchors")


@pytest.fixture(scope="module")
def broken(tmp_path_factory, one_thread):
    """Venvs that exist but whose python has no engine: sd15's interpreter under each venv's bin/python."""
    tmp = tmp_path_factory.mktemp("broken-anchors")
    for name in ("openvino", "sdcpp"):
        (tmp / "anchors" / name / "bin").mkdir(parents=True)
        (tmp / "anchors" / name / "bin" / "python").symlink_to(sys.executable)
    return tmp, run_with_anchors(tmp, tmp / "anchors")


def test_missing_venvs_are_skipped_with_the_setup_command(absent):
    anchors, results = absent
    status = results["anchors"]
    assert set(status) == {"openvino", "sdcpp"}
    for name in ("openvino", "sdcpp"):
        assert status[name]["status"] == "skipped"
        assert status[name]["reason"] == (f"not installed: no {anchors / name / 'bin' / 'python'} "
                                          f"(bash tools/anchors/setup.sh {anchors} {name})")


def test_our_rows_still_run_and_carry_no_anchor_figures(absent):
    _anchors, results = absent
    rows = {r["key"]: r for r in results["rows"]}
    assert set(rows) == {"text", "txt2img"}
    for r in rows.values():
        assert r["ours_s"] > 0 and r["diffusers_s"] > 0
        assert r["anchors"] == {}
    assert rows["text"]["max_rel_diff"] < 1e-4


def test_report_names_each_skipped_engine_and_why(absent):
    anchors, results = absent
    report = bench_report.markdown(results)
    for name in ("openvino", "sdcpp"):
        assert f"- {name}: skipped, not installed: no {anchors / name / 'bin' / 'python'}" in report


def test_a_venv_without_its_engine_fails_to_start_naming_the_import(broken):
    tmp, results = broken
    status = results["anchors"]
    assert status["openvino"]["status"] == "skipped"
    assert status["openvino"]["reason"].startswith("failed to start: ")
    assert "No module named 'openvino'" in status["openvino"]["reason"]
    assert "No module named 'stable_diffusion_cpp'" in status["sdcpp"]["reason"]
    assert "openvino" in (tmp / "anchor-openvino.log").read_text()     # the worker's stderr is kept
    assert all(r["anchors"] == {} for r in results["rows"])


def test_engines_without_a_requested_row_are_skipped_saying_which_rows_they_have(tmp_path, one_thread):
    ckpt = tmp_path / "tiny.safetensors"
    save(random_state_dict(seed=3), ckpt, metadata=tiny_metadata())
    out = tmp_path / "r.json"
    argv = ["--ckpt", str(ckpt), "--device", "cpu", "--size", "64", "--repeats", "1", "--only", "text",
            "--anchors", str(tmp_path / "anchors"), "--out", str(out)]
    assert benchmark.main(argv) == 0
    status = json.loads(out.read_text())["anchors"]
    assert status["sdcpp"] == {"status": "skipped", "reason": "no row of it asked for (it has: txt2img)"}
    assert status["openvino"]["reason"].startswith("not installed")


def test_anchors_refuse_a_gpu_run(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--device", "cuda", "--anchors", "/tmp/nowhere"])
    assert "--anchors: the comparison engines run on the CPU" in capsys.readouterr().err


def test_anchor_engines_leaves_the_others_out_saying_so(tmp_path, one_thread):
    ckpt, out = tmp_path / "tiny.safetensors", tmp_path / "r.json"
    save(random_state_dict(seed=3), ckpt, metadata=tiny_metadata())
    argv = ["--ckpt", str(ckpt), "--device", "cpu", "--size", "64", "--repeats", "1", "--only", "text",
            "--anchors", str(tmp_path / "anchors"), "--anchor-engines", "sdcpp", "--out", str(out)]
    assert benchmark.main(argv) == 0
    status = json.loads(out.read_text())["anchors"]
    assert status["openvino"] == {"status": "skipped", "reason": "left out by --anchor-engines"}


def test_an_unknown_anchor_engine_is_refused(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--device", "cpu", "--anchors", "/tmp/nowhere", "--anchor-engines", "onnxruntime"])
    assert "--anchor-engines: unknown onnxruntime; choose from openvino, sdcpp" in capsys.readouterr().err


# ---- the worker protocol itself, with a real worker process (no engine needed) -----------------------

WORKER = r"""
import os
from tools.anchors.protocol import reply_channel, serve
requests, replies = reply_channel()
def echo(value):
    os.write(1, b"native library chatter on fd 1\n")      # must land on stderr, not in the replies
    print("and a Python print")
    return {"value": value, "oom_score_adj": open("/proc/self/oom_score_adj").read().strip()}
def boom():
    raise ValueError("no such model")
serve({"echo": echo, "boom": boom, "quit": lambda: {}}, requests, replies)
"""


@pytest.fixture
def worker(tmp_path):
    import subprocess
    from tools.bench_anchors import ENGINES, REPO, Worker, worker_env
    log = tmp_path / "worker.log"
    log_file = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO, env=worker_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log_file, text=True, bufsize=1)
    w = Worker(ENGINES[0], proc, log, log_file)
    yield w
    w.stop()


def test_replies_survive_prints_and_errors_come_back_as_errors(worker):
    from tools.bench_anchors import AnchorError
    reply = worker.request("echo", value=[1, 2.5])
    assert reply["value"] == [1, 2.5]
    assert reply["oom_score_adj"] == "800"                      # the OOM killer takes an anchor first
    with pytest.raises(AnchorError, match="ValueError: no such model"):
        worker.request("boom")
    with pytest.raises(AnchorError, match="unknown command 'nope'"):
        worker.request("nope")
    assert worker.request("echo", value="still answering")["value"] == "still answering"
    worker.request("quit")
    assert worker.proc.wait(timeout=10) == 0
    assert "native library chatter on fd 1" in worker.log.read_text()


def test_a_killed_worker_is_reported_as_killed(worker):
    from tools.bench_anchors import AnchorError
    worker.request("echo", value=0)
    worker.proc.kill()
    with pytest.raises(AnchorError, match=r"worker killed \(SIGKILL: on Linux most likely the OOM killer"):
        worker.request("echo", value=1)
