"""Batch job files (sd15.batch: job, fields, grid, ids): reading JSONL and CSV, the column names, grids, stable
ids and seeds, and the rows that are refused with their row numbers. No image is made here (test_batch_local.py,
test_batch_ray.py make them)."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from sd15.batch.fields import request_of
from sd15.batch.job import JobError, read_job
from sd15.pipeline.request import Request


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def items_by_id(job):
    return {item.id: item for item in job.items}


def test_columns_map_to_the_request_they_name(tmp_path):
    job = read_job(write_jsonl(tmp_path / "job.jsonl", [
        {"id": "a", "prompt": "a cat", "negative_prompt": "blurry", "steps": "20", "sampler": "Euler a",
         "cfg_scale": 6, "width": 64, "height": 96, "seed": 5, "clip_skip": 2, "eta": 0.5},
        {"id": "b", "prompt": "a dog", "sampler": "DPM++ 2M", "schedule": "Karras", "size": "96 X 64",
         "seed_mode": "a1111", "seed": 9, "hires": "yes", "hr_scale": 1.5, "hr_steps": 3,
         "hr_denoising_strength": 0.4},
    ]))
    assert job.bad == []
    a, b = (request_of(items_by_id(job)[i].fields, tmp_path) for i in ("a", "b"))
    assert a == Request("a cat", negative_prompt="blurry", steps=20, sampler="Euler a", guidance_scale=6.0,
                        width=64, height=96, seed=5, clip_skip=2, sampler_options={"eta": 0.5})
    assert b.sampler == "dpmpp_2m_karras" and b.size == (96, 64) and b.seed_mode == "a1111" and b.seed == 9
    assert (b.hires.scale, b.hires.steps, b.hires.denoising_strength) == (1.5, 3, 0.4)


def test_img2img_paths_are_relative_to_the_job_file(tmp_path):
    folder = tmp_path / "jobs"
    folder.mkdir()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(folder / "in.png")
    job = read_job(write_jsonl(folder / "job.jsonl", [{"id": "i", "prompt": "x", "init_image": "in.png",
                                                       "denoising_strength": 0.5}]))
    request = request_of(job.items[0].fields, folder)
    assert request.init_image is not None and request.size == (64, 64) and request.strength == 0.5


def test_csv_and_jsonl_give_the_same_images(tmp_path):
    """Same rows, same ids (derived from the content), fields and fingerprints, whichever format."""
    rows = [{"prompt": "a cat, oil", "steps": 12, "cfg": 7, "seed": [1, 2]},
            {"prompt": "[cat:dog:10] (red:1.2)", "negative": "", "width": 64, "height": 64,
             "loras": [["style", 0.8]]}]
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "style.safetensors").write_bytes(b"")
    jsonl = read_job(write_jsonl(tmp_path / "a.jsonl", rows), loras=_library(loras))
    (tmp_path / "a.csv").write_text(
        '\ufeffprompt,steps,cfg,seed,negative,width,height,loras\n'
        '"a cat, oil",12,7.0,"[1, 2]",,,,\n'
        '[cat:dog:10] (red:1.2),,,,,64,64,"[[""style"", 0.8]]"\n', encoding="utf-8")
    csv = read_job(tmp_path / "a.csv", loras=_library(loras))
    assert csv.bad == [] and jsonl.bad == []
    assert [(i.id, i.fields, i.fingerprint) for i in csv.items] == [(i.id, i.fields, i.fingerprint)
                                                                  for i in jsonl.items]
    assert csv.items[2].fields["prompt"] == "[cat:dog:10] (red:1.2)"     # prompt editing is not a list
    assert [i.row for i in csv.items] == [2, 2, 3] and [i.row for i in jsonl.items] == [1, 1, 2]


def _library(folder):
    from sd15.adapters.library import Loras
    return Loras([folder])


def test_derived_ids_follow_the_content_not_the_spelling(tmp_path):
    job = read_job(write_jsonl(tmp_path / "j.jsonl", [
        {"prompt": "a cat", "steps": 10, "cfg": 7},
        {"cfg": "7.0", "steps": "10", "prompt": "a cat"},       # the same row, spelt otherwise
        {"prompt": "a cat", "steps": 11, "cfg": 7},
    ]))
    first, other = (i.id for i in job.items)
    assert len(first) == 12 and all(c in "0123456789abcdef" for c in first) and other != first
    (bad,) = job.bad
    assert (bad.row, bad.id) == (2, first) and "repeats row 1 exactly" in bad.message


def test_seeds_are_fixed_before_anything_runs(tmp_path):
    """A row without a seed: the first 4 bytes of sha256("JOBSEED/ID"), big-endian (the documented formula)."""
    path = write_jsonl(tmp_path / "j.jsonl", [{"id": "fox", "prompt": "a fox"},
                                              {"id": "owl", "prompt": "an owl", "seed": 1234},
                                              {"id": "g", "prompt": "a grid", "cfg": [4, 6, 8]}])
    for job_seed in (0, 7):
        items = items_by_id(read_job(path, job_seed=job_seed))
        expected = int.from_bytes(hashlib.sha256(f"{job_seed}/fox".encode()).digest()[:4], "big")
        assert items["fox"].fields["seed"] == expected
        assert items["owl"].fields["seed"] == 1234
        grid_seed = int.from_bytes(hashlib.sha256(f"{job_seed}/g".encode()).digest()[:4], "big")
        assert {items[f"g.cfg={c}"].fields["seed"] for c in (4, 6, 8)} == {grid_seed}   # one seed for the grid
    a, b = read_job(path, job_seed=0).items[0], read_job(path, job_seed=7).items[0]
    assert a.fingerprint != b.fingerprint                     # another job seed is another image
    assert read_job(path, model_hash="aaaa").items[1].fingerprint != read_job(path, model_hash="bbbb").items[1].fingerprint


def test_grid_expands_as_a_product_last_axis_fastest(tmp_path):
    job = read_job(write_jsonl(tmp_path / "j.jsonl", [
        {"id": "g", "prompt": "p", "seed": [1, 2, 3], "cfg": [5, 7.5], "sampler": "Euler a"},
        {"id": "s", "prompt": ["a cat", "a dog, at night"], "sampler": ["Euler a", "DPM++ 2M Karras"]},
        {"id": "l", "prompt": "p", "loras": [["style", [0.5, 1]], ["detail", 0.3, [0.1, 0.2]]]},
        {"id": "three", "prompt": "p", "seed": [1, 2], "cfg": [5, 6], "steps": [3, 4]},
    ]), loras=_library_with(tmp_path, "style", "detail"))
    assert job.bad == []
    ids = [i.id for i in job.items if i.base_id == "g"]
    assert ids == ["g.seed=1.cfg=5", "g.seed=1.cfg=7.5", "g.seed=2.cfg=5", "g.seed=2.cfg=7.5",
                   "g.seed=3.cfg=5", "g.seed=3.cfg=7.5"]
    assert items_by_id(job)["g.seed=2.cfg=7.5"].fields | {} == {"prompt": "p", "seed": 2, "cfg": 7.5,
                                                               "sampler": "Euler a"}
    samplers = [i for i in job.items if i.base_id == "s"]
    assert [(i.fields["prompt"], i.fields["sampler"]) for i in samplers] == [
        ("a cat", "Euler a"), ("a cat", "DPM++ 2M Karras"), ("a dog, at night", "Euler a"),
        ("a dog, at night", "DPM++ 2M Karras")]
    assert samplers[1].id == "s.prompt=h" + samplers[1].id.split("=h")[1]      # a prompt with ", " is hashed
    assert samplers[1].id.endswith(".sampler=DPM++_2M_Karras")
    loras = [i.fields["loras"] for i in job.items if i.base_id == "l"]
    assert loras == [[["style", 0.5], ["detail", 0.3, 0.1]], [["style", 0.5], ["detail", 0.3, 0.2]],
                     [["style", 1.0], ["detail", 0.3, 0.1]], [["style", 1.0], ["detail", 0.3, 0.2]]]
    assert [i.id for i in job.items if i.base_id == "l"][1] == "l.lora-style=0.5.lora-detail-unet=0.2"
    assert len([i for i in job.items if i.base_id == "three"]) == 8
    grids = {g.base_id: g for g in job.grids}
    assert set(grids) == {"g", "s", "l"}                     # three axes: no contact sheet
    assert [a.label for a in grids["g"].axes] == ["seed", "cfg"] and grids["g"].ids == tuple(ids)


def _library_with(tmp_path, *names):
    folder = tmp_path / "loras"
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / f"{name}.safetensors").write_bytes(b"")
    return _library(folder)


def test_bad_rows_are_named_with_row_number_id_and_fix(tmp_path):
    (tmp_path / "broken.png").write_text("not an image")
    job = read_job(write_jsonl(tmp_path / "j.jsonl", [
        {"id": "ok", "prompt": "fine", "size": "64x64"},
        {"id": "s", "prompt": "x", "sampler": "Euler z"},
        "",
        {"id": "w", "prompt": "x", "width": 500},
        {"id": "i", "prompt": "x", "init_image": "missing.png"},
        {"id": "u", "prompt": "x", "init_image": "broken.png"},
        {"id": "c", "prompt": "x", "negativ": "blurry"},
        '{"prompt": "unclosed"',
        '["a list"]',
        {"id": "ok", "prompt": "again"},
        {"prompt": "fine", "size": "64x64"},
        {"prompt": "fine", "size": "64x64"},
        {"id": "bad/id", "prompt": "x"},
        {"id": "n", "prompt": "x", "loras": [["nowhere", 1]]},
        {"id": "g", "prompt": "x", "size": ["64x64", "64x60"]},
        {"id": "b", "prompt": "x", "batch_size": 4},
        {"id": "e", "prompt": "x", "seed": []},
        {"id": "big", "prompt": "x", "seed": list(range(101)), "cfg": list(range(100))},
    ]))
    bad = {(b.row, b.id): b.message for b in job.bad}
    expect = {
        (2, "s"): "unknown sampler 'Euler z'",
        (4, "w"): "width must be a multiple of 8",
        (5, "i"): "init_image missing.png: no such file",
        (6, "u"): "broken.png",
        (7, "c"): "unknown column 'negativ' (did you mean 'negative'?)",
        (8, None): "not valid JSON",
        (9, None): "a row is a JSON object",
        (10, "ok"): "id ok is also row 1's",
        (13, "bad/id"): "id 'bad/id' cannot name a file",
        (14, "n"): "no LoRA named 'nowhere'",
        (15, "g.size=64x60"): "height must be a multiple of 8",
        (16, "b"): "a row makes one image: for several, give a list of seeds",
        (17, "e"): "seed is an empty list",
        (18, "big"): "the row's grid has 10100 points (101 x 100); at most 10000",
    }
    for key, text in expect.items():
        assert text in bad.pop(key), (key, bad.get(key))
    ((row, _), message), = bad.items()          # the repeated row, under its derived id
    assert row == 12 and "repeats row 11 exactly" in message
    assert sorted(i.id for i in job.items) == sorted(["ok", "g.size=64x64", job.items[1].id])


def test_csv_rows_that_cannot_be_read(tmp_path):
    (tmp_path / "j.csv").write_text("prompt,steps\n\"a, cat\",5\nx,5,extra\n\n\"multi\nline\",6\n",
                                    encoding="utf-8")
    job = read_job(tmp_path / "j.csv")
    assert [(b.row, "3 cells for 2 columns" in b.message) for b in job.bad] == [(3, True)]
    assert [(i.row, i.fields["prompt"]) for i in job.items] == [(2, "a, cat"), (5, "multi\nline")]


@pytest.mark.parametrize("name, text, message", [
    ("j.txt", "x", "use a .jsonl"),
    ("none.jsonl", None, "does not exist"),
    ("j.csv", "", "is empty"),
    ("j.csv", "steps,cfg\n3,4\n", "has no 'prompt' column"),
])
def test_jobs_that_cannot_run(tmp_path, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(JobError, match=message):
        read_job(tmp_path / name)


def test_every_column_is_documented_in_the_readme():
    from pathlib import Path

    from sd15.batch.fields import COLUMNS
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Generating many images", 1)[1].split("\n## ", 1)[0]
    missing = [c.name for c in COLUMNS if f"`{c.name}`" not in section]
    missing += [a for c in COLUMNS for a in c.aliases if f"`{a}`" not in section]
    assert missing == []


def test_ray_without_an_address_before_the_job(tmp_path):
    """`--ray job.jsonl`: the job file is the job, not --ray's address (argparse alone would take it)."""
    from sd15.batch.cli import parse_args
    job = tmp_path / "job.jsonl"
    job.write_text('{"prompt": "x"}\n')
    args = parse_args(["--ray", str(job), "--out", str(tmp_path / "out")])
    assert (args.job, args.ray) == (job, "")
    args = parse_args([str(job), "--ray", "auto", "--out", str(tmp_path / "out")])
    assert (args.job, args.ray) == (job, "auto")
    with pytest.raises(SystemExit) as e:
        parse_args(["--ray", "auto", "--out", str(tmp_path / "out")])
    assert e.value.code == 101
