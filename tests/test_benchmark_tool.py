"""Smoke test of `tools.benchmark` on a tiny checkpoint, CPU: every section runs and its JSON holds sane figures.

The parity columns are real checks (both engines on the same tensors); the timings only need to exist.
--compile is left out (minutes of Inductor); a GPU session runs the tool for real (see its docstring).
"""

import json
import math

import pytest

from tools import benchmark
from sd15.models.demo import random_state_dict, tiny_metadata
from tools.make_checkpoint import save

MODEL_ROWS = ("unet", "decode", "encode", "text")


@pytest.fixture(scope="module")
def results(tmp_path_factory, one_thread):
    """One in-process run, one intra-op thread (tiny models: far faster on a small shared CPU)."""
    tmp = tmp_path_factory.mktemp("bench")
    ckpt, out = tmp / "tiny.safetensors", tmp / "results.json"
    save(random_state_dict(seed=3), ckpt, metadata=tiny_metadata())
    argv = ["--ckpt", str(ckpt), "--device", "cpu", "--size", "64", "--repeats", "1", "--steps", "2",
            "--only", "load,unet,decode,encode,text,txt2img,lcm,flops", "--load-repeats", "1",
            "--matmul-size", "128", "--out", str(out)]
    assert benchmark.main(argv) == 0
    return json.loads(out.read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_row_has_positive_finite_times(results):
    rows = {r["key"]: r for r in results["rows"]}
    assert set(rows) == {*MODEL_ROWS, "txt2img", "lcm"}
    for r in rows.values():
        for field in ("ours_s", "diffusers_s", "ratio", "cpu_ratio"):
            assert positive(r[field]), (r["key"], field, r[field])
    assert positive(rows["unet"]["ours_it_s"]) and positive(rows["txt2img"]["diffusers_it_s"])
    assert "ours_peak_bytes" not in rows["unet"]          # CUDA-only field
    assert results["size"] == 64 and results["inner"] == 1 and results["device"] == "cpu"
    assert isinstance(results["machine"]["thp_mem_alloc"], bool)


def test_engines_agree(results):
    rows = {r["key"]: r for r in results["rows"]}
    for key in MODEL_ROWS:
        assert rows[key]["max_rel_diff"] < 1e-4, (key, rows[key]["max_rel_diff"])
    assert rows["txt2img"]["max_rel_diff"] <= 2 / 255         # pixel difference / 255
    # LCM-LoRA merged into both (ours from the request, diffusers' fuse_lora), LCM sampler vs LCMScheduler.
    assert rows["lcm"]["max_rel_diff"] <= 2 / 255
    assert positive(rows["lcm"]["ours_first_s"]) and rows["lcm"]["name"].startswith("txt2img 64x64, LCM-LoRA")


def test_shapes_come_from_the_checkpoints_configs(results):
    names = {r["key"]: r["name"] for r in results["rows"]}
    assert names["unet"] == "UNet step, CFG batch 2x4x8x8" and names["decode"] == "VAE decode 64x64"
    counted = results["flops"]["counted"]
    assert set(counted) == set(MODEL_ROWS) and all(positive(v) for v in counted.values())
    assert counted["unet"] < 1e9                              # tiny model at 64², not SD1.5 at 512²
    assert all(positive(v) for v in results["flops"]["peak_matmul"].values())


def test_load_rows(results):
    assert [r["dtype"] for r in results["load"]] == ["float16", "float32"]
    for r in results["load"]:
        for field in ("file_bytes", "raw_read_s", "import_s", "load_s", "load_touched_s", "ratio_to_read",
                      "peak_bytes", "peak_to_file"):
            assert positive(r[field]), (r["dtype"], field, r[field])


def test_bad_size_is_refused(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--size", "100"])
    assert "multiple of 8" in capsys.readouterr().err
