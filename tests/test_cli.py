"""`python -m sd15.generate`, run as users run it: a real subprocess on a tiny checkpoint file.

Every subprocess pays for importing torch (~3-4 s on the shared test CPU), so the command line runs
here are few and each checks several things; the full matrix of bad arguments runs in-process through
`main(argv)` with the model loader replaced by a tripwire, which proves no model is loaded for them.
Subprocesses get OMP_NUM_THREADS=1 (tiny models run 10-20x faster single-threaded on a busy 2-core CPU).
"""

import hashlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

import sd15.cli.generate as generate
from sd15.pipeline.png import read_parameters
from sd15.sampling import SAMPLERS

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ["--prompt", "--negative-prompt", "--ckpt", "--vae", "--ema", "--demo", "--steps", "--cfg-scale", "--sampler",
           "--eta", "--seed", "--width", "--height", "--batch-size", "--init-image", "--strength", "--out",
           "--device", "--dtype", "--compile", "--quiet", "--from-png", "--clip-skip", "--plain-prompt",
           "--embeddings-dir", "--lora", "--lora-dir", "--lora-mode", "--schedule-type", "--list-samplers",
           "--seed-mode", "--subseed", "--subseed-strength", "--seed-resize-from", "--noise-seed-delta",
           "--hires", "--hr-scale", "--hr-resize", "--hr-upscaler", "--hr-steps", "--hr-denoising-strength",
           "--hr-sampler", "--hr-prompt", "--hr-negative-prompt", "--mask", "--mask-blur", "--invert-mask",
           "--masked-content", "--inpaint-blend", "--inpaint-only-masked", "--mask-padding", "--outpaint",
           "--controlnet", "--control-image", "--control-strength", "--control-start", "--control-end",
           "--control-mode", "--control-preprocess", "--control-resize", "--int8"]


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt_file):
    return tiny_ckpt_file


@pytest.fixture(scope="module")
def model_hash(ckpt):
    return hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]


@pytest.fixture
def init_png(tmp_path):
    y, x = np.mgrid[0:53, 0:70]
    path = tmp_path / "init.png"
    Image.fromarray(np.stack([x * 3, y * 4, x + y], -1).astype(np.uint8)).save(path)
    return path


def cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != generate.CKPT_ENV}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)} | extra


def cli(*args, cwd, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd15.generate", *map(str, args)], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def parse_parameters(text: str) -> tuple[str, str, dict]:
    """(prompt, negative prompt, {key: value}) from an A1111 parameters text; quoted values unquoted."""
    lines = text.split("\n")
    negative = lines[1].removeprefix("Negative prompt: ") if len(lines) == 3 else ""
    pairs = re.findall(r'([A-Za-z][\w ]*): ("(?:[^"\\]|\\.)*"|[^,]*)(?:, |$)', lines[-1])
    return lines[0], negative, {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}


def assert_usage_error(result, message):
    """One readable line, no traceback, exit status 2."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


# ---- real runs -----------------------------------------------------------------------------------

def test_txt2img_into_a_new_folder(ckpt, model_hash, tmp_path):
    out = tmp_path / "new" / "nested"
    result = cli("--ckpt", ckpt, "--prompt", "a lighthouse, at dusk", "--negative-prompt", "blurry", "--steps", 3,
                 "--sampler", "Euler a", "--cfg-scale", 6, "--seed", 123, "--width", 64, "--height", 48,
                 "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = out / "00000-123.png"
    assert result.stdout.splitlines() == [str(path)]
    assert "seed: 123" in result.stderr and "sampling" in result.stderr        # progress bar on stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000-123.png"]          # no temp file left
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (64, 48) and image.mode == "RGB"
    prompt, negative, fields = parse_parameters(read_parameters(path))
    assert (prompt, negative) == ("a lighthouse, at dusk", "blurry")
    assert fields == {"Steps": "3", "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": "6.0",
                      "Seed": "123", "Size": "64x48", "Model hash": model_hash, "Model": "tiny-model_v1"}


def test_env_checkpoint_batch_and_folder_numbering(ckpt, model_hash, tmp_path):
    """$SD15_CKPT stands in for --ckpt; a folder's numbering continues; a batch gives one file each."""
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "00007-1.png").write_bytes(b"someone else's")
    result = cli("--prompt", "a cat", "--steps", 2, "--seed", 9, "--width", 32, "--height", 32, "--batch-size", 2,
                 "--quiet", cwd=tmp_path, env=cli_env(SD15_CKPT=str(ckpt)))       # --out defaults to ./outputs
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["outputs/00008-9.png", "outputs/00009-9.png"]
    assert "sampling" not in result.stderr                                      # --quiet
    assert (out / "00007-1.png").read_bytes() == b"someone else's"
    for pos in (0, 1):
        _, negative, fields = parse_parameters(read_parameters(out / f"0000{8 + pos}-9.png"))
        assert negative == "" and fields["Model hash"] == model_hash and fields["Seed"] == "9"
        assert fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "Karras"       # the default
        assert (fields["Batch size"], fields["Batch pos"]) == ("2", str(pos))
    assert not np.array_equal(*(np.asarray(Image.open(out / f"0000{i}-9.png")) for i in (8, 9)))


