"""The generate app in a real browser: a notebook served by Voilà on 127.0.0.1, driven by Playwright in Debian's Chromium.

A tiny language model is trained first (seconds); the app notebook loads its bundle and shows `GenerateApp`.
The test clicks Generate and waits for a piano-roll image and an `<audio>` element, then saves a screenshot of
the app as `.ci/widgets-generate.png` (a CI artifact, ignored by git). No browser is downloaded: Playwright drives
the system `chromium` through `executable_path`.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tool

SCREENSHOT = ROOT/".ci"/"widgets-generate.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SERVER_START_S = 60   # Voilà listening
APP_READY_S = 90      # the notebook executed and the Generate button rendered
GENERATED_S = 60      # the pieces shown after the click
DEFAULT_TIMEOUT_MS = 30_000


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        msg = "headless Chromium not found (Debian: apt-get install chromium)"
        if os.environ.get("KELLY_REQUIRE_BROWSER") == "1": pytest.fail(msg + "; KELLY_REQUIRE_BROWSER=1 makes this a failure")
        pytest.skip(msg)
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _app_notebook(path: Path, bundle: Path):
    "A two-cell notebook: load the bundle, show the generate app (one bar per piece, two pieces)."
    code = [
        "from kelly.exporters import load_bundle\nfrom kelly.widgets import GenerateApp",
        f"app = GenerateApp(load_bundle({str(bundle)!r}))\napp.bars.value, app.n.value, app.top_k.value = 1, 2, 20\napp.widget",
    ]
    cells = [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": src}
             for i, src in enumerate(code)]
    nb = {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


@pytest.fixture(scope="module")
def lm_bundle(kelly_home, tmp_path_factory):
    "A tiny trained language model's bundle (two epochs of a two-layer model on six chorales)."
    runs = tmp_path_factory.mktemp("runs")
    code = ("from kelly.trainers import TrainConfig, OptimConfig, train\n"
            "from kelly.datasets import LMDataConfig\nfrom kelly.models import TransformerConfig\n"
            "from kelly.reliability import ReliabilityConfig\n"
            f"r = train(TrainConfig(name='tiny', runs_dir={str(runs)!r}, corpus_limit=6, "
            "data=LMDataConfig(seq_len=64, bs=8, valid_frac=0.2, windows_per_epoch=64), "
            "model=TransformerConfig(n_layers=2, width=64, n_heads=4, dropout=0.0), optim=OptimConfig(epochs=2, lr=3e-3), "
            "reliability=ReliabilityConfig(checkpoint_every=0, sample_every=0)), progress=False)\nprint(r.bundle)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "KELLY_HOME": str(kelly_home)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def voila(lm_bundle, kelly_home, tmp_path_factory):
    "Voilà serving the app notebook on 127.0.0.1 (stopped after the tests)."
    folder = tmp_path_factory.mktemp("app")
    _app_notebook(folder/"generate.ipynb", lm_bundle)
    port = _free_port()
    log = open(folder/"voila.log", "w")
    env = {**os.environ, "KELLY_HOME": str(kelly_home), "PYTHONPATH": str(ROOT), "JUPYTER_PLATFORM_DIRS": "1"}
    proc = subprocess.Popen([tool("voila"), str(folder/"generate.ipynb"), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
                             "--Voila.port_retries=0", "--VoilaConfiguration.show_tracebacks=True"],
                            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None: break
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0: break
        time.sleep(0.2)
    else:
        proc.kill()
    if proc.poll() is not None:
        log.close()
        pytest.fail(f"voila did not start:\n{(folder/'voila.log').read_text()[-4000:]}")
    yield f"http://127.0.0.1:{port}/", folder/"voila.log"
    proc.terminate()
    try: proc.wait(10)
    except subprocess.TimeoutExpired: proc.kill()
    log.close()


def test_generate_app_in_chromium(voila, tmp_path):
    exe = _chromium()
    from playwright.sync_api import sync_playwright
    url, log = voila
    SCREENSHOT.parent.mkdir(exist_ok=True)
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.set_default_timeout(DEFAULT_TIMEOUT_MS)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url, timeout=APP_READY_S * 1000)
            button = page.get_by_role("button", name="Generate")
            try: button.wait_for(state="visible", timeout=APP_READY_S * 1000)
            except Exception:
                page.screenshot(path=str(SCREENSHOT), full_page=True)
                pytest.fail(f"the app never showed its Generate button; page errors {errors}; voila log:\n{log.read_text()[-4000:]}")
            assert page.locator("audio").count() == 0 and page.locator(".widget-image img, img.widget-image").count() == 0
            button.click()
            roll = page.locator(".widget-image").first
            audio = page.locator("audio").first
            try:
                roll.wait_for(state="visible", timeout=GENERATED_S * 1000)
                audio.wait_for(state="attached", timeout=GENERATED_S * 1000)
            finally:
                page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert "done:" in page.content(), f"status after Generate: {page.locator('.widget-html').all_inner_texts()}"
            box = roll.bounding_box()
            assert box and box["width"] > 300 and box["height"] > 50, box   # a drawn piano roll, not an empty image
            assert roll.evaluate("img => img.naturalWidth") > 300
            assert page.locator("audio").count() >= 1 and audio.get_attribute("src")
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
