"""The A1111 API as a client no one here wrote (`webuiapi` 0.9.17) drives it, against the real server on
127.0.0.1 serving tiny random checkpoints: txt2img, img2img with a mask, the model list and switching
(and a switch that fails), options, samplers and schedulers, png-info, the list endpoints, progress
while a job runs, interrupt and skip."""

import base64
import hashlib
import io
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
webuiapi = pytest.importorskip("webuiapi")
import requests  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import sd15  # noqa: E402
from sd15.models.demo import write_demo_checkpoint  # noqa: E402
from server_harness import running_server  # noqa: E402

SMALL = {"width": 64, "height": 64, "steps": 4}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    models = root / "models"
    (models / "sub").mkdir(parents=True)
    a = write_demo_checkpoint(models / "demo-a.safetensors", seed=0)
    b = write_demo_checkpoint(models / "sub" / "demo-b.safetensors", seed=1)
    (models / "broken.safetensors").write_bytes(b"\x00" * 64)          # listed, but will not load
    loras = root / "loras"
    loras.mkdir()
    (loras / "detail.safetensors").write_bytes(b"not parsed by the listing")
    embeddings = root / "embeddings"
    embeddings.mkdir()
    import torch
    save_file({"emb_params": torch.randn(3, 32)}, str(embeddings / "goodemb.safetensors"))     # the tiny width
    save_file({"emb_params": torch.randn(2, 768)}, str(embeddings / "wide.safetensors"))       # SD 1.5's: skipped
    return {"root": root, "models": models, "a": a, "b": b, "loras": loras, "embeddings": embeddings}


@pytest.fixture(scope="module")
def server(folders):
    with running_server(folders["a"], models_dir=folders["models"], lora_dirs=[folders["loras"]],
                        embedding_dirs=[folders["embeddings"]]) as srv:
        yield srv


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


@pytest.fixture(scope="module")
def local_a(folders):
    """The same checkpoint through the Python API, to compare pixels with."""
    return sd15.load(folders["a"])


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_txt2img_batches_seeds_and_infotexts(api, folders, local_a):
    result = api.txt2img(prompt="a lighthouse", negative_prompt="fog", seed=123, batch_size=2, n_iter=2,
                         sampler_name="Euler a", cfg_scale=7, **SMALL)
    info = result.info
    assert len(result.images) == 4 and all(img.size == (64, 64) for img in result.images)
    assert info["all_seeds"] == [123, 124, 125, 126]           # A1111: image i of the job has seed + i
    assert info["all_prompts"] == ["a lighthouse"] * 4 and info["negative_prompt"] == "fog"
    assert info["sampler_name"] == "Euler a" and info["steps"] == 4 and info["cfg_scale"] == 7
    assert info["batch_size"] == 2 and info["n_iter"] == 2
    assert info["sd_model_hash"] == sha256(folders["a"])[:10] and info["sd_model_name"] == "demo-a"
    for image, text in zip(result.images, info["infotexts"]):
        assert image.info["parameters"] == text                 # the PNG chunk is the infotext
    assert "Seed: 125" in info["infotexts"][2] and "Negative prompt: fog" in info["infotexts"][2]
    assert result.parameters["prompt"] == "a lighthouse" and result.parameters["n_iter"] == 2
    # the second batch is what the Python API draws for seed 125 in A1111's seed mode
    req = sd15.Request("a lighthouse", negative_prompt="fog", seed=125, batch_size=2, sampler="Euler a",
                       guidance_scale=7, seed_mode="a1111", width=64, height=64, steps=4)
    expected = local_a.generate(req)
    for got, want in zip(result.images[2:], expected):
        assert np.array_equal(pixels(got), pixels(want))
    assert not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))


def test_defaults_are_a1111s(server):
    """A body with only a prompt runs as A1111's API would: Euler, 50 steps, CFG 7, 512x512 (here 64x64)."""
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64,
                                                             "unknown_key": {"ignored": True}})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["sampler_name"], info["steps"], info["cfg_scale"], info["seed"] >= 0) == ("Euler", 50, 7.0, True)
    assert r.json()["parameters"]["seed"] == -1                 # the echo is the request; info has the seed run


