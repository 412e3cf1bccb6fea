"""The web page at GET / (sd15/serve/static), in a real headless browser against the real server.

`python -m sd15.serve --demo` runs as a subprocess on a free 127.0.0.1 port; Debian's chromium, driven by
playwright (pointed at the system browser: `playwright install` is never needed), opens the page, types
into the form and presses the buttons a person would. Checked: the progress bar moves while a job runs,
the image appears with an infotext that matches what was typed (and equals the PNG's own `parameters`
chunk), "Reuse these settings" fills the form back, img2img from an uploaded file, API errors shown in the
page, Interrupt, and that prompts and file names full of HTML stay text.

Needs a chromium executable: `apt-get install chromium` (Debian; .ci/run does it when it can), or the path
of any Chromium/Chrome in $SD15_CHROMIUM. Without one the tests are skipped, saying so.
"""

import base64
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from sd15.pipeline.infotext import parse_infotext

REPO = Path(__file__).resolve().parents[1]
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]
SERVER_START_S = 120      # import torch, write the demo checkpoint, load it: seconds on a loaded 2-core box


def find_chromium() -> str | None:
    candidates = [os.environ.get("SD15_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                  shutil.which("chromium-browser"), shutil.which("google-chrome")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium_path():
    path = find_chromium()
    if path is None:
        pytest.skip("no chromium: install Debian's chromium (apt-get install chromium chromium-driver) "
                    "or set SD15_CHROMIUM to a Chromium/Chrome executable to run the web page tests")
    return path


@contextlib.contextmanager
def running_server(work: Path, *args: str):
    """`python -m sd15.serve --demo` on a free 127.0.0.1 port, started in `work`; yields its URL once it answers."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = work / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sd15.serve", "--demo", "--host", "127.0.0.1",
                                 "--port", str(port), *args], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + SERVER_START_S
        try:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
                try:
                    urllib.request.urlopen(url, timeout=2).close()
                    break
                except urllib.error.HTTPError:      # it answers (401 when it asks for credentials)
                    break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer GET / in {SERVER_START_S} s:\n{log_path.read_text()}")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory, chromium_path):
    """The real server with the tiny demo model, its working directory a temporary one."""
    with running_server(tmp_path_factory.mktemp("serve")) as url:
        yield url


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright    # the `test` extra installs it; no browser download
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, headless=True, args=BROWSER_ARGS)
        yield b
        b.close()


def open_page(browser, url: str, **context_options):
    """A new browser context on the page, loaded, its lists filled; records script errors, CSP
    violations and dialogs (alert() from injected script) for `check_clean`."""
    context = browser.new_context(viewport={"width": 1200, "height": 900}, **context_options)
    pg = context.new_page()
    pg.problems = []
    pg.on("pageerror", lambda e: pg.problems.append(f"script error: {e}"))
    pg.on("console", lambda m: pg.problems.append(f"console: {m.text}")
          if m.type == "error" and "Content Security Policy" in m.text else None)
    pg.on("dialog", lambda d: (pg.problems.append(f"dialog (injected script ran?): {d.message}"), d.dismiss()))
    pg.goto(url)
    pg.wait_for_selector("body[data-ready=true]", timeout=20_000)
    assert pg.locator("#error").is_hidden(), pg.text_content("#error")
    return context, pg


@pytest.fixture
def page(browser, server):
    context, pg = open_page(browser, server)
    yield pg
    context.close()
    assert not pg.problems, pg.problems


def fill_form(pg, **fields):
    for name, value in fields.items():
        if name in ("sampler_name", "scheduler"):
            pg.select_option(f"#{name}", str(value))
        else:
            pg.fill(f"#{name}", str(value))


def finished_jobs(pg) -> int:
    return int(pg.evaluate("() => document.body.dataset.finished || '0'"))


def generate(pg, timeout_s: float = 60) -> list[float]:
    """Press Generate and poll the page until the job has ended; the progress bar's values seen, in order."""
    before = finished_jobs(pg)
    pg.click("#generate")
    return wait_done(pg, before, timeout_s)


def wait_done(pg, before: int, timeout_s: float = 60) -> list[float]:
    seen = []
    deadline = time.monotonic() + timeout_s
    while finished_jobs(pg) == before:
        seen.append(pg.eval_on_selector("#progress", "e => e.value"))
        assert time.monotonic() < deadline, f"the job did not finish in {timeout_s} s; progress seen {seen[-5:]}"
        time.sleep(0.03)
    return seen


def cards(pg):
    return pg.locator("#gallery figure.card")


def png_parameters(data_url: str) -> tuple[str, tuple[int, int]]:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix), data_url[:40]
    image = Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):])))
    return image.text["parameters"], image.size


