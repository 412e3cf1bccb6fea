"""`python -m sd15.serve` as a user runs it: --demo on a free port answers, Ctrl-C stops it; bad arguments
print one `error:` line and exit 2 before loading anything; a non-loopback bind needs --api-auth."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
import requests  # noqa: E402

from sd15.serve.__main__ import build_parser, check  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k not in ("SD15_CKPT", "SD15_API_AUTH")} | {"OMP_NUM_THREADS": "1"}


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "sd15.serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_demo_server_starts_answers_and_stops_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "sd15.serve", "--demo", "--port", "0"], stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        deadline, url = time.time() + 60, None
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            if line.startswith("sd15 serving"):
                url = line.split(" on ", 1)[1].split("/ ", 1)[0]
        assert url and url.startswith("http://127.0.0.1:"), "no 'sd15 serving ... on URL' line"
        models = requests.get(url + "/sdapi/v1/sd-models", timeout=10).json()
        assert [m["filename"] for m in models] == ["tiny-random-demo.safetensors"]
        page = requests.get(url + "/", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        r = requests.post(url + "/sdapi/v1/txt2img", json={"prompt": "cli", "width": 64, "height": 64, "steps": 2},
                          timeout=60)
        assert r.status_code == 200 and len(r.json()["images"]) == 1
        # --demo serves a tiny random ControlNet too, for trying the ControlNet API without weights
        (title,) = requests.get(url + "/controlnet/model_list", timeout=10).json()["model_list"]
        assert title.startswith("control_demo_tiny [")
        unit = {"model": title, "image": r.json()["images"][0], "module": "canny"}
        r = requests.post(url + "/sdapi/v1/txt2img", timeout=60, json={
            "prompt": "cli", "width": 64, "height": 64, "steps": 2, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
        assert r.status_code == 200, r.status_code
        assert 'ControlNet 0: "Module: canny' in json.loads(r.json()["info"])["infotexts"][0]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("args,words", [
    (["--demo", "--host", "0.0.0.0"], ["--api-auth", "--insecure-no-auth"]),
    (["--demo", "--host", "192.168.1.20"], ["lets other machines in"]),
    (["--demo", "--api-auth", "nopassword"], ["USER:PASS"]),
    (["--demo", "--port", "70000"], ["--port"]),
    (["--demo", "--models-dir", "/nonexistent/models"], ["--models-dir /nonexistent/models does not exist"]),
    (["--demo", "--lora-dir", "/nonexistent/loras"], ["--lora-dir"]),
    (["--demo", "--controlnet-dir", "/nonexistent/cn"], ["--controlnet-dir /nonexistent/cn does not exist"]),
    (["--ckpt", "/nonexistent/model.safetensors"], ["checkpoint /nonexistent/model.safetensors does not exist"]),
    (["--demo", "--cors-allow-origins", "evil.example"], ["not an origin"]),
    ([], ["no checkpoint"]),
    (["--demo", "--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_bad_arguments_print_one_error_line(args, words):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]


def test_a_port_in_use_is_an_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_cli("--demo", "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_a_broken_checkpoint_is_an_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    result = run_cli("--ckpt", str(bad), "--port", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_insecure_no_auth_is_allowed_with_a_warning(caplog):
    args = build_parser().parse_args(["--demo", "--host", "0.0.0.0", "--insecure-no-auth"])
    with caplog.at_level(logging.WARNING, logger="sd15.serve"):
        check(args)
    assert "WITHOUT authentication" in caplog.text
    caplog.clear()
    args = build_parser().parse_args(["--demo", "--host", "0.0.0.0", "--api-auth", "me:pw,you:pw2"])
    check(args)
    assert args.credentials == {"me": "pw", "you": "pw2"} and "WITHOUT" not in caplog.text