def test_a_prompt_per_image_and_what_is_ignored(server):
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={
        "prompt": ["a red door", "a blue door", "a green door", "a grey door"], "batch_size": 2, "n_iter": 2,
        "seed": 7, "restore_faces": True, "eta": 0.5, "alwayson_scripts": {"ControlNet": {"args": []}, "ADetailer": {"args": []}},
        **SMALL})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_prompts"] == ["a red door", "a blue door", "a green door", "a grey door"]
    assert [t.split("\n")[0] for t in info["infotexts"]] == info["all_prompts"] and info["all_seeds"] == [7, 8, 9, 10]
    # Euler (the default) has no eta; sd15 does not restore faces or run ADetailer: all named (an empty
    # ControlNet entry, which webuiapi sends, is no unit: nothing to name)
    assert set(info["ignored"]) == {"restore_faces", "eta", "alwayson_scripts.ADetailer"}


def test_img2img_with_a_mask_keeps_the_unmasked_pixels(api):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (48, 96, 3), dtype=np.uint8))      # resized to 64x64 (mode 0)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 24, 64))                                                # repaint the left part
    result = api.img2img(images=[init], mask_image=mask, prompt="a door", denoising_strength=0.5, seed=5,
                         inpaint_full_res=False, mask_blur=2, **SMALL)
    out = pixels(result.image)
    resized = pixels(init.resize((64, 64), resample=Image.LANCZOS))
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out[:, 40:], resized[:, 40:])         # well outside the blurred mask: the original
    assert not np.array_equal(out[:, :16], resized[:, :16])     # inside: repainted
    assert result.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in result.info["infotexts"][0] and "Mask blur: 2" in result.info["infotexts"][0]
    assert result.parameters["init_images"] is None and result.parameters["mask"] is None


def test_img2img_crop_and_resize(api):
    init = Image.new("RGB", (128, 64), (200, 30, 30))
    result = api.img2img(images=[init], prompt="red", resize_mode=1, width=64, height=64, denoising_strength=0.3,
                         seed=1, steps=4)
    assert result.image.size == (64, 64)


def test_model_list_titles_and_switching(api, folders, server):
    ha, hb = sha256(folders["a"])[:10], sha256(folders["b"])[:10]
    deadline = time.time() + 10                                 # the other files are hashed in the background
    while any(m["hash"] is None for m in api.get_sd_models()) and time.time() < deadline:
        time.sleep(0.05)
    models = {m["filename"]: m for m in api.get_sd_models()}
    assert set(models) == {"demo-a.safetensors", "sub/demo-b.safetensors", "broken.safetensors"}
    assert models["sub/demo-b.safetensors"]["title"] == f"sub/demo-b.safetensors [{hb}]"
    assert models["sub/demo-b.safetensors"]["model_name"] == "sub_demo-b"
    assert models["sub/demo-b.safetensors"]["sha256"] == sha256(folders["b"])
    assert str(folders["root"]) not in json.dumps(list(models.values()))        # no absolute path anywhere
    assert api.util_get_current_model() == f"demo-a.safetensors [{ha}]"

    before = api.txt2img(prompt="same", seed=9, **SMALL)
    api.util_set_model(f"sub/demo-b.safetensors [{hb}]")
    assert api.util_get_current_model() == f"sub/demo-b.safetensors [{hb}]"
    after = api.txt2img(prompt="same", seed=9, **SMALL)
    assert after.info["sd_model_hash"] == hb and after.info["sd_model_name"] == "demo-b"
    assert not np.array_equal(pixels(before.image), pixels(after.image))
    api.util_set_model(f"demo-a.safetensors [{ha}]")
    again = api.txt2img(prompt="same", seed=9, **SMALL)
    assert np.array_equal(pixels(before.image), pixels(again.image))


