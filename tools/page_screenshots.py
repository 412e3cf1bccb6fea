"""Screenshots of the web page for the README: before and after generating, at 1200x900.

Starts `python -m sd15.serve --demo` on a free 127.0.0.1 port, opens the page in Debian's chromium through
playwright (the browser the page test uses), fills the form, generates a batch of two and writes
docs/images/server-page-before.png and server-page-after.png. The demo model draws noise: the pictures show
the page, not the model.

    python -m tools.page_screenshots [--out docs/images] [--chromium /usr/bin/chromium]
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"the server did not answer {url} in {timeout_s:.0f} s")


def shoot(url: str, out: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        page.fill("#prompt", "a lighthouse at dusk, oil painting, dramatic clouds")
        page.fill("#negative_prompt", "blurry, low quality")
        page.fill("#steps", "20")
        page.fill("#seed", "42")
        page.fill("#width", "384")
        page.fill("#height", "256")
        page.locator("#height").blur()                 # no focus ring or spinner in the picture
        page.screenshot(path=str(out / "server-page-before.png"))
        page.fill("#batch_size", "2")
        page.click("#generate")
        page.wait_for_selector("#generate:enabled", timeout=120_000)
        page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.complete)")
        page.screenshot(path=str(out / "server-page-after.png"))
        browser.close()


def shrink(path: Path) -> None:
    """256 colours, no dithering: a page of flat colours looks the same at about a third of the bytes."""
    from PIL import Image
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    ap.add_argument("--chromium", default=os.environ.get("SD15_CHROMIUM", "/usr/bin/chromium"))
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        proc = subprocess.Popen([sys.executable, "-m", "sd15.serve", "--demo", "--port", str(port)], cwd=work,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_for(url, proc)
            args.out.mkdir(parents=True, exist_ok=True)
            shoot(url, args.out, args.chromium)
            for name in ("server-page-before.png", "server-page-after.png"):
                shrink(args.out / name)
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    print(f"wrote {args.out / 'server-page-before.png'} and {args.out / 'server-page-after.png'}")


if __name__ == "__main__":
    main()
