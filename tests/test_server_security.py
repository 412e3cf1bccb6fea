"""The server's safe defaults, against the real server: Basic auth on every route (webuiapi's set_auth
gets in), cross-origin posts and foreign Host names refused, CORS off unless asked, and hostile
requests (oversized, bad base64, a decompression bomb, paths in model and LoRA names, symlinks out of
the models folder, negative sizes, absurd batches, wrong types, unknown samplers, URLs to fetch) all
answered with a 4xx in A1111's error shape, the server still up, and nothing written outside its
output folder."""

import base64
import io
import json
import os
import struct
import zlib

import pytest

pytest.importorskip("fastapi")
webuiapi = pytest.importorskip("webuiapi")
import requests  # noqa: E402
from PIL import Image  # noqa: E402

from sd15.models.demo import write_demo_checkpoint  # noqa: E402
from sd15.serve.limits import Limits  # noqa: E402
from sd15.serve.state import Access  # noqa: E402
from server_harness import running_server  # noqa: E402

SMALL = {"width": 64, "height": 64, "steps": 2}
ERROR_KEYS = {"error", "detail", "body", "errors"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    models = root / "models"
    models.mkdir()
    ckpt = write_demo_checkpoint(models / "demo.safetensors")
    outside = write_demo_checkpoint(root / "outside.safetensors", seed=3)      # a real model, not offered
    os.symlink(outside, models / "link.safetensors")
    loras = root / "loras"
    loras.mkdir()
    os.symlink(outside, loras / "escape.safetensors")
    (root / "outputs").mkdir()
    return {"root": root, "models": models, "ckpt": ckpt, "outside": outside, "loras": loras,
            "outputs": root / "outputs"}


def files_under(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_error(r, status: int, *words: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == ERROR_KEYS, body
    for word in words:
        assert word in body["detail"], (word, body["detail"])
    assert "Traceback" not in r.text
    return body


def png_b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def bomb_png(side: int) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: a few KB to a few hundred KB that decompress to
    side² / 8 bytes (30000²: 112 MB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)                   # filter byte + the row's bits
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


# ---- auth ---------------------------------------------------------------------------------------------

def test_basic_auth_covers_every_route_and_webuiapi_gets_in(tree):
    with running_server(tree["ckpt"], access=Access(credentials={"alice": "s3cret", "bob": "hunter2"}),
                        lora_dirs=[tree["loras"]]) as srv:
        for method, path in [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/sdapi/v1/loras"),
                             ("GET", "/sdapi/v1/embeddings"), ("GET", "/sdapi/v1/sd-models"),
                             ("GET", "/sdapi/v1/progress"), ("GET", "/openapi.json"), ("GET", "/no/such/route"),
                             ("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/interrupt")]:
            r = requests.request(method, srv.url + path, json={"prompt": "x"} if method == "POST" else None)
            assert_error(r, 401, "Incorrect username or password")
            assert r.headers["WWW-Authenticate"].startswith("Basic")
        wrong = requests.get(srv.url + "/sdapi/v1/sd-models", auth=("alice", "s3cre"))
        assert wrong.status_code == 401
        assert requests.get(srv.url + "/", auth=("bob", "hunter2")).status_code == 200

        api = webuiapi.WebUIApi(host="127.0.0.1", port=srv.port)
        api.set_auth("alice", "s3cret")
        result = api.txt2img(prompt="authorised", seed=1, **SMALL)
        assert len(result.images) == 1 and result.info["all_seeds"] == [1]
        assert api.get_loras() == []            # the symlinked LoRA leaves the folder: not listed
        anonymous = webuiapi.WebUIApi(host="127.0.0.1", port=srv.port)
        with pytest.raises(RuntimeError) as refused:
            anonymous.txt2img(prompt="no", **SMALL)
        assert refused.value.args[0] == 401


# ---- origins and hosts --------------------------------------------------------------------------------

def test_cross_origin_posts_and_foreign_hosts_are_refused_cors_is_off(tree):
    with running_server(tree["ckpt"]) as srv:
        url = srv.url + "/sdapi/v1/txt2img"
        body = json.dumps({"prompt": "from a web page", **SMALL})
        for headers in ({"Origin": "http://evil.example", "Content-Type": "application/json"},
                        {"Origin": "http://evil.example", "Content-Type": "text/plain"},      # a form: no preflight
                        {"Origin": "null", "Content-Type": "application/json"},
                        {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}):
            assert_error(requests.post(url, data=body, headers=headers), 403, "cross-origin request refused")
        assert_error(requests.post(srv.url + "/sdapi/v1/interrupt", headers={"Origin": "http://evil.example"}), 403)
        same = requests.post(url, data=body, headers={"Origin": srv.url, "Content-Type": "application/json"})
        assert same.status_code == 200                                  # the page itself posts like this
        # DNS rebinding: a hostile name resolving to 127.0.0.1 is "same origin" but not a loopback Host
        rebound = requests.get(srv.url + "/sdapi/v1/sd-models", headers={"Host": f"evil.example:{srv.port}"})
        assert_error(rebound, 403, "evil.example")
        assert requests.get(srv.url + "/", headers={"Host": f"localhost:{srv.port}"}).status_code == 200
        # CORS is off: no preflight answer, no Access-Control header on any answer
        pre = requests.options(url, headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in {k.lower() for k in pre.headers}
        get = requests.get(srv.url + "/sdapi/v1/samplers", headers={"Origin": "http://app.example"})
        assert get.status_code == 200 and "access-control-allow-origin" not in {k.lower() for k in get.headers}
        page = requests.get(srv.url + "/")
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert page.headers["X-Content-Type-Options"] == "nosniff"


def test_cors_allows_only_the_origins_given(tree):
    with running_server(tree["ckpt"], access=Access(cors_origins=("http://app.example:3000",))) as srv:
        url = srv.url + "/sdapi/v1/txt2img"
        pre = requests.options(url, headers={"Origin": "http://app.example:3000",
                                             "Access-Control-Request-Method": "POST",
                                             "Access-Control-Request-Headers": "content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example:3000"
        ok = requests.post(url, json={"prompt": "allowed", **SMALL}, headers={"Origin": "http://app.example:3000"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example:3000"
        other = requests.post(url, json={"prompt": "no", **SMALL}, headers={"Origin": "http://evil.example"})
        assert_error(other, 403)


# ---- hostile requests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile(tree):
    with running_server(tree["ckpt"], models_dir=tree["models"], lora_dirs=[tree["loras"]], outputs=tree["outputs"],
                        limits=Limits(max_body_bytes=4 << 20, max_image_pixels=4096 * 4096)) as srv:
        yield srv


def post(srv, path, payload=None, **kw):
    return requests.post(srv.url + path, json=payload, **kw)


def test_oversized_bodies_are_refused_before_reading_them(hostile):
    big = {"prompt": "x" * (5 << 20)}
    assert_error(post(hostile, "/sdapi/v1/txt2img", big), 413, "too large")
    chunks = (b'{"prompt": "' + b"y" * (1 << 20) for _ in range(6))             # no Content-Length: chunked
    r = requests.post(hostile.url + "/sdapi/v1/txt2img", data=chunks, headers={"Content-Type": "application/json"})
    assert_error(r, 413, "too large")


@pytest.mark.parametrize("payload,words", [
    ({"init_images": ["not base64 at all!"]}, ["init_images[0]", "base64"]),
    ({"init_images": [base64.b64encode(b"GIF89a....").decode()]}, ["not a PNG, JPEG or WebP"]),
    ({"init_images": ["http://127.0.0.1:9/inside.png"]}, ["never fetches URLs"]),
    ({"init_images": ["data:text/html;base64,PGI+"]}, ["data URL"]),
    ({"init_images": []}, ["init_images"]),
    ({"init_images": [5]}, ["init_images.0"]),
    ({"mask": "%%%"}, ["mask", "base64"]),
    ({"resize_mode": 3}, ["resize_mode 3"]),
    ({"resize_mode": 1, "height": 0}, ["width and height must be positive", "64x0"]),     # no 500 (x / 0)
])
def test_bad_images_are_422(hostile, payload, words):
    ok_image = png_b64(Image.new("RGB", (64, 64), (10, 20, 30)))
    body = {"prompt": "x", "init_images": [ok_image], **SMALL} | payload
    assert_error(post(hostile, "/sdapi/v1/img2img", body), 422, *words)


def test_many_large_images_are_refused_by_the_request_budget(hostile):
    """Each 4096² black PNG is allowed on its own (a few hundred KB that decode to 16.8 M pixels); five in
    one request pass the 4 x 4096² budget and are refused from their headers, before any is decoded."""
    data = base64.b64encode(bomb_png(4096)).decode()
    body = {"prompt": "many", "init_images": [data] * 5, "batch_size": 5, **SMALL}
    assert_error(post(hostile, "/sdapi/v1/img2img", body), 422, "init_images[4]", "add up to")


def test_a_decompression_bomb_is_refused_by_its_header(hostile):
    for side, words in ((30000, ["too"]), (5000, ["5000x5000 is too large"])):
        data = bomb_png(side)
        assert len(data) < 200_000
        body = {"prompt": "boom", "init_images": [base64.b64encode(data).decode()], **SMALL}
        assert_error(post(hostile, "/sdapi/v1/img2img", body), 422, "init_images[0]", *words)
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        info = post(hostile, "/sdapi/v1/png-info", {"image": url})
        assert_error(info, 422, "image")


@pytest.mark.parametrize("payload,words", [
    ({"width": -64}, ["width must be positive"]),
    ({"width": 500}, ["multiple of 8", "496"]),
    ({"width": 8192, "height": 8192}, ["at most"]),
    ({"batch_size": 100000}, ["at most 64"]),
    ({"n_iter": 1000}, ["at most 64"]),
    ({"batch_size": 0}, ["at least 1"]),
    ({"steps": 0}, ["steps must be an integer from 1"]),
    ({"steps": "many"}, ["steps", "valid integer"]),
    ({"prompt": 5}, ["prompt"]),
    ({"width": [512]}, ["width"]),
    ({"cfg_scale": "loud"}, ["cfg_scale"]),
    ({"seed": -5}, ["seed must be an integer"]),
    ({"sampler_name": "Euler b"}, ["unknown sampler 'Euler b'", "Euler a", "DPM++ 2M"]),
    ({"scheduler": "Beta"}, ["unknown schedule type 'Beta'", "Karras"]),
    ({"sampler_name": "DDIM Karras"}, ["DDIM"]),
    ({"script_name": "x/y/z plot"}, ["script 'x/y/z plot' not found"]),
    ({"enable_hr": True, "hr_scale": 9}, ["hires scale must be a number from 1 to 8"]),
    ({"enable_hr": True, "width": 1024, "height": 1024, "hr_scale": 4}, ["the hires fix would make 4096x4096"]),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, ["unknown hires upscaler"]),
    ({"prompt": ["a", "b", "c"], "batch_size": 2}, ["prompt is a list of 3"]),
    ({"negative_prompt": "bad " * 10000}, ["a prompt of 40000 characters", "at most 20000"]),
    ({"override_settings": {"sd_model_checkpoint": "../outside.safetensors"}}, ["not the loaded one"]),
    ({"override_settings": {"CLIP_stop_at_last_layers": "two"}}, ["clip_skip"]),
])
def test_bad_generation_requests_are_422_naming_the_problem(hostile, payload, words):
    assert_error(post(hostile, "/sdapi/v1/txt2img", {"prompt": "x", **SMALL} | payload), 422, *words)


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", "null"])
def test_bodies_that_are_not_json_objects(hostile, body):
    r = requests.post(hostile.url + "/sdapi/v1/txt2img", data=body, headers={"Content-Type": "application/json"})
    assert_error(r, 422)


def test_model_names_resolve_only_inside_the_models_folder(hostile, tree):
    listed = {m["filename"] for m in requests.get(hostile.url + "/sdapi/v1/sd-models").json()}
    assert listed == {"demo.safetensors"}                      # link.safetensors points outside: left out
    for name in ("../outside.safetensors", str(tree["outside"]), "link.safetensors", "link",
                 "models/../outside.safetensors", "/etc/passwd", "demo.safetensors/../../outside.safetensors"):
        body = assert_error(post(hostile, "/sdapi/v1/options", {"sd_model_checkpoint": name}), 422, "not found")
        assert str(tree["root"]) not in body["detail"] or name == str(tree["outside"])
    options = requests.get(hostile.url + "/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"].startswith("demo.safetensors [")


def test_lora_tags_resolve_only_inside_the_lora_folders(hostile, tree):
    for tag in ("<lora:escape:1>", "<lora:../outside:1>", f"<lora:{tree['outside']}:1>"):
        body = assert_error(post(hostile, "/sdapi/v1/txt2img", {"prompt": f"a cat {tag}", **SMALL}), 422,
                            "no LoRA named")
        assert str(tree["loras"]) not in body["detail"]            # the server's folders are not shown


def test_static_files_come_from_the_page_folder_only(hostile):
    for path in ("/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e/%2e%2e/setup.cfg",
                 "/static/....//app.py"):
        r = requests.get(hostile.url + path)
        assert r.status_code == 404 and "build_app" not in r.text and "extras_require" not in r.text, path


def test_the_server_survives_and_writes_only_into_its_outputs(hostile, tree):
    before = files_under(tree["root"])
    r = post(hostile, "/sdapi/v1/txt2img", {"prompt": "../../escape", "seed": 42, "save_images": True, **SMALL})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    new = files_under(tree["root"]) - before
    assert len(new) == 1 and next(iter(new)).startswith("outputs/") and next(iter(new)).endswith("-42.png")
    saved = Image.open(tree["root"] / next(iter(new)))
    assert saved.text["parameters"].startswith("../../escape\n")
    no_send = post(hostile, "/sdapi/v1/txt2img", {"prompt": "quiet", "send_images": False, **SMALL})
    assert no_send.status_code == 200 and no_send.json()["images"] == []
