"""One run of the app in headless Debian Chromium (Playwright): the page loads, a prompt streams, and the
token view and the heatmap are drawn. Uses the system Chromium; never downloads a browser."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import build_tiny_checkpoint

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is absent (install it with `apt-get install -y chromium`)")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    model_dir = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-browser-model"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, ADAPTIVE_MODEL=str(model_dir), ADAPTIVE_THREADS="1", HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False")
    log_path = tmp_path_factory.mktemp("logs") / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"app.py did not start:\n{log_path.read_text()}")
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def test_page_streams_a_prompt_and_draws_the_views(app_url):
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(app_url)
            page.wait_for_selector("#air-generate", timeout=60000)
            # The page-load event fills the model line: after it, the page's events are wired (an earlier
            # click can be lost).
            page.wait_for_function("document.querySelector('#air-banner').innerText.trim().length > 0",
                                   timeout=60000)
            # Untrusted text must stay text: this prompt is echoed in the token view.
            page.fill("#air-prompt textarea", "def main():\n    return '<b>0</b>'\n")
            started = time.perf_counter()
            page.click("#air-generate")
            page.wait_for_selector("#air-tokens .air-tok", timeout=60000)
            first_token_s = time.perf_counter() - started
            # The final token view carries the hovers (lens), the heatmap its cells.
            page.wait_for_selector("#air-tokens .air-tok[title]", timeout=90000)
            page.wait_for_selector("#air-heatmap .js-plotly-plot .heatmaplayer", timeout=90000)
            n = page.eval_on_selector_all("#air-tokens .air-tok", "els => els.length")
            assert n >= 1
            title = page.eval_on_selector("#air-tokens .air-tok", "e => e.title")
            assert "exit after layer" in title and "top-5 at final layer 4" in title
            assert page.eval_on_selector_all("#air-tokens b", "els => els.length") == 0
            assert "<b>0</b>" in page.inner_text("#air-tokens .air-prompt")
            box = page.eval_on_selector("#air-heatmap .js-plotly-plot", "e => e.getBoundingClientRect().height")
            assert box > 300  # fixed height: never the zero-height autosize
            cells = page.eval_on_selector_all("#air-heatmap .heatmaplayer image", "els => els.length")
            assert cells >= 1
            # mode auto: the Scheduler tab shows the policy's decision, its reason and the gate panel.
            page.click("#air-mode label:has-text('auto')")
            page.click("#air-generate")
            page.click("button[role=tab]:has-text('Scheduler')")
            page.wait_for_function("document.querySelector('#air-plan').innerText.includes('Policy')", timeout=90000)
            plan = page.inner_text("#air-plan")
            assert "quality" in plan and "Why:" in plan and "speculative" in plan
            page.wait_for_selector("#air-gate-plot .js-plotly-plot", timeout=30000)
            assert not errors, errors
            print(f"first token in the page after {first_token_s:.2f} s; {n} tokens")
        finally:
            browser.close()