def test_the_last_switch_asked_for_wins_even_while_one_is_queued(api, server, folders):
    """A switch to B waits behind a running job; a later switch back to the loaded A must queue behind
    it (not answer at once and leave B loaded)."""
    ha, hb = sha256(folders["a"])[:10], sha256(folders["b"])[:10]
    api.util_set_model(f"demo-a.safetensors [{ha}]")
    url = server.url + "/sdapi/v1/"
    answers = {}

    def call(name, route, body):
        answers[name] = requests.post(url + route, json=body, timeout=60).status_code

    def waiting_reaches(n):
        deadline = time.time() + 10
        while server.state.jobs.waiting() < n and time.time() < deadline:
            time.sleep(0.02)

    threads = [threading.Thread(target=call, args=("long", "txt2img", SMALL | {"prompt": "l", "steps": 1000}))]
    threads[0].start()
    _poll(api, lambda p: p["state"]["sampling_step"] >= 1)
    for name, title in (("to b", f"sub/demo-b.safetensors [{hb}]"), ("back to a", f"demo-a.safetensors [{ha}]")):
        threads.append(threading.Thread(target=call, args=(name, "options", {"sd_model_checkpoint": title})))
        threads[-1].start()
        waiting_reaches(len(threads) - 1)
    api.interrupt()
    for t in threads:
        t.join(60)
    assert answers == {"long": 409, "to b": 200, "back to a": 200}
    assert api.util_get_current_model() == f"demo-a.safetensors [{ha}]"


def test_a_failed_switch_keeps_the_old_model(api, server, folders):
    current = api.util_get_current_model()
    r = requests.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "broken.safetensors"})
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error", "detail", "body", "errors"}
    assert "cannot load broken.safetensors" in body["detail"] and f"still serving {current}" in body["detail"]
    assert str(folders["root"]) not in r.text
    assert api.util_get_current_model() == current
    assert api.txt2img(prompt="fine", seed=1, **SMALL).info["sd_model_hash"] == sha256(folders["a"])[:10]


def test_options_accept_the_whole_dict_back_and_apply_clip_skip(api, server):
    options = api.get_options()
    assert options["sd_model_checkpoint"] == api.util_get_current_model()
    r = requests.post(server.url + "/sdapi/v1/options",
                      json=options | {"CLIP_stop_at_last_layers": 2, "some_ui_setting": [1, 2], "sd_vae": "x"})
    assert r.status_code == 200 and r.json() is None
    try:
        result = api.txt2img(prompt="skip", seed=3, **SMALL)
        assert result.info["clip_skip"] == 2 and "Clip skip: 2" in result.info["infotexts"][0]
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    bad = requests.post(server.url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 40})
    assert bad.status_code == 422 and "clip_skip" in bad.json()["detail"]
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1


def test_every_listed_sampler_and_scheduler_runs(api, server):
    names = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "DPM++ SDE", "UniPC"} <= set(names)
    for name in names:
        result = api.txt2img(prompt="s", sampler_name=name, seed=2, width=64, height=64, steps=3)
        assert result.info["sampler_name"] == name
    schedulers = api.get_schedulers()
    assert schedulers[0]["name"] == "automatic" and {"karras", "exponential"} <= {s["name"] for s in schedulers}
    for s in schedulers:
        result = api.txt2img(prompt="s", sampler_name="Euler", scheduler=s["name"], seed=2, width=64, height=64,
                             steps=3)
        expected = "Automatic" if s["name"] in ("automatic", "uniform") else s["label"]
        assert f"Schedule type: {expected}" in result.info["infotexts"][0]
    # DDIM walks its own timesteps: A1111 ignores a schedule type for it, and so do we
    ddim = api.txt2img(prompt="s", sampler_name="DDIM", scheduler="karras", seed=2, width=64, height=64, steps=3)
    assert ddim.info["sampler_name"] == "DDIM"


