"""`python -m sd15.batch --ray` on a local Ray instance (2 CPUs, token auth off, the tiny demo model): the
output folder equals the local run's byte for byte, a worker that dies is restarted and its image made
once, a row that kills its worker every time ends in errors.jsonl, and a Ray run resumes a local one."""

import json
import os
import shutil

import pytest

from batch_helpers import errors, forty_row_job, infotexts, manifest, pngs, temp_files
from sd15.batch.cli import main
from sd15.batch.fields import request_of
from sd15.batch.job import read_job
from sd15.pipeline.request import Request
from sd15.batch.render import CRASH_ENV

ray = pytest.importorskip("ray", reason="the Ray runner needs the ray extra: pip install 'sd15[ray]'")


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module (starting one takes seconds); our runner joins it."""
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"        # Ray 2.60 turns token auth on for new local instances
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The forty-row job run locally: the reference the Ray runs must equal. One torch thread, as each of the
    two Ray workers on two CPUs has: CPU kernels split their sums by thread, so equal counts, equal bits."""
    folder = tmp_path_factory.mktemp("forty")
    job, out = forty_row_job(folder), folder / "local"
    assert main([job, "--out", out, "--demo", "--quiet", "--threads", "1"]) == 1          # its one bad row
    return job, out


def without_seconds(out):
    entries = {e["id"]: {k: v for k, v in e.items() if k != "seconds"} for e in manifest(out)}
    assert len(entries) == len(manifest(out))                           # every id once
    return entries


def test_forty_rows_on_ray_equal_the_local_run(ray_instance, local_run, tmp_path, capsys):
    job, local = local_run
    out = tmp_path / "ray"
    assert main([job, "--out", out, "--demo", "--quiet", "--ray", "--workers", "2"]) == 1
    assert "42 made, 0 already there, 1 failed" in capsys.readouterr().err
    reference = pngs(local)
    assert len(reference) == 42 + 1 and "grids/grid.png" in reference    # 42 images and the grid's sheet
    assert pngs(out) == reference                                        # byte for byte, infotexts included
    assert without_seconds(out) == without_seconds(local)
    assert errors(out) == errors(local) and errors(out)[0]["row"] == 40
    assert temp_files(out) == []
    items = {item.id: item for item in read_job(job).items}
    for item_id, text in infotexts(out).items():                      # each says how to make its image again
        request = request_of(items[item_id].fields, job.parent)
        given = {} if request.init_image is None else {"init_image": request.init_image}
        assert Request.from_infotext(text, **given).request == request


def test_a_worker_that_dies_is_restarted_and_its_image_made_once(ray_instance, local_run, tmp_path, monkeypatch,
                                                                 capsys):
    job, local = local_run
    out, marker = tmp_path / "ray", tmp_path / "crashed-once"
    monkeypatch.setenv(CRASH_ENV, json.dumps({"id": "row03", "marker": str(marker)}))
    assert main([job, "--out", out, "--demo", "--quiet", "--ray", "--workers", "2"]) == 1
    assert marker.exists()                                               # the worker did die on row03
    assert "42 made" in capsys.readouterr().err
    assert pngs(out) == pngs(local) and without_seconds(out) == without_seconds(local)
    assert errors(out) == errors(local)


def test_a_row_that_kills_its_worker_every_time_is_reported(ray_instance, local_run, tmp_path, monkeypatch):
    job, local = local_run
    small = job.parent / "small.jsonl"
    small.write_text("".join(job.read_text().splitlines(keepends=True)[:4]))    # row00 .. row03's rows
    out = tmp_path / "ray"
    monkeypatch.setenv(CRASH_ENV, json.dumps({"id": "row03"}))
    assert main([small, "--out", out, "--demo", "--quiet", "--ray", "--workers", "2"]) == 1
    (error,) = errors(out)
    assert (error["row"], error["id"]) == (4, "row03") and "worker making this image died 3 times" in error["message"]
    made = without_seconds(out)
    assert len(made) == 3 and all(made[i] == without_seconds(local)[i] for i in made)


def test_a_ray_run_resumes_a_local_one(ray_instance, local_run, tmp_path, capsys):
    job, local = local_run
    out = tmp_path / "resumed"
    shutil.copytree(local, out)
    for name in ("row00.png", "row12.png", "grid.seed=2.cfg=7.png"):
        (out / name).unlink()
    (out / "row15.png").write_bytes(b"\x89PNG broken")
    assert main([job, "--out", out, "--demo", "--quiet", "--ray", "--workers", "2"]) == 1
    assert "4 made (4 of them again: file missing or broken), 38 already there, 1 failed" in capsys.readouterr().err
    assert pngs(out) == pngs(local) and without_seconds(out) == without_seconds(local)
