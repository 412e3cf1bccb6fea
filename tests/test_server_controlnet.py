"""ControlNet over the A1111 API: webuiapi's own `ControlNetUnit`s sent to a real server on 127.0.0.1 (the
tiny demo checkpoint, tiny random ControlNet files in a --controlnet-dir), the images compared pixel for
pixel with the same Controls run through the Python API, the extension's list routes, and the bad units
(unknown model or module, a path out of the folder, a non-object unit) as 422s in A1111's error shape."""

import base64
import hashlib
import io

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

import sd15
from sd15.models.demo import write_demo_checkpoint, write_demo_controlnet
from server_harness import running_server

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = dict(prompt="a house", negative_prompt="fog", seed=11, steps=3, width=64, height=64, cfg_scale=7.0,
                sampler_name="Euler")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-cn")
    ckpt = write_demo_checkpoint(root / "demo.safetensors")
    cns = root / "controlnets"
    (cns / "sub").mkdir(parents=True)
    canny = write_demo_controlnet(cns / "control_tiny_canny.safetensors", seed=1)
    depth = write_demo_controlnet(cns / "sub" / "control_tiny_depth.safetensors", seed=2)
    outside = write_demo_controlnet(root / "secret_control.safetensors", seed=3)
    (cns / "escape.safetensors").symlink_to(outside)          # a link out of the folder: never served
    rng = np.random.default_rng(0)
    image = Image.fromarray(np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)))
    return {"ckpt": ckpt, "cns": cns, "canny": canny, "depth": depth, "image": image}