def test_generate_moves_the_progress_bar_and_shows_the_image_with_its_infotext(page):
    prompt, negative = "a lighthouse at dusk, oil painting", "blurry, low quality"
    fill_form(page, prompt=prompt, negative_prompt=negative, sampler_name="Euler", steps=60, cfg_scale=5.5,
              seed=1234, width=256, height=192, batch_size=1)
    seen = generate(page)

    between = [v for v in seen if 0 < v < 100]
    assert between, f"the progress bar never showed a value strictly between 0 and 100: {sorted(set(seen))}"
    assert len(set(between)) >= 2, f"the progress bar did not move while the job ran: {sorted(set(seen))}"
    assert page.eval_on_selector("#progress", "e => e.value") == 100
    assert page.text_content("#progress-text").startswith("Done · 1 image")
    assert page.locator("#error").is_hidden(), page.text_content("#error")

    assert cards(page).count() == 1
    card = cards(page).first
    shown = card.locator("pre.infotext").text_content()
    info = parse_infotext(shown)
    assert info.prompt == prompt and info.negative_prompt == negative
    assert info.fields["Steps"] == "60" and info.fields["Seed"] == "1234" and info.fields["Size"] == "256x192"
    assert info.fields["Sampler"] == "Euler" and float(info.fields["CFG scale"]) == 5.5
    assert "seed 1234" in card.locator(".card-title").text_content()

    img = card.locator("img.result")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [256, 192]
    parameters, size = png_parameters(img.get_attribute("src"))
    assert size == (256, 192)
    assert parameters == shown, "the infotext shown differs from the PNG's parameters chunk"


def test_reuse_these_settings_fills_the_form_back(page):
    prompt = "first line, with a comma\nsecond line: with a colon"
    negative = "blurry\nwatermark"
    fill_form(page, prompt=prompt, negative_prompt=negative, sampler_name="Euler a", steps=4, cfg_scale=3.5,
              seed=77, width=64, height=96, batch_size=2)
    generate(page)
    assert cards(page).count() == 2, page.text_content("#error") or ""
    first_infotext = cards(page).nth(0).locator("pre.infotext").text_content()
    assert parse_infotext(first_infotext).fields["Seed"] == "77"

    fill_form(page, prompt="something else", negative_prompt="", sampler_name="DDIM", steps=33, cfg_scale=12,
              seed=-1, width=512, height=512, batch_size=1)
    cards(page).nth(0).locator("button.reuse").click()
    values = {k: page.input_value(f"#{k}") for k in
              ("prompt", "negative_prompt", "sampler_name", "steps", "cfg_scale", "seed", "width", "height", "batch_size")}
    assert values == {"prompt": prompt, "negative_prompt": negative, "sampler_name": "Euler a", "steps": "4",
                      "cfg_scale": "3.5", "seed": "77", "width": "64", "height": "96", "batch_size": "2"}
    assert page.text_content("#notice").startswith("Settings filled from the image")

    # the same through the PNG itself: "To img2img", then "Read settings" (POST /sdapi/v1/png-info)
    fill_form(page, prompt="else again", negative_prompt="", steps=9, seed=1, width=128, batch_size=1)
    cards(page).nth(0).locator("button.to-img2img").click()
    assert page.is_checked("#mode-img2img") and page.text_content("#init-name") == "sd15-77.png"
    page.click("#init-read-settings")
    page.wait_for_function("() => document.getElementById('prompt').value !== 'else again'")
    assert {k: page.input_value(f"#{k}") for k in values} == values


INFOTEXTS = [
    # a quoted value holding ',' and ':' (A1111's quote()) and a flat JSON object; CRLF and multi-line parts;
    # no settings line; an escaped quote and text between pairs that is no pair (skipped)
    'a cat, sitting\nNegative prompt: dog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, '
    'Seed: 5, Size: 512x768, Model: "my, model: v2", Hashes: {"model": "abc", "lora:x": "def"}, Version: v1.10.1',
    "line one\r\nline two\r\nNegative prompt: a\r\nb\r\nSteps: 5, Sampler: Euler a, Seed: -1, Size: 64x64\r\n\r\n",
    "no settings here\njust a prompt, Steps: 3",
    'Steps: 1, no pair here, Sampler: DDIM, Seed: 2, Lora hashes: "a: 1, b: 2", Emphasis: "quo\\"ted"',
]


@pytest.mark.parametrize("text", INFOTEXTS, ids=["quoted-and-json", "crlf-multiline", "no-settings-line", "escaped-quote"])
def test_the_page_parses_infotexts_as_the_engine_does(page, text):
    js = page.evaluate("t => window.sd15Page.parseInfotext(t)", text)
    py = parse_infotext(text)
    assert (js["prompt"], js["negativePrompt"], js["fields"]) == (py.prompt, py.negative_prompt, py.fields)


def test_a_quoted_value_keeps_its_commas_and_colons(page):
    js = page.evaluate("t => window.sd15Page.parseInfotext(t)", INFOTEXTS[0])
    assert js["prompt"] == "a cat, sitting" and js["negativePrompt"] == "dog"
    assert js["fields"]["Model"] == "my, model: v2"
    assert js["fields"]["Hashes"] == '{"model": "abc", "lora:x": "def"}'
    assert js["fields"]["Size"] == "512x768" and js["fields"]["Version"] == "v1.10.1"


