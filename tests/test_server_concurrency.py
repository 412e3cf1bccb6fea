"""Many clients at once against the real server: every answer complete and equal, pixel for pixel, to the
same request run through the Python API; a full queue answers 503 with Retry-After; a client that goes
away cancels its job."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
webuiapi = pytest.importorskip("webuiapi")
import requests  # noqa: E402

import sd15  # noqa: E402
from sd15.models.demo import write_demo_checkpoint  # noqa: E402
from sd15.serve.jobs import Stopped  # noqa: E402
from sd15.serve.limits import Limits  # noqa: E402
from server_harness import running_server  # noqa: E402

THREADS, PER_THREAD = 8, 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_demo_checkpoint(tmp_path_factory.mktemp("models") / "demo.safetensors")


def _request(t: int, k: int) -> dict:
    """Client t's k-th request: each its own prompt, seed, sampler and batch size."""
    return {"prompt": f"client {t} picture {k}", "seed": 1000 * t + k, "batch_size": 1 + (t + k) % 2,
            "sampler_name": ("Euler a", "DPM++ 2M", "DDIM")[(t + k) % 3], "steps": 5, "cfg_scale": 6.5,
            "width": 64, "height": 64}


def test_eight_clients_get_complete_answers_equal_to_the_python_api(ckpt):
    with running_server(ckpt) as srv:
        def client(t):
            api = webuiapi.WebUIApi(host="127.0.0.1", port=srv.port)
            return [(t, k, api.txt2img(**_request(t, k))) for k in range(PER_THREAD)]

        with ThreadPoolExecutor(THREADS) as pool:
            answers = [a for batch in pool.map(client, range(THREADS)) for a in batch]
    assert len(answers) == THREADS * PER_THREAD
    pipe = sd15.load(ckpt)
    for t, k, result in answers:
        sent = _request(t, k)
        assert len(result.images) == sent["batch_size"] == len(result.info["infotexts"])
        assert result.info["all_seeds"] == [sent["seed"] + i for i in range(sent["batch_size"])]
        assert result.info["prompt"] == sent["prompt"] and result.parameters["seed"] == sent["seed"]
        # the request as the Python API states it (webuiapi also sends eta=1, A1111's ancestral default)
        req = sd15.Request(sent["prompt"], seed=sent["seed"], batch_size=sent["batch_size"],
                           sampler=sent["sampler_name"], steps=5, guidance_scale=6.5, width=64, height=64,
                           seed_mode="a1111", sampler_options={"eta": 1.0} if sent["sampler_name"] == "DDIM" else {})
        for got, want in zip(result.images, pipe.generate(req)):
            assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
            assert got.info["parameters"] == want.info["parameters"]


def _wait_running(url: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if requests.get(url + "/sdapi/v1/progress").json()["state"]["sampling_step"] >= 1:
            return
        time.sleep(0.05)
    raise AssertionError("the long job never started")


def test_a_full_queue_answers_503_with_retry_after(ckpt):
    with running_server(ckpt, limits=Limits(max_queue=1)) as srv:
        url = srv.url + "/sdapi/v1/txt2img"
        long = {"prompt": "long", "width": 64, "height": 64, "steps": 1000, "seed": 1}
        results = {}
        running = threading.Thread(target=lambda: results.setdefault("running", requests.post(url, json=long)))
        running.start()
        _wait_running(srv.url)
        waiting = threading.Thread(target=lambda: results.setdefault(
            "waiting", requests.post(url, json={"prompt": "next", "width": 64, "height": 64, "steps": 2})))
        waiting.start()
        deadline = time.time() + 10
        while srv.state.jobs.waiting() < 1 and time.time() < deadline:
            time.sleep(0.02)
        refused = requests.post(url, json={"prompt": "one too many", "width": 64, "height": 64, "steps": 2})
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
        assert set(refused.json()) == {"error", "detail", "body", "errors"} and "busy" in refused.json()["detail"]
        requests.post(srv.url + "/sdapi/v1/interrupt")
        running.join(20)
        waiting.join(20)
        assert results["running"].status_code == 409                       # interrupted before any image
        assert results["waiting"].status_code == 200 and len(results["waiting"].json()["images"]) == 1


def test_a_client_that_goes_away_cancels_its_job(ckpt):
    with running_server(ckpt) as srv:
        long = {"prompt": "abandoned", "width": 64, "height": 64, "steps": 1000, "seed": 2}
        seen = []                     # the running job's context, caught while the client still waits

        def watch():
            for _ in range(400):      # bounded: 2 s
                if (ctx := srv.state.jobs.current()) is not None:
                    return seen.append(ctx)
                time.sleep(0.005)
            seen.append(None)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(srv.url + "/sdapi/v1/txt2img", json=long, timeout=1.0)      # closes the connection
        watcher.join(5)
        (ctx,) = seen
        assert ctx is not None, "the job never ran"
        deadline = time.time() + 5
        while srv.state.jobs.current() is not None and time.time() < deadline:
            time.sleep(0.05)
        assert srv.state.jobs.current() is None, "the abandoned job kept running"
        # stopped by the cancel, not finished: the job's own outcome says so (a fast machine could finish
        # 1000 tiny steps within the wait above)
        assert isinstance(ctx.job.future.exception(timeout=5), Stopped) and ctx.job.future.exception().reason == "cancel"
        assert ctx.snapshot()["sampling_step"] < 999
        progress = requests.get(srv.url + "/sdapi/v1/progress").json()
        assert progress["state"]["job_count"] == 0
        ok = requests.post(srv.url + "/sdapi/v1/txt2img",
                           json={"prompt": "next", "width": 64, "height": 64, "steps": 2})
        assert ok.status_code == 200 and len(json.loads(ok.json()["info"])["infotexts"]) == 1
