"""The A1111 `parameters` text as written (`sd15.pipeline.infotext`; docs/architecture.md, "Outputs"), and
`sd15.pipeline.png`'s atomic, never-clobbering PNG writes. Reading infotexts back: test_infotext.py."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from sd15.pipeline.infotext import format_infotext as a1111_parameters
from sd15.pipeline.png import read_parameters, save_png

SETTINGS = {"Steps": 30, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.5, "Seed": 42,
            "Size": "512x512", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly"}
LINE = ("Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly")


def image():
    return Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))


# ---- format_infotext ----------------------------------------------------------------------------

def test_design_example():
    text = a1111_parameters("a lighthouse at dusk", "blurry", SETTINGS)
    assert text == f"a lighthouse at dusk\nNegative prompt: blurry\n{LINE}"


def test_negative_prompt_line_omitted_when_empty():
    assert a1111_parameters("a cat", "", SETTINGS) == f"a cat\n{LINE}"


def test_prompts_are_kept_verbatim():
    """Prompt lines are free text (A1111 does not quote them), commas and colons included."""
    text = a1111_parameters("(masterpiece:1.2), a cat", "lowres, bad hands", SETTINGS)
    assert text.splitlines()[:2] == ["(masterpiece:1.2), a cat", "Negative prompt: lowres, bad hands"]


@pytest.mark.parametrize("value", ["my, model", "style: anime", "two\nlines", 'say "hi", ok', "naïve: ü"])
def test_values_with_separators_are_json_quoted(value):
    line = a1111_parameters("p", "", {"Model": value, "Seed": 1}).splitlines()[-1]
    quoted = line.removeprefix("Model: ").removesuffix(", Seed: 1")
    assert quoted.startswith('"') and json.loads(quoted) == value
    assert "\n" not in line and ("naïve" in line) == ("naïve" in value)     # non-ASCII kept as is


@pytest.mark.parametrize("value", ["plain", "512x512", "DPM++ 2M", "v1-5_pruned.emaonly", 7.5, 0])
def test_plain_values_are_not_quoted(value):
    assert a1111_parameters("p", "", {"K": value}).splitlines()[-1] == f"K: {value}"


def test_none_values_are_left_out():
    assert a1111_parameters("p", "", {"A": 1, "Model hash": None, "B": 2}).splitlines()[-1] == "A: 1, B: 2"


# ---- save_png ------------------------------------------------------------------------------------

def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def test_round_trip(tmp_path):
    text = a1111_parameters("a cat, ünïcödé 🐱", "dog", SETTINGS)
    path = save_png(image(), tmp_path / "out.png", text)
    assert path == tmp_path / "out.png"
    assert read_parameters(path) == text
    with Image.open(path) as back:
        assert back.format == "PNG" and np.array_equal(np.asarray(back), np.asarray(image()))
    assert leftovers(tmp_path) == []


def test_file_mode_follows_the_umask(tmp_path):
    """0666 less the umask, like any other tool's output: a web server or another user can read it."""
    old = os.umask(0o022)
    try:
        path = save_png(image(), tmp_path / "mode.png", "x")
        os.umask(0o027)
        strict = save_png(image(), tmp_path / "strict.png", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and strict.stat().st_mode & 0o777 == 0o640


def test_no_parameters(tmp_path):
    path = save_png(image(), tmp_path / "plain.png")
    assert read_parameters(path) is None


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "taken.png"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not overwriting"):
        save_png(image(), path, "x")
    assert path.read_bytes() == b"precious"
    assert leftovers(tmp_path) == []


def test_no_temp_file_left_when_writing_fails(tmp_path, monkeypatch):
    def disk_full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half an image")
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_png(image(), tmp_path / "never.png", "x")
    assert list(tmp_path.iterdir()) == []


def test_no_temp_file_left_when_the_name_is_taken_meanwhile(tmp_path, monkeypatch):
    """A concurrent writer that takes the name between the check and the link is not clobbered either."""
    path = tmp_path / "race.png"
    real_link = os.link

    def link_after_someone_else(src, dst):
        path.write_bytes(b"theirs")
        return real_link(src, dst)
    monkeypatch.setattr(os, "link", link_after_someone_else)
    with pytest.raises(FileExistsError):
        save_png(image(), path, "x")
    assert path.read_bytes() == b"theirs"
    assert leftovers(tmp_path) == []


def test_missing_folder_is_an_error_not_a_partial_file(tmp_path):
    with pytest.raises(OSError):
        save_png(image(), tmp_path / "no" / "such" / "dir.png", "x")
    assert list(tmp_path.iterdir()) == []