HOSTILE_PROMPT = "<img src=x onerror=alert(1)>"
HOSTILE_NEGATIVE = "<script>window.pwned = 1</script><b id=evil>bold</b>"


def test_html_in_prompts_stays_text(page):
    fill_form(page, prompt=HOSTILE_PROMPT, negative_prompt=HOSTILE_NEGATIVE, steps=3, width=64, height=64, seed=5)
    generate(page)
    assert cards(page).count() == 1, page.text_content("#error") or ""
    shown = cards(page).first.locator("pre.infotext").text_content()
    assert shown.startswith(f"{HOSTILE_PROMPT}\nNegative prompt: {HOSTILE_NEGATIVE}\n")
    assert page.locator("img[src=x]").count() == 0 and page.locator("#evil").count() == 0
    assert page.locator("#gallery img").count() == 1             # only the result itself
    assert page.evaluate("typeof window.pwned") == "undefined"
    cards(page).first.locator("button.reuse").click()
    assert page.input_value("#prompt") == HOSTILE_PROMPT
    assert page.locator("img[src=x]").count() == 0


def test_img2img_from_an_uploaded_file_whose_name_is_html(page):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, "PNG")
    name = '<b id="evil">x</b>.png'
    page.locator("label", has=page.locator("#mode-img2img")).click()      # the visible half of the toggle
    assert page.is_checked("#mode-img2img") and page.locator("#img2img-fields").is_visible()
    page.set_input_files("#init_image", files=[{"name": name, "mimeType": "image/png", "buffer": buf.getvalue()}])
    page.wait_for_function("() => document.getElementById('init-size').textContent === '64×64'")
    assert page.text_content("#init-name") == name and page.locator("#evil").count() == 0
    page.fill("#denoising_strength", "0.5")
    fill_form(page, prompt="a red square", steps=10, width=64, height=64, seed=9)
    generate(page)
    assert cards(page).count() == 1, page.text_content("#error") or ""
    card = cards(page).first
    assert card.locator(".card-title").text_content().startswith("img2img")
    info = parse_infotext(card.locator("pre.infotext").text_content())
    assert info.prompt == "a red square" and float(info.fields["Denoising strength"]) == 0.5
    assert info.fields["Size"] == "64x64" and info.fields["Seed"] == "9"


def test_an_api_error_is_shown_in_the_page(page):
    fill_form(page, prompt="x", steps=2, width=100, height=64)     # 100 is no multiple of 8
    generate(page)
    error = page.locator("#error")
    assert error.is_visible()
    assert "width" in error.text_content().lower(), error.text_content()
    assert cards(page).count() == 0
    assert page.text_content("#progress-text") == "Failed"
    assert page.is_enabled("#generate") and page.is_disabled("#interrupt")


def test_interrupt_stops_the_job_and_the_next_one_runs(page):
    fill_form(page, prompt="a long job", sampler_name="Euler", steps=150, width=256, height=256, seed=3)
    before = finished_jobs(page)
    page.click("#generate")
    clicked = time.monotonic()
    page.wait_for_function("() => document.getElementById('progress').value >= 3", timeout=30_000)
    running_s, done_percent = time.monotonic() - clicked, page.eval_on_selector("#progress", "e => e.value")
    left_s = running_s * (100 - done_percent) / done_percent      # what the rest would take at this pace
    interrupted = time.monotonic()
    page.click("#interrupt")
    wait_done(page, before, timeout_s=60)
    stopped_s = time.monotonic() - interrupted
    assert stopped_s < 0.5 * left_s, f"the job went on for {stopped_s:.1f} s after Interrupt (the rest: ~{left_s:.1f} s)"
    status = page.text_content("#progress-text")
    assert status.startswith("Interrupted"), status
    assert page.locator("#error").is_hidden(), page.text_content("#error")      # asked for, so no error

    fill_form(page, prompt="after the interrupt", steps=3, width=64, height=64, seed=4)
    generate(page)
    assert page.text_content("#progress-text").startswith("Done · 1 image"), page.text_content("#error")
    assert parse_infotext(cards(page).first.locator("pre.infotext").text_content()).prompt == "after the interrupt"


def test_the_page_works_behind_api_auth(browser, tmp_path):
    """--api-auth covers the page, its files and the API; a browser given the credentials uses all three."""
    with running_server(tmp_path, "--api-auth", "alice:s3cret-pw") as url:
        for path in ("", "static/app.js", "sdapi/v1/samplers"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url + path, timeout=10)
            assert refused.value.code == 401, path
        context, pg = open_page(browser, url, http_credentials={"username": "alice", "password": "s3cret-pw"})
        try:
            assert pg.locator("#sampler_name option").count() >= 5
            fill_form(pg, prompt="behind a password", steps=2, width=64, height=64, seed=11)
            generate(pg)
            assert pg.text_content("#progress-text").startswith("Done · 1 image"), pg.text_content("#error")
            assert not pg.problems, pg.problems
        finally:
            context.close()