def test_img2img_to_a_file_name(ckpt, init_png, tmp_path):
    result = cli("--ckpt", ckpt, "--prompt", "a fox", "--init-image", init_png, "--strength", 0.5, "--steps", 4,
                 "--sampler", "ddim", "--seed", 5, "--batch-size", 2, "--out", tmp_path / "fox.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    paths = [tmp_path / "fox-0.png", tmp_path / "fox-1.png"]
    assert result.stdout.splitlines() == [str(p) for p in paths]
    for path in paths:
        assert Image.open(path).size == (64, 48)                               # 70x53 rounded down to x8
        _, _, fields = parse_parameters(read_parameters(path))
        assert fields["Denoising strength"] == "0.5" and fields["Size"] == "64x48" and fields["Sampler"] == "DDIM"


def test_demo(tmp_path):
    result = cli("--demo", "--prompt", "anything", "--steps", 2, "--width", 64, "--height", 64, "--seed", 1,
                 "--out", tmp_path / "demo.png", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(tmp_path / "demo.png")]         # one image: exactly that name
    assert "DEMO" in result.stderr and "noise" in result.stderr
    with Image.open(tmp_path / "demo.png") as image:
        assert image.size == (64, 64)
        assert "Model: tiny-random-demo" in image.text["parameters"]


def test_ctrl_c_leaves_no_file(ckpt, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "sd15.generate", "--ckpt", str(ckpt), "--prompt", "x", "--steps", "1000",
         "--width", "256", "--height", "256", "--out", str(out)], cwd=tmp_path, env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # even if our SIGINT is ignored
    try:
        seen, deadline = b"", time.monotonic() + 90
        while not re.search(rb"sampling: .*\b[1-9]\d*/1000", seen):         # a step has run
            assert process.poll() is None and time.monotonic() < deadline, seen.decode(errors="replace")
            if select.select([process.stderr], [], [], 1)[0]:
                seen += os.read(process.stderr.fileno(), 4096)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "interrupted" in stderr.decode() and "Traceback" not in stderr.decode() and stdout == b""
    assert list(out.iterdir()) == []                                          # no .png, no temp file


# ---- refusals that need no model -----------------------------------------------------------------

def test_existing_file_is_never_overwritten(ckpt, tmp_path):
    target = tmp_path / "taken.png"
    target.write_bytes(b"precious")
    result = cli("--ckpt", ckpt, "--prompt", "x", "--out", target, cwd=tmp_path)
    assert_usage_error(result, "already exists")
    assert target.read_bytes() == b"precious"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o500, so the folder is not unwritable")
def test_unwritable_folder(ckpt, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    try:
        assert_usage_error(cli("--ckpt", ckpt, "--prompt", "x", "--out", folder, cwd=tmp_path), "cannot write")
    finally:
        folder.chmod(0o700)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("case", ["no checkpoint", "garbage file"])
def test_bad_input_from_the_command_line(tmp_path, case):
    """Two of the refusals below as real runs: $SD15_CKPT unset, and a file the loader refuses."""
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    args, message = {"no checkpoint": ([], r"no checkpoint: pass --ckpt FILE or set \$SD15_CKPT"),
                     "garbage file": (["--ckpt", tmp_path / "garbage.safetensors"], "garbage.safetensors")}[case]
    assert_usage_error(cli("--prompt", "x", "--out", tmp_path / "out", *args, cwd=tmp_path), message)
    assert not list(tmp_path.glob("out/*"))


# ---- every argument check, in-process, with a tripwire on the model loader ----------------------

@pytest.fixture
def no_model(monkeypatch):
    def tripwire(*_args, **_kwargs):
        raise AssertionError("the model was loaded for an argument error")
    monkeypatch.setattr(generate, "load_pipeline", tripwire)
    monkeypatch.delenv(generate.CKPT_ENV, raising=False)


ARGUMENT_ERRORS = {
    "width 513": (["--width", "513"], "width must be a multiple of 8.*try 512 or 520"),
    "height 0": (["--height", "0"], "height must be positive"),
    "steps 0": (["--steps", "0"], "steps must be an integer from 1"),
    "steps 1001": (["--steps", "1001"], "steps must be an integer from 1"),
    "sampler nope": (["--sampler", "nope"], "unknown sampler 'nope'; valid names: " + ", ".join(SAMPLERS)),
    "cfg nan": (["--cfg-scale", "nan"], "guidance scale must be a finite number"),
    "cfg inf": (["--cfg-scale", "inf"], "guidance scale must be a finite number"),
    "batch 0": (["--batch-size", "0"], "batch size"),
    "seed -1": (["--seed", "-1"], "seed must be"),
    "eta on euler": (["--eta", "0.5", "--sampler", "euler"], "eta"),
    "eta 1.5": (["--eta", "1.5", "--sampler", "ddim"], "eta"),
    "strength 2": (["--init-image", "INIT", "--strength", "2"], "strength must be in"),
    "strength 0": (["--init-image", "INIT", "--strength", "0"], "strength must be in"),
    "strength leaves no step": (["--init-image", "INIT", "--strength", "0.1", "--steps", "5"], "no step to run"),
    "no checkpoint": (["--ckpt", ""], "no checkpoint: pass --ckpt FILE or set \\$SD15_CKPT"),
    "missing checkpoint": (["--ckpt", "MISSING"], "does not exist"),
    "missing vae": (["--vae", "MISSING"], "VAE file .* does not exist"),
    "missing init image": (["--init-image", "MISSING"], "does not exist"),
    "init image not an image": (["--init-image", "TEXT"], "could not be read"),
    "existing out file": (["--out", "TAKEN"], "already exists"),
    "out is a file": (["--out", "TEXT"], "exists and is not a folder"),
    "out under a file": (["--out", "TEXT/sub"], "cannot create output folder"),   # ENOTDIR, even for root
    "out not png": (["--out", "picture.jpg"], "sd15 writes PNG files"),
    "demo with a vae": (["--demo", "--vae", "INIT"], "drop --vae"),
    "clip skip 0": (["--clip-skip", "0"], "clip_skip must be an integer from 1"),
    "missing embeddings dir": (["--embeddings-dir", "MISSING"], "folder .* \\(--embeddings-dir\\) does not exist"),
    "missing lora dir": (["--lora-dir", "MISSING"], "folder .* \\(--lora-dir\\) does not exist"),
    "missing lora file": (["--lora", "x.safetensors:0.5"], "LoRA file x.safetensors does not exist"),
    "unknown lora name": (["--lora", "nosuch:0.5"], "no LoRA named .nosuch."),
    "device unknown": (["--device", "banana"], "not a device torch knows"),
    "unknown schedule type": (["--schedule-type", "Polynomial"], "unknown schedule type 'Polynomial'; valid: "
                                                                 "Automatic, Uniform, Karras"),
    "schedule type a sampler lacks": (["--sampler", "DDIM", "--schedule-type", "Karras"],
                                      "sampler DDIM has no schedule type 'Karras' \\(it takes: Uniform\\)"),
    "schedule twice": (["--sampler", "Euler Karras", "--schedule-type", "Exponential"],
                       "already names the schedule type Karras"),
    "device absent": (["--device", "cuda:0" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"],
                      "CUDA is not available here|CUDA devices"),
}


@pytest.mark.parametrize("case", ARGUMENT_ERRORS)
def test_argument_errors_fail_before_loading(case, ckpt, init_png, tmp_path, no_model, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "taken.png").write_bytes(b"precious")
    names = {"INIT": init_png, "MISSING": tmp_path / "missing.file", "TEXT": tmp_path / "notes.txt",
             "TEXT/sub": tmp_path / "notes.txt" / "sub", "TAKEN": tmp_path / "taken.png"}
    args, message = ARGUMENT_ERRORS[case]
    argv = ["--prompt", "x", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"),
            *(str(names.get(a, a)) for a in args)]
    assert generate.main(argv) == generate.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert (tmp_path / "taken.png").read_bytes() == b"precious"


def test_help_mentions_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        generate.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    documented = {s for a in generate.build_parser()._actions for s in a.option_strings if s.startswith("--")}
    option_flags = {"--" + name.replace("_", "-") for name in generate.sampler_options()}   # one per sampler option
    assert documented == set(OPTIONS) | {"--help"} | option_flags
    for option in documented:
        assert re.search(rf"(^|\s|\[){re.escape(option)}\b", text), option
    assert all(name in " ".join(text.split()) for name in SAMPLERS)
    assert "SD15_CKPT" in text


@pytest.mark.parametrize("argv", [["--steps", "3"], ["--prompt", "x", "--steps", "many"],
                                  ["--prompt", "x", "--dtype", "float8"], ["--prompt", "x", "--bogus"]])
def test_argparse_errors_exit_2(argv, no_model, capsys):
    with pytest.raises(SystemExit) as exit_:
        generate.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


# ---- --compile -----------------------------------------------------------------------------------

def test_compile_flag_is_documented_and_parsed(capsys):
    parser = generate.build_parser()
    assert parser.parse_args(["--prompt", "x"]).compile is False
    assert parser.parse_args(["--prompt", "x", "--compile"]).compile is True
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    (action,) = [a for a in parser._actions if "--compile" in a.option_strings]
    assert "torch.compile" in action.help and " ".join(action.help.split()) in help_text


def test_compile_flag_compiles_the_unet(ckpt, tmp_path, capsys, caplog):
    """In-process, under torch.compiler.set_stance(force_backend="eager"): dynamo really captures the UNet
    the CLI runs (one whole graph), then runs that graph eagerly instead of through Inductor, so the
    --compile path runs end to end in seconds instead of a minute of C++ compiling."""
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.compiler.set_stance("default", force_backend="eager"), caplog.at_level(logging.WARNING, "sd15"):
            code = generate.main(["--ckpt", str(ckpt), "--prompt", "x", "--steps", "1", "--width", "32", "--height",
                                  "32", "--seed", "1", "--device", "cpu", "--compile", "--quiet",
                                  "--out", str(tmp_path / "c.png")])
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
        counters.clear()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert graphs == 1
    assert out.splitlines() == [str(tmp_path / "c.png")] and Image.open(tmp_path / "c.png").size == (32, 32)
    assert any("--compile on CPU" in r.getMessage() for r in caplog.records if r.name == "sd15")


def test_compile_failure_is_a_clean_error(ckpt, tmp_path):
    """No working C++ compiler (Inductor's CPU backend needs one): one error line, exit 2, no image.
    A fresh Inductor cache, so nothing compiled earlier can stand in for the compiler."""
    env = cli_env(CXX=str(tmp_path / "no-such-g++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    result = cli("--ckpt", ckpt, "--prompt", "x", "--steps", "1", "--width", "32", "--height", "32",
                 "--device", "cpu", "--compile", "--quiet", "--out", tmp_path / "c.png", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--compile failed" in errors[0] and "C++ compiler" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "c.png").exists()


# ---- transparent huge pages ------------------------------------------------------------------------

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Asks for huge pages as the CLI does (or only imports sd15), fills a fresh 256 MiB tensor, then prints
# THP_MEM_ALLOC_ENABLE, the call's answer and the AnonHugePages (kB) of the tensor's mapping in /proc/self/smaps.
HUGE_PAGES_PROBE = """
import os, sys
import sd15, sd15.process
flag = sd15.process.use_huge_pages() if sys.argv[1] == "ask" else "not-asked"
import torch
t = torch.empty(256 << 20, dtype=torch.uint8)
t.fill_(1)
ptr, inside = t.data_ptr(), False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if not head.endswith(":"):                                  # a mapping's first line: lo-hi perms ...
        lo, hi = (int(v, 16) for v in head.split("-"))
        inside = lo <= ptr < hi
    elif inside and head == "AnonHugePages:":
        print(os.environ.get("THP_MEM_ALLOC_ENABLE"), flag, line.split()[1])
        break
"""


def thp_mode() -> str | None:
    """The kernel's THP mode: always, madvise or never (None where the kernel has no THP)."""
    match = re.search(r"\[(\w+)\]", THP_MODE.read_text()) if THP_MODE.exists() else None
    return match.group(1) if match else None


def huge_pages_probe(mode="ask", **env) -> tuple[str, str, int]:
    base = {k: v for k, v in cli_env().items() if k != "THP_MEM_ALLOC_ENABLE"}
    result = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE, mode], env=base | env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    setting, flag, kb = result.stdout.split()
    return setting, flag, int(kb)


@pytest.mark.skipif(thp_mode() in (None, "never"), reason=f"transparent huge pages are off or absent ({THP_MODE})")
def test_use_huge_pages_backs_large_tensors_with_huge_pages():
    setting, flag, kb = huge_pages_probe()
    assert (setting, flag) == ("None", "True")        # read by torch, then removed: the user's child processes do not inherit it
    assert kb >= 128 << 10          # measured 254 of the 256 MiB; half leaves room for a fragmented host


@pytest.mark.skipif(thp_mode() != "madvise",
                    reason="only in THP's madvise mode does memory torch does not madvise stay in 4 KiB pages")
def test_thp_mem_alloc_enable_0_is_respected():
    assert huge_pages_probe(THP_MEM_ALLOC_ENABLE="0") == ("0", "False", 0)


@pytest.mark.skipif(thp_mode() != "madvise",
                    reason="only in THP's madvise mode does memory torch does not madvise stay in 4 KiB pages")
def test_import_sd15_changes_nothing_in_the_process():
    """`import sd15` alone neither imports torch nor changes its allocator (the user's process is theirs)."""
    assert huge_pages_probe("import-only") == ("None", "not-asked", 0)
    result = subprocess.run([sys.executable, "-c", "import sys, sd15; print('torch' in sys.modules)"],
                            env=cli_env(), capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


# ---- --from-png: regenerate from an infotext ------------------------------------------------------

def run_in_process(argv, capsys) -> tuple[int, str, str]:
    code = generate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


SMALL_RUN = ["--steps", 3, "--width", 32, "--height", 32, "--quiet", "--device", "cpu"]


@pytest.mark.usefixtures("one_thread")
def test_from_png_regenerates_the_same_image_and_takes_overrides(ckpt, tmp_path, capsys, caplog):
    first = tmp_path / "first.png"
    code, _, err = run_in_process(["--ckpt", ckpt, "--prompt", "a lighthouse, at: dusk", "--negative-prompt", "fog",
                                   "--sampler", "ddim", "--eta", 0.5, "--cfg-scale", 6, "--seed", 77, *SMALL_RUN,
                                   "--out", first], capsys)
    assert code == 0, err
    again = tmp_path / "again.png"
    code, out, err = run_in_process(["--ckpt", ckpt, "--from-png", first, "--quiet", "--out", again], capsys)
    assert code == 0, err
    assert out.splitlines() == [str(again)] and "seed: 77" in err
    assert read_parameters(again) == read_parameters(first)                    # every setting came back
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))   # and the image

    changed = tmp_path / "changed.png"
    code, _, err = run_in_process(["--ckpt", ckpt, "--from-png", first, "--steps", 4, "--quiet", "--out", changed],
                                  capsys)
    assert code == 0, err
    prompt, negative, fields = parse_parameters(read_parameters(changed))
    _, _, original = parse_parameters(read_parameters(first))
    assert (prompt, negative) == ("a lighthouse, at: dusk", "fog")
    assert fields == original | {"Steps": "4"} and original["Eta DDIM"] == "0.5"


A1111_TEXT = ("masterpiece, (a red fox:1.2) in snow\n"
              "Negative prompt: lowres, bad hands\n"
              "Steps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 32x40, "
              "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Hires upscale: 2, ENSD: 31337, "
              "Face restoration: CodeFormer, "
              'Lora hashes: "add_detail: 7c6bd4a8f1a2", Version: v1.10.1')


def a1111_png(path: Path, text: str = A1111_TEXT, batch_pos: int | None = None) -> Path:
    """A PNG as A1111 writes it: any image with the infotext in its `parameters` text chunk."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (32, 40), (90, 120, 200)).save(path, pnginfo=info)
    return path


@pytest.mark.usefixtures("one_thread")
def test_from_png_of_an_a1111_image_names_what_it_does_not_apply(ckpt, tmp_path, capsys, caplog):
    out = tmp_path / "fox.png"
    with caplog.at_level(logging.WARNING, "sd15"):
        code, stdout, err = run_in_process(["--ckpt", ckpt, "--from-png", a1111_png(tmp_path / "a1111.png"),
                                            "--device", "cpu", "--quiet", "--out", out], capsys)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.name == "sd15"]
    (unsupported,) = [w for w in warnings if "not applied" in w]
    for field in ("Face restoration: CodeFormer",):
        assert field in unsupported, unsupported
    assert "Hires upscale" not in unsupported         # applied: a hires pass, 2x, Latent (A1111's default)
    assert "Clip skip" not in unsupported                                      # that one is applied
    assert "Lora hashes" not in unsupported          # read: checked against the LoRA folders when a tag names one
    assert "ENSD" not in unsupported                 # applied: A1111's seeds, their noise seed delta
    assert "Version" not in unsupported and "Model" not in unsupported
    (model,) = [w for w in warnings if "made with model" in w]                   # another model made it
    assert "v1-5-pruned-emaonly [6ce0161689]" in model and "tiny-model_v1" in model
    prompt, negative, fields = parse_parameters(read_parameters(out))
    assert (prompt, negative) == ("masterpiece, (a red fox:1.2) in snow", "lowres, bad hands")
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"], fields["Seed"], fields["Size"]) == (
        "3", "Euler a", "7.0", "1234", "32x40")
    assert fields["Clip skip"] == "2"
    assert (fields["Seed mode"], fields["ENSD"]) == ("a1111", "31337")
    assert (fields["Hires upscale"], fields["Hires upscaler"], fields["Denoising strength"]) == ("2", "Latent", "0.7")
    assert Image.open(out).size == (64, 80)


def test_from_png_errors(ckpt, tmp_path, capsys, no_model):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    cases = {"no parameters": (plain, "carries no A1111 'parameters' text"),
             "missing": (tmp_path / "nope.png", "does not exist"),
             "unknown sampler": (a1111_png(tmp_path / "sde.png", A1111_TEXT.replace("Euler a", "DPM adaptive")),
                                 "the infotext's sampler \\(DPM adaptive\\) is not one sd15 has; choose one with "
                                 "--sampler")}
    for name, (png, message) in cases.items():
        code, out, err = run_in_process(["--ckpt", ckpt, "--from-png", png, "--out", tmp_path / "o"], capsys)
        assert code == generate.EXIT_USAGE and out == "" and re.search(message, err), (name, err)
    # an override makes the unknown sampler moot
    parser_args = generate.build_parser().parse_args(["--from-png", str(tmp_path / "sde.png"), "--sampler", "euler"])
    request, back = generate.build_request(parser_args)
    assert request.sampler == "euler" and back.request.seed == 1234


@pytest.mark.usefixtures("one_thread")
def test_from_png_warns_about_a_text_without_settings(ckpt, tmp_path, capsys, caplog):
    png = a1111_png(tmp_path / "prompt-only.png", "just a prompt, with: no settings line")
    with caplog.at_level(logging.WARNING, "sd15"):
        code, _, err = run_in_process(["--ckpt", ckpt, "--from-png", png, *SMALL_RUN, "--out", tmp_path / "o.png"],
                                      capsys)
    assert code == 0, err
    assert any("no settings line" in r.getMessage() for r in caplog.records)
    prompt, _, fields = parse_parameters(read_parameters(tmp_path / "o.png"))
    assert prompt == "just a prompt, with: no settings line" and fields["Sampler"] == "DPM++ 2M"


def test_the_demo_checkpoint_is_the_same_file_every_time(tmp_path):
    """Its sha256 is the demo images' Model hash: one write must not differ from the next."""
    from sd15.models.demo import write_demo_checkpoint
    first, second = (write_demo_checkpoint(tmp_path / f"{i}.safetensors").read_bytes() for i in (1, 2))
    assert first == second


# ---- the prompt language on the command line ------------------------------------------------------

@pytest.mark.usefixtures("one_thread")
def test_clip_skip_plain_prompt_and_embeddings(ckpt, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              str(folder / "tinystyle.safetensors"))
    monkeypatch.setenv("SD15_EMBEDDINGS", str(folder))
    runs = {}
    for name, extra in {"plain": [], "skip2": ["--clip-skip", 2], "literal": ["--plain-prompt"]}.items():
        out = tmp_path / f"{name}.png"
        code, _, err = run_in_process(["--ckpt", ckpt, "--prompt", "a (fox:1.3), tinystyle", "--seed", 3,
                                       *SMALL_RUN, *extra, "--out", out], capsys)
        assert code == 0, err
        runs[name] = (np.asarray(Image.open(out)), parse_parameters(read_parameters(out))[2])
    digest = hashlib.sha256((folder / "tinystyle.safetensors").read_bytes()).hexdigest()[:12]
    assert runs["plain"][1]["TI hashes"] == f"tinystyle: {digest}"                  # found via $SD15_EMBEDDINGS
    assert "Clip skip" not in runs["plain"][1] and runs["skip2"][1]["Clip skip"] == "2"
    assert runs["literal"][1]["Emphasis"] == "None"
    assert not np.array_equal(runs["plain"][0], runs["skip2"][0])
    assert not np.array_equal(runs["plain"][0], runs["literal"][0])


def test_the_prompt_tool(capsys):
    from sd15.cli.prompt import main as prompt_main
    assert prompt_main(["a (red:1.5) car [old:new:3] BREAK x <lora:a:1>", "--steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "tags (removed): <lora:a:1>" in out and "steps up to 3:" in out and "'red' x1.5" in out
    assert "chunk 1: 1/75 tokens" in out
    assert prompt_main(["x", "--embeddings-dir", "/no/such/dir"]) == 2


def kohya_lora(path: Path, seed: int) -> Path:
    """A kohya-named LoRA on one attention projection of the tiny model's UNet and one of its text encoder."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, 32, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(32, 4, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    return path


@pytest.mark.usefixtures("one_thread")
def test_lora_by_tag_and_by_file_and_from_png_of_a_changed_lora(ckpt, tmp_path, capsys, caplog):
    """<lora:NAME:W> found in --lora-dir, --lora FILE:W the same thing by path; --from-png of the image when the
    folder's LoRA of that name has since changed says so (A1111's `Lora hashes` field)."""
    loras = tmp_path / "loras"
    loras.mkdir()
    kohya_lora(loras / "ink.safetensors", 0)
    plain, tagged, by_file = tmp_path / "plain.png", tmp_path / "tagged.png", tmp_path / "file.png"
    for out, extra in ((plain, ["--prompt", "a fox"]),
                       (tagged, ["--prompt", "a fox <lora:ink:0.7>", "--lora-dir", loras]),
                       (by_file, ["--prompt", "a fox", "--lora", f"{loras / 'ink.safetensors'}:0.7"])):
        code, _, err = run_in_process(["--ckpt", ckpt, *SMALL_RUN, "--seed", 5, "--out", out, *extra], capsys)
        assert code == 0, err
    pixels = {p: np.asarray(Image.open(p)) for p in (plain, tagged, by_file)}
    assert not np.array_equal(pixels[plain], pixels[tagged])
    assert np.array_equal(pixels[tagged], pixels[by_file])
    _, _, fields = parse_parameters(read_parameters(tagged))
    assert re.fullmatch(r"ink: [0-9a-f]{12}", fields["Lora hashes"].strip('"')), fields["Lora hashes"]

    again = tmp_path / "again.png"
    code, _, err = run_in_process(["--ckpt", ckpt, "--from-png", tagged, "--lora-dir", loras, "--quiet",
                                   "--device", "cpu", "--out", again], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(again)), pixels[tagged])        # same LoRA, same picture

    kohya_lora(loras / "ink.safetensors", 1)                                     # the file changes under its name
    with caplog.at_level(logging.WARNING, "sd15"):
        code, _, err = run_in_process(["--ckpt", ckpt, "--from-png", tagged, "--lora-dir", loras, "--quiet",
                                       "--device", "cpu", "--out", tmp_path / "changed.png"], capsys)
    assert code == 0, err
    (changed,) = [r.getMessage() for r in caplog.records if "used the LoRA" in r.getMessage()]
    assert changed.startswith(f"the PNG used the LoRA ink [{fields['Lora hashes'].strip(chr(34))[5:]}]"), changed


def test_list_samplers_needs_no_prompt_and_names_every_sampler(capsys, no_model):
    assert generate.main(["--list-samplers"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line for line in out.splitlines()[1:] if line and not line.startswith(("schedule", "a name"))}
    assert set(rows) == set(SAMPLERS)
    for name, spec in SAMPLERS.items():
        assert spec.label in rows[name]
    assert re.search(r"^dpmpp_2m\s+DPM\+\+ 2M\s+Karras\s+all\s+N\s+yes$", rows["dpmpp_2m"]), rows["dpmpp_2m"]
    assert re.search(r"^ddim\s+DDIM\s+Uniform\s+Uniform\s+N\s+yes$", rows["ddim"]), rows["ddim"]
    assert "Align Your Steps (align_your_steps)" in out


@pytest.mark.usefixtures("one_thread")
def test_schedule_type_with_and_without_a_sampler(ckpt, tmp_path, capsys):
    runs = {"split": ["--sampler", "Euler a", "--schedule-type", "Karras"], "joined": ["--sampler", "euler_a_karras"],
            "default sampler": ["--schedule-type", "Exponential"]}
    images = {}
    for case, extra in runs.items():
        out = tmp_path / f"{case}.png"
        code, _, err = run_in_process(["--ckpt", ckpt, *SMALL_RUN, "--seed", 2, "--prompt", "x", "--out", out, *extra],
                                      capsys)
        assert code == 0, err
        _, _, fields = parse_parameters(read_parameters(out))
        images[case] = (np.asarray(Image.open(out)), fields["Sampler"], fields["Schedule type"])
    assert images["split"][1:] == images["joined"][1:] == ("Euler a", "Karras")
    assert np.array_equal(images["split"][0], images["joined"][0])
    assert images["default sampler"][1:] == ("DPM++ 2M", "Exponential")
    again = tmp_path / "again.png"                      # --from-png of a Karras image, re-run on Uniform
    code, _, err = run_in_process(["--ckpt", ckpt, "--from-png", tmp_path / "split.png", "--schedule-type", "Uniform",
                                   "--quiet", "--device", "cpu", "--out", again], capsys)
    assert code == 0, err
    _, _, fields = parse_parameters(read_parameters(again))
    assert (fields["Sampler"], fields["Schedule type"]) == ("Euler a", "Automatic")
    assert not np.array_equal(np.asarray(Image.open(again)), images["split"][0])


@pytest.mark.usefixtures("one_thread")
def test_hires_options_and_from_png_overrides(ckpt, tmp_path, capsys):
    out = tmp_path / "hr.png"
    code, _, err = run_in_process(["--ckpt", ckpt, *SMALL_RUN, "--seed", 3, "--prompt", "a fox", "--out", out,
                                   "--hr-resize", "64x0", "--hr-steps", 2, "--hr-upscaler", "lanczos",
                                   "--hr-denoising-strength", 0.55, "--hr-sampler", "Euler a"], capsys)
    assert code == 0, err
    _, _, fields = parse_parameters(read_parameters(out))
    assert Image.open(out).size == (64, 64)
    assert (fields["Size"], fields["Hires resize"], fields["Hires steps"], fields["Hires upscaler"],
            fields["Denoising strength"], fields["Hires sampler"]) == ("32x32", "64x0", "2", "Lanczos", "0.55", "Euler a")
    again = tmp_path / "again.png"
    code, _, err = run_in_process(["--ckpt", ckpt, "--from-png", out, "--quiet", "--device", "cpu", "--out", again],
                                  capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))     # the same two passes
    bigger = tmp_path / "bigger.png"
    code, _, err = run_in_process(["--ckpt", ckpt, "--from-png", out, "--hr-resize", "96x0", "--quiet", "--device",
                                   "cpu", "--out", bigger], capsys)
    assert code == 0, err
    assert Image.open(bigger).size == (96, 96)
    code, _, err = run_in_process(["--ckpt", ckpt, *SMALL_RUN, "--prompt", "x", "--hr-upscaler", "ESRGAN",
                                   "--out", tmp_path / "bad.png"], capsys)
    assert code == 2 and "unknown hires upscaler 'ESRGAN'" in err