@pytest.fixture(scope="module")
def server(folders):
    with running_server(folders["ckpt"], controlnet_dir=folders["cns"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def local(folders):
    return sd15.load(folders["ckpt"], device="cpu")


def a1111_short_hash(path) -> str:
    return hashlib.sha256(path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]


def test_lists(server, folders):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    titles = api.controlnet_model_list()
    assert titles == [f"control_tiny_canny [{a1111_short_hash(folders['canny'])}]",
                      f"control_tiny_depth [{a1111_short_hash(folders['depth'])}]"]      # no escape.safetensors
    assert {"none", "canny", "invert"} <= set(api.controlnet_module_list())
    assert api.controlnet_version() == 2
    assert api.has_controlnet is False           # it looks for "controlnet m2m", A1111's other script
    assert "controlnet" in api.get_scripts()["txt2img"]


def test_units_equal_the_python_api(server, folders, local):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    units = [webuiapi.ControlNetUnit(image=folders["image"], module="canny", model="control_tiny_canny",
                                     weight=0.8, threshold_a=50, threshold_b=150, guidance_end=0.7, control_mode=1,
                                     pixel_perfect=True),
             webuiapi.ControlNetUnit(image=folders["image"], model=api.controlnet_model_list()[1], weight=0.5)]
    # a fresh alwayson_scripts: webuiapi writes the units into its shared default dict, which every later
    # call in this process would send again
    result = api.txt2img(**SETTINGS, controlnet_units=units, alwayson_scripts={})
    assert "ignored" not in result.info or not any("ControlNet" in x for x in result.info["ignored"])
    canny = sd15.load_controlnet(folders["canny"], local)
    depth = sd15.load_controlnet(folders["depth"], local)
    controls = [sd15.Control(canny, folders["image"], strength=0.8, end=0.7, mode="prompt", preprocess="canny",
                             params={"low": 50, "high": 150}),
                # webuiapi's default resize mode is "Resize and Fill"
                sd15.Control(depth, folders["image"], strength=0.5, resize_mode="Resize and Fill")]
    request = sd15.Request("a house", negative_prompt="fog", seed=11, steps=3, width=64, height=64,
                           guidance_scale=7.0, sampler="Euler", seed_mode="a1111", control=controls)
    want = local.generate(request)[0]
    plain = local.generate(sd15.Request("a house", negative_prompt="fog", seed=11, steps=3, width=64, height=64,
                                        guidance_scale=7.0, sampler="Euler", seed_mode="a1111"))[0]
    got = np.asarray(result.image.convert("RGB"))
    assert np.array_equal(got, np.asarray(want))
    assert not np.array_equal(got, np.asarray(plain))
    text = result.info["infotexts"][0]
    assert (f'ControlNet 0: "Module: canny, Model: control_tiny_canny [{a1111_short_hash(folders["canny"])}], '
            'Weight: 0.8, Resize Mode: Resize and Fill, Threshold A: 50, Threshold B: 150, Guidance Start: 0, '
            'Guidance End: 0.7, Pixel Perfect: True, Control Mode: My prompt is more important"') in text, text
    assert "ControlNet 1:" in text


def test_img2img_unit_without_image_uses_the_init_image(server, folders, local):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    unit = webuiapi.ControlNetUnit(model="control_tiny_canny", resize_mode="Just Resize")
    result = api.img2img(images=[folders["image"]], denoising_strength=0.6, **SETTINGS, controlnet_units=[unit],
                         alwayson_scripts={})
    cn = sd15.load_controlnet(folders["canny"], local)
    want = local.generate(sd15.Request("a house", negative_prompt="fog", seed=11, steps=3, width=64, height=64,
                                       guidance_scale=7.0, sampler="Euler", seed_mode="a1111",
                                       init_image=folders["image"], strength=0.6,
                                       control=[sd15.Control(cn, resize_mode="Just Resize")]))[0]
    assert np.array_equal(np.asarray(result.image.convert("RGB")), np.asarray(want))


def _b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("unit, message", [
    ({"model": "control_nope", "image": "IMAGE"}, "ControlNet model 'control_nope' not found"),
    ({"model": "../secret_control", "image": "IMAGE"}, "not found"),
    ({"model": "escape", "image": "IMAGE"}, "not found"),
    ({"model": "control_tiny_canny", "module": "openpose", "image": "IMAGE"}, "module: 'openpose' is not one of"),
    ({"model": "control_tiny_canny", "image": "IMAGE", "control_mode": 7}, "control_mode: 7 is not one of"),
    ({"model": "control_tiny_canny", "image": "IMAGE", "control_mode": [1]}, "control_mode: [1] is not one of"),
    ({"model": "control_tiny_canny", "image": "IMAGE", "guidance_start": 0.9, "guidance_end": 0.1},
     "0 <= start < end <= 1"),
    ({"model": "control_tiny_canny", "image": "not base64!"}, "not valid base64"),
    ({"model": "control_tiny_canny"}, "give the control image"),
    ("control_tiny_canny", "a ControlNet unit is an object"),
])
def test_bad_units_are_422s(server, folders, unit, message):
    if isinstance(unit, dict) and unit.get("image") == "IMAGE":
        unit = unit | {"image": _b64(folders["image"])}
    body = {k: v for k, v in SETTINGS.items()} | {"alwayson_scripts": {"ControlNet": {"args": [unit]}}}
    r = requests.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 422, r.text
    error = r.json()
    assert set(error) >= {"error", "detail", "body", "errors"} and message in error["detail"], error
    assert str(folders["cns"]) not in r.text and str(folders["cns"].parent) not in r.text
    assert requests.get(server.url + "/sdapi/v1/progress", timeout=10).status_code == 200    # still up


def test_a_controlnet_file_that_will_not_load_is_a_422_without_the_servers_paths(folders, tmp_path):
    cns = tmp_path / "controlnets"
    cns.mkdir()
    (cns / "control_broken.safetensors").write_bytes(b"\x00" * 64)
    with running_server(folders["ckpt"], controlnet_dir=cns) as srv:
        unit = {"model": "control_broken", "image": _b64(folders["image"])}
        r = requests.post(srv.url + "/sdapi/v1/txt2img", timeout=60,
                          json=SETTINGS | {"alwayson_scripts": {"ControlNet": {"args": [unit]}}})
        assert r.status_code == 422, r.text
        assert "control_broken.safetensors" in r.json()["detail"]
        assert str(tmp_path) not in r.text and str(tmp_path.resolve()) not in r.text


def test_without_a_controlnet_folder(folders):
    with running_server(folders["ckpt"]) as srv:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=srv.port)
        assert api.controlnet_model_list() == []
        assert api.get_scripts()["txt2img"] == []
        result = api.txt2img(**SETTINGS, alwayson_scripts={"ControlNet": {"args": []}})     # webuiapi's empty entry
        assert len(result.images) == 1
        r = requests.post(srv.url + "/sdapi/v1/txt2img", timeout=60, json=SETTINGS | {
            "alwayson_scripts": {"ControlNet": {"args": [{"model": "control_tiny_canny", "image": _b64(folders["image"])}]}}})
        assert r.status_code == 422 and "--controlnet-dir" in r.json()["detail"]
