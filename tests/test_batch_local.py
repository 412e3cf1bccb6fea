"""`python -m sd15.batch` on one machine, with the tiny demo model: every image made once with its infotext,
bad rows reported and skipped, resume after Ctrl-C, SIGKILL and os._exit, changed rows, grids and their
contact sheets, exit statuses. The same job on Ray: test_batch_ray.py."""

import hashlib
import json
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

import sd15
from batch_helpers import (batch_command, batch_env, errors, file_stamps, infotexts, manifest, pngs, run_batch,
                           slow_job, temp_files, write_jsonl)
from sd15.batch.cli import main
from sd15.batch.fields import request_of
from sd15.batch.job import read_job
from sd15.batch.output import OutputDir
from sd15.batch.render import CRASH_ENV, CRASH_STATUS, DEMO_NAME, Settings, model_hash
from sd15.models.demo import write_demo_checkpoint
from sd15.pipeline.png import read_parameters


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return sd15.load(write_demo_checkpoint(tmp_path_factory.mktemp("demo") / DEMO_NAME))


def small_job(folder, rows=None):
    return write_jsonl(folder / "job.jsonl", rows or [
        {"id": "cat", "prompt": "a cat", "steps": 3, "size": "64x64"},
        {"prompt": "a dog, at night", "negative": "blurry", "steps": 4, "size": "64x96", "sampler": "Euler a"},
        {"id": "owl", "prompt": "an owl", "steps": 3, "size": "64x64", "seed": 77, "seed_mode": "a1111",
         "cfg": 5},
        {"id": "unknown-sampler", "prompt": "x", "sampler": "Euler z", "size": "64x64"},
        {"id": "bad-size", "prompt": "x", "size": "64x60"},
        {"id": "bad-image", "prompt": "x", "init_image": "nothing-here.png"},
        '{"prompt": "a broken line"',
    ])


def demo_hash() -> str:
    return model_hash(Settings(base_dir=".", demo=True))