def test_png_info_reads_back_the_infotext(api):
    made = api.txt2img(prompt="a quiet harbour, dusk", seed=77, **SMALL)
    back = api.png_info(made.image)
    assert back.info == made.info["infotexts"][0]
    params = back.json["parameters"]
    assert params["Prompt"] == "a quiet harbour, dusk" and params["Seed"] == "77" and params["Steps"] == "4"
    assert (params["Size-1"], params["Size-2"]) == ("64", "64")


def test_list_endpoints_answer_with_lists(api, server):
    for name in ("upscalers", "latent-upscale-modes", "sd-vae", "hypernetworks", "face-restorers",
                 "realesrgan-models", "prompt-styles", "script-info", "extensions"):
        r = requests.get(f"{server.url}/sdapi/v1/{name}")
        assert r.status_code == 200 and isinstance(r.json(), list), name
    assert {"Latent", "Latent (bicubic)"} <= {m["name"] for m in api.get_latent_upscale_modes()}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.get_loras() == [{"name": "detail", "alias": "detail", "path": "detail.safetensors", "metadata": {}}]
    embeddings = api.get_embeddings()
    assert embeddings["loaded"] == {"goodemb": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                "shape": 32, "vectors": 3}}
    assert list(embeddings["skipped"]) == ["wide"] and "768" in embeddings["skipped"]["wide"]["why"]
    assert str(server.state.loader.embedding_dirs[0]) not in json.dumps(embeddings)
    memory = api.get_memory()
    assert memory["ram"]["total"] > 0 and "cuda" in memory
    assert requests.get(f"{server.url}/sdapi/v1/cmd-flags").status_code == 404     # A1111's leaks secrets


def _poll(api, until, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = api.get_progress()
        if until(p):
            return p
        time.sleep(0.05)
    raise AssertionError(f"progress never reached the state wanted; last: {p}")


def test_progress_while_running_then_interrupt(api, server):
    outcome = {}

    def long_job():
        try:
            outcome["result"] = api.txt2img(prompt="long", seed=4, width=64, height=64, steps=1000)
        except RuntimeError as e:
            outcome["error"] = e.args

    thread = threading.Thread(target=long_job)
    thread.start()
    p = _poll(api, lambda p: p["state"]["sampling_step"] >= 2)
    assert 0 < p["progress"] < 1 and p["eta_relative"] > 0
    assert p["state"]["job_count"] == 1 and p["state"]["sampling_steps"] == 1000
    preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
    assert preview.size == (8, 8)                               # A1111's cheap preview: one pixel per latent
    started = time.time()
    assert api.interrupt() == {}
    thread.join(20)
    assert time.time() - started < 5 and not thread.is_alive()
    status, text = outcome["error"]
    assert status == 409 and "interrupted" in json.loads(text)["detail"]
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert len(api.txt2img(prompt="after", seed=1, **SMALL).images) == 1            # healthy


def test_interrupt_between_batches_returns_the_finished_ones(api):
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault(
        "r", api.txt2img(prompt="batches", seed=20, n_iter=3, width=64, height=64, steps=80)))
    thread.start()
    _poll(api, lambda p: p["state"]["job_no"] == 1 and p["state"]["sampling_step"] >= 1)
    api.interrupt()
    thread.join(30)
    result = outcome["r"]
    assert len(result.images) == 1 and result.info["interrupted"] is True
    assert result.info["all_seeds"] == [20]


def test_skip_drops_only_the_current_batch(api, server):
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault(
        "r", api.txt2img(prompt="skip", seed=30, n_iter=2, width=64, height=64, steps=80)))
    thread.start()
    _poll(api, lambda p: p["state"]["job_no"] == 0 and p["state"]["sampling_step"] >= 1)
    assert requests.post(server.url + "/sdapi/v1/skip").status_code == 200
    thread.join(30)
    assert outcome["r"].info["all_seeds"] == [31] and outcome["r"].info["interrupted"] is False
