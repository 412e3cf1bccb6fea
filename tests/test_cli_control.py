"""The CLI's ControlNet options, in-process through `main(argv)` on the tiny checkpoint and tiny ControlNet
files written to disk: the image equals the Python API's with the same Control, the infotext names each
unit as A1111's ControlNet extension does (model name and its short hash computed here from the file's
bytes by A1111's formula), and bad arguments fail with one line before any model loads."""

import hashlib
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sd15
import sd15.cli.generate as generate
from sd15.pipeline.png import read_parameters
from test_controlnet_model import CFG, random_controlnet_state

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cn")
    paths = []
    for seed in (1, 2):
        path = folder / f"control_tiny_{seed}.safetensors"
        # padded past 1 MiB with metadata, so A1111's short hash reads real bytes (it hashes 64 KiB at 1 MiB)
        save_file(random_controlnet_state(CFG, seed=seed), str(path), metadata={"pad": "x" * (1 << 21)})
        paths.append(path)
    rng = np.random.default_rng(0)
    image = folder / "control.png"
    Image.fromarray(np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                            np.ones((8, 8, 1), dtype=np.uint8))).save(image)
    return paths, image


def a1111_short_hash(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


RUN = ["--prompt", "a lighthouse", "--steps", "3", "--width", "64", "--height", "64", "--seed", "5",
       "--device", "cpu", "--quiet", "--sampler", "Euler"]


def test_two_controlnets_from_the_cli_equal_the_python_api(tiny_ckpt_file, files, tmp_path, capsys):
    (a, b), image = files
    out = tmp_path / "cli.png"
    code = generate.main(["--ckpt", str(tiny_ckpt_file), *RUN, "--out", str(out),
                          "--controlnet", str(a), "--control-image", str(image), "--control-strength", "0.8",
                          "--control-mode", "prompt",
                          "--controlnet", str(b), "--control-image", str(image), "--control-end", "0.5"])
    assert code == 0, capsys.readouterr().err
    pipe = sd15.load(tiny_ckpt_file, device="cpu")
    controls = [sd15.Control(sd15.load_controlnet(a, pipe), image, strength=0.8, mode="prompt"),
                sd15.Control(sd15.load_controlnet(b, pipe), image, end=0.5)]
    want = pipe.txt2img("a lighthouse", steps=3, width=64, height=64, seed=5, sampler="Euler", control=controls)[0]
    plain = pipe.txt2img("a lighthouse", steps=3, width=64, height=64, seed=5, sampler="Euler")[0]
    got = Image.open(out)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(got), np.asarray(plain))       # the ControlNets did something
    text = read_parameters(out)
    first = (f'ControlNet 0: "Module: none, Model: {a.stem} [{a1111_short_hash(a)}], Weight: 0.8, '
             'Resize Mode: Crop and Resize, Guidance Start: 0, Guidance End: 1, Pixel Perfect: True, Control Mode: My prompt is more '
             'important"')
    second = (f'ControlNet 1: "Module: none, Model: {b.stem} [{a1111_short_hash(b)}], Weight: 1, '
              'Resize Mode: Crop and Resize, Guidance Start: 0, Guidance End: 0.5, Pixel Perfect: True, Control Mode: Balanced"')
    assert first in text and second in text, text


def test_init_image_is_the_control_image_in_img2img(tiny_ckpt_file, files, tmp_path, capsys):
    (a, _), image = files
    out = tmp_path / "i2i.png"
    code = generate.main(["--ckpt", str(tiny_ckpt_file), *RUN, "--out", str(out), "--init-image", str(image),
                          "--strength", "0.7", "--controlnet", str(a)])
    assert code == 0, capsys.readouterr().err
    pipe = sd15.load(tiny_ckpt_file, device="cpu")
    want = pipe.img2img(image, "a lighthouse", strength=0.7, steps=3, width=64, height=64, seed=5, sampler="Euler",
                        control=[sd15.Control(sd15.load_controlnet(a, pipe), image)])[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))


ERRORS = {
    "missing file": (["--controlnet", "MISSING", "--control-image", "IMAGE"], r"ControlNet file .*missing.* not exist"),
    "no image in txt2img": (["--controlnet", "A"], r"give its --control-image"),
    "bad mode": (["--controlnet", "A", "--control-image", "IMAGE", "--control-mode", "strong"],
                 r"mode must be one of balanced, prompt, controlnet"),
    "start after end": (["--controlnet", "A", "--control-image", "IMAGE", "--control-start", "0.8",
                         "--control-end", "0.2"], r"0 <= start < end <= 1"),
    "unknown preprocessor": (["--controlnet", "A", "--control-image", "IMAGE", "--control-preprocess", "depth"],
                             r"unknown ControlNet preprocessor 'depth'"),
    "bad preprocessor parameter": (["--controlnet", "A", "--control-image", "IMAGE", "--control-preprocess",
                                    "canny:low=x"], r"key=number"),
    "negative threshold": (["--controlnet", "A", "--control-image", "IMAGE", "--control-preprocess",
                            "canny:low=-5"], r"low"),
    "unknown preprocessor parameter": (["--controlnet", "A", "--control-image", "IMAGE", "--control-preprocess",
                                        "canny:sigma=2"], r"takes low, high"),
    "bad resize": (["--controlnet", "A", "--control-image", "IMAGE", "--control-resize", "Stretch"],
                   r"resize_mode must be one of"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_control_argument_errors_fail_before_loading(case, tiny_ckpt_file, files, tmp_path, monkeypatch, capsys):
    def tripwire(*_args, **_kwargs):
        raise AssertionError("the model was loaded for an argument error")
    monkeypatch.setattr(generate, "load_pipeline", tripwire)
    (a, _), image = files
    names = {"A": a, "IMAGE": image, "MISSING": tmp_path / "missing.safetensors"}
    args, message = ERRORS[case]
    code = generate.main(["--ckpt", str(tiny_ckpt_file), *RUN, "--out", str(tmp_path / "x.png"),
                          *(str(names.get(x, x)) for x in args)])
    err = capsys.readouterr().err
    assert code == generate.EXIT_USAGE and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--control-image", "x.png", "--controlnet", "a.safetensors"], "--control-image belongs to a --controlnet"),
    (["--controlnet", "a", "--control-end", "0.5", "--control-end", "0.6"], "--control-end given twice"),
    (["--controlnet", "a", "--control-strength", "strong"], "invalid float value"),
])
def test_unit_options_follow_their_controlnet(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        generate.main(["--prompt", "x", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_hostile_controlnet_file_is_refused_without_running_code(tiny_ckpt_file, files, tmp_path, capsys):
    """A .pth whose pickle would run a command: refused by the safe reader, the command never runs."""
    import pickle
    import zipfile
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "control_evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"control_model.zero_convs.0.0.weight": Evil()}))
        z.writestr("archive/version", "3\n")
    _, image = files
    code = generate.main(["--ckpt", str(tiny_ckpt_file), *RUN, "--out", str(tmp_path / "x.png"),
                          "--controlnet", str(path), "--control-image", str(image)])
    err = capsys.readouterr().err
    assert code == generate.EXIT_USAGE and "error:" in err and "Traceback" not in err, err
    assert not marker.exists() and not (tmp_path / "x.png").exists()
    assert torch.get_num_threads() >= 1