def test_good_rows_made_bad_rows_reported(tmp_path, pipe, capsys):
    job, out = small_job(tmp_path), tmp_path / "out"
    assert main([job, "--out", out, "--demo", "--quiet"]) == 4              # the status: 4 rows failed
    assert "3 made, 0 already there, 4 failed" in capsys.readouterr().err
    lines = errors(out)
    assert [(e["row"], e["id"]) for e in lines] == [(4, "unknown-sampler"), (5, "bad-size"), (6, "bad-image"),
                                                    (7, None)]
    messages = [e["message"] for e in lines]
    assert "unknown sampler 'Euler z'" in messages[0] and "'Euler a'" in messages[0]       # says what is valid
    assert "height must be a multiple of 8" in messages[1] and "try 56 or 64" in messages[1]
    assert "init_image nothing-here.png: no such file" in messages[2]
    assert "not valid JSON" in messages[3]
    items = {item.id: item for item in read_job(job, model_hash=demo_hash()).items}
    entries = manifest(out)
    assert sorted(e["id"] for e in entries) == sorted(items) and len(items) == 3
    assert sorted(pngs(out)) == sorted(f"{i}.png" for i in items)
    for entry in entries:
        item = items[entry["id"]]
        data = (out / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert (entry["seed"], entry["row"], entry["fingerprint"]) == (item.fields["seed"], item.row, item.fingerprint)
        request = request_of(item.fields, tmp_path)
        made = Image.open(out / entry["file"])
        assert np.array_equal(np.asarray(made), np.asarray(pipe.generate(request)[0]))    # the image the row asks for
        back = sd15.Request.from_infotext(made.text["parameters"]).request
        assert back == request                                              # its infotext says how to make it again
    assert temp_files(out) == []


def test_exit_status_is_the_number_of_failed_rows_at_most_100(tmp_path, capsys):
    job = write_jsonl(tmp_path / "j.jsonl", [{"id": f"b{i}", "prompt": "x", "steps": 0} for i in range(130)])
    assert main([job, "--out", tmp_path / "out", "--demo", "--quiet"]) == 100
    assert len(errors(tmp_path / "out")) == 130
    capsys.readouterr()
    assert main([tmp_path / "none.jsonl", "--out", tmp_path / "o2", "--demo"]) == 101     # the job cannot run
    assert f"error: job file {tmp_path / 'none.jsonl'} does not exist" in capsys.readouterr().err
    assert main([job, "--out", tmp_path / "o3", "--ckpt", tmp_path / "missing.safetensors"]) == 101
    assert main([job, "--out", tmp_path / "o3", "--demo", "--workers", "2"]) == 101        # --workers needs --ray


def test_resume_skips_what_is_there_and_redoes_what_is_missing_or_broken(tmp_path, capsys):
    job, out = small_job(tmp_path, [{"id": f"r{i}", "prompt": f"a boat {i}", "steps": 3, "size": "64x64"}
                                    for i in range(6)]), tmp_path / "out"
    assert main([job, "--out", out, "--demo", "--quiet"]) == 0
    first, stamps, lines = pngs(out), file_stamps(out), manifest(out)
    assert main([job, "--out", out, "--demo", "--quiet"]) == 0
    assert "0 made, 6 already there" in capsys.readouterr().err
    assert file_stamps(out) == stamps and manifest(out) == lines                 # nothing touched
    (out / "r1.png").unlink()                                                     # missing
    (out / "r2.png").write_bytes(first["r2.png"][:500])                          # truncated
    (out / ".r3.0123456789ab.tmp").write_bytes(b"half a png")                    # an interrupted write's leftover
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"id": "r4", "file": "r4.png", "se')                            # a torn last line
    assert main([job, "--out", out, "--demo", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "2 made (2 of them again: file missing or broken), 4 already there" in err
    assert "removed 1 temporary file(s) an interrupted run left" in err
    assert pngs(out) == first                                                     # the same bytes again
    after = file_stamps(out)
    assert {name for name in stamps if after[name] != stamps[name]} == {"r1.png", "r2.png"}
    assert sorted(e["id"] for e in manifest(out)) == [f"r{i}" for i in range(6)]   # one intact line per id
    assert temp_files(out) == []


def test_a_changed_row_is_an_error_naming_it_unless_force(tmp_path, capsys):
    rows = [{"id": "cat", "prompt": "a cat", "steps": 3, "size": "64x64"},
            {"id": "dog", "prompt": "a dog", "steps": 3, "size": "64x64", "seed": 3},
            {"prompt": "derived", "steps": 3, "size": "64x64"}]
    job, out = write_jsonl(tmp_path / "j.jsonl", rows), tmp_path / "out"
    assert main([job, "--out", out, "--demo", "--quiet"]) == 0
    before, lines = pngs(out), manifest(out)
    capsys.readouterr()
    write_jsonl(job, [rows[0] | {"prompt": "a black cat"}, rows[1], rows[2]])
    assert main([job, "--out", out, "--demo", "--quiet"]) == 101
    err = capsys.readouterr().err
    assert "row 1 (cat)" in err and "dog" not in err and "--force" in err
    assert pngs(out) == before and manifest(out) == lines                        # nothing was touched
    assert main([job, "--out", out, "--demo", "--seed", "5", "--quiet"]) == 101  # the derived seed changes too
    err = capsys.readouterr().err
    assert "2 image(s)" in err and "row 1 (cat)" in err and "row 3 (" in err and "dog" not in err  # dog's seed is its own
    assert main([job, "--out", out, "--demo", "--force", "--quiet"]) == 0
    assert "1 made, 2 already there" in capsys.readouterr().err
    assert read_parameters(out / "cat.png").startswith("a black cat\n")
    assert sorted(e["id"] for e in manifest(out)) == sorted(e["id"] for e in lines)
    assert {k: v for k, v in pngs(out).items() if k != "cat.png"} == {k: v for k, v in before.items() if k != "cat.png"}


def test_grid_rows_and_their_contact_sheets(tmp_path):
    job, out = write_jsonl(tmp_path / "j.jsonl", [
        {"id": "xy", "prompt": "a fox", "steps": 3, "size": "64x64", "seed": [1, 2, 3], "cfg": [5, 7.5]},
        {"id": "x", "prompt": "a fox", "steps": 3, "size": "64x64", "sampler": ["Euler a", "DDIM"]},
        {"id": "xyz", "prompt": "a fox", "steps": [2, 3], "size": "64x64", "seed": [1, 2], "cfg": [5, 6]},
    ]), tmp_path / "out"
    assert main([job, "--out", out, "--demo", "--quiet"]) == 0
    assert len(manifest(out)) == 6 + 2 + 8
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["x.png", "xy.png"]     # 3 axes: no sheet
    sheet = np.asarray(Image.open(out / "grids" / "xy.png").convert("RGB"))
    height, width, _ = sheet.shape
    top, left = height - 2 * 64, width - 3 * 64                    # 3 columns (seed) by 2 rows (cfg), labelled
    assert 8 <= top <= 40 and 20 <= left <= 120
    for c, seed in enumerate((1, 2, 3)):
        for r, cfg in enumerate(("5", "7.5")):
            cell = sheet[top + 64 * r:top + 64 * (r + 1), left + 64 * c:left + 64 * (c + 1)]
            assert np.array_equal(cell, np.asarray(Image.open(out / f"xy.seed={seed}.cfg={cfg}.png").convert("RGB")))
        label = sheet[:top, left + 64 * c:left + 64 * (c + 1)]
        assert (label < 128).any() and (label == 255).mean() > 0.5          # dark text on white above each column
    for r in range(2):
        assert (sheet[top + 64 * r:top + 64 * (r + 1), :left] < 128).any()  # and left of each row
    assert (sheet[top:, left:] != 255).any(axis=2).mean() > 0.99            # the images fill the rest
    one_d = Image.open(out / "grids" / "x.png")
    assert one_d.width == 2 * 64 and 64 + 8 <= one_d.height <= 64 + 40

    stamp = (out / "grids" / "xy.png").stat().st_mtime_ns
    assert main([job, "--out", out, "--demo", "--quiet"]) == 0              # nothing new: the sheet stays
    assert (out / "grids" / "xy.png").stat().st_mtime_ns == stamp
    (out / "xy.seed=2.cfg=5.png").unlink()
    (out / "grids" / "x.png").unlink()
    assert main([job, "--out", out, "--demo", "--quiet"]) == 0              # redone, and both sheets again
    assert np.array_equal(np.asarray(Image.open(out / "grids" / "xy.png").convert("RGB")), sheet)
    assert (out / "grids" / "x.png").exists()


def wait_for_lines(out, count, process, timeout=60.0):
    deadline = time.monotonic() + timeout
    while len(manifest(out, strict=False)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


def check_complete(job, out):
    """Every id exactly once in the manifest and on disk, each infotext intact, no temp files."""
    items = read_job(job).items
    ids = [e["id"] for e in manifest(out)]
    assert sorted(ids) == sorted(i.id for i in items) and len(ids) == len(set(ids))
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{i.id}.png" for i in items)
    texts = infotexts(out)
    for item in items:
        assert sd15.Request.from_infotext(texts[item.id]).request == request_of(item.fields, job.parent)
    assert temp_files(out) == []


def test_sigkill_of_the_driver_then_resume(tmp_path, capsys):
    job, out = slow_job(tmp_path), tmp_path / "out"
    process = subprocess.Popen(batch_command(job, "--out", out, "--demo", "--quiet"), env=batch_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_lines(out, 4, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    made_before = {e["id"] for e in manifest(out, strict=False)}
    assert 4 <= len(made_before) < 20
    stamps = file_stamps(out)
    assert main([job, "--out", out, "--demo", "--quiet"]) == 0
    assert f"{20 - len(made_before)} made, {len(made_before)} already there" in capsys.readouterr().err
    check_complete(job, out)
    after = file_stamps(out)
    assert all(after[f"{i}.png"] == stamps[f"{i}.png"] for i in made_before)   # nothing made twice


def test_a_row_that_kills_the_process_then_resume(tmp_path, capsys):
    """os._exit in the middle of a row (the test-only hook: an environment variable, no job column)."""
    job, out = slow_job(tmp_path, 12), tmp_path / "out"
    crash = json.dumps({"id": "s07"})
    result = run_batch(job, "--out", out, "--demo", "--quiet", env=batch_env(**{CRASH_ENV: crash}))
    assert result.returncode == CRASH_STATUS
    assert sorted(e["id"] for e in manifest(out)) == [f"s{i:02d}" for i in range(7)]
    stamps = file_stamps(out)
    assert main([job, "--out", out, "--demo", "--quiet"]) == 0
    assert "5 made, 7 already there" in capsys.readouterr().err
    check_complete(job, out)
    assert all(file_stamps(out)[name] == stamp for name, stamp in stamps.items())
    write_jsonl(job, [{"id": "s07", "prompt": "p", "size": "64x64", "steps": 2, "crash": True}])
    assert main([job, "--out", tmp_path / "other", "--demo", "--quiet"]) == 1       # no job column reaches it
    assert "unknown column 'crash'" in errors(tmp_path / "other")[0]["message"]


def test_ctrl_c_stops_after_the_current_image_and_says_how_to_resume(tmp_path):
    job, out = slow_job(tmp_path), tmp_path / "out"
    process = subprocess.Popen(batch_command(job, "--out", out, "--demo", "--quiet"), env=batch_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_lines(out, 3, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "stopping after the current image" in err and "To resume, run the same command again" in err
    assert f"python -m sd15.batch {job} --out {out} --demo --quiet" in err
    done = len(manifest(out))
    assert 3 <= done < 20 and len(list(out.glob("*.png"))) == done and temp_files(out) == []
    assert main([job, "--out", out, "--demo", "--quiet"]) == 0
    check_complete(job, out)


def test_one_run_at_a_time_per_folder(tmp_path, capsys):
    job, out = slow_job(tmp_path, 2), tmp_path / "out"
    with OutputDir(out):                                   # what a running job holds
        assert main([job, "--out", out, "--demo", "--quiet"]) == 101
        assert "another batch run is writing to" in capsys.readouterr().err
    assert main([job, "--out", out, "--demo", "--quiet"]) == 0
