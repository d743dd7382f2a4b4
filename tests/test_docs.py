"""The offline docs site builds, and its pages render in headless Chromium served from 127.0.0.1.

The site shows what the code does: executed outputs (piano rolls, spectrograms, audio players), links between
symbols that stay on the site, and parameter tables with each parameter's own type and comment.
`KELLY_DOCS_SITE=/path/to/site` checks an already built site instead of building one (e.g. an older build).
"""
import configparser
import functools
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import soundfile as sf
from bs4 import BeautifulSoup

from conftest import ROOT

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=5000"]
BROWSER_TIMEOUT_S = 120
SITE_TIMEOUT_S = 3600   # with the notebooks already executed by the notebook tests it takes about a minute


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        msg = "headless Chromium not found (Debian: apt-get install chromium)"
        if os.environ.get("KELLY_REQUIRE_BROWSER") == "1": pytest.fail(msg + "; KELLY_REQUIRE_BROWSER=1 makes this a failure")
        pytest.skip(msg)
    return exe


@pytest.fixture(scope="module")
def site(tmp_path_factory, kelly_home):
    "The site, built after tests/test_notebooks.py (conftest.py orders it) so it reuses the executed notebooks in _proc/."
    if os.environ.get("KELLY_DOCS_SITE"): return Path(os.environ["KELLY_DOCS_SITE"])
    out = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, str(ROOT/"tools"/"build_docs.py"), "--no-readme", "--site-dir", str(out)],
                   check=True, cwd=ROOT, timeout=SITE_TIMEOUT_S, env={**os.environ, "KELLY_HOME": str(kelly_home)})
    return out


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(site))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _render(url, tmp_path):
    exe = _chromium()
    r = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path/'profile'}", "--dump-dom", url],
                       capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert r.returncode == 0, f"chromium failed on {url}: {r.stderr[-3000:]}"
    return r.stdout


def test_site_has_a_page_per_notebook(site):
    nbs = sorted(p.stem for p in (ROOT/"nbs").glob("[0-9]*.ipynb"))
    assert nbs, "no numbered notebooks"
    for stem in nbs: assert (site/f"{stem}.html").is_file(), f"no page for {stem}"
    assert (site/"index.html").is_file()


def test_index_renders(server, tmp_path):
    dom = _render(f"{server}/index.html", tmp_path)
    assert "Three commands" in dom and "pytest" in dom
    assert "00_core.html" in dom   # navigation links to the core page


def test_core_page_renders_api(server, tmp_path):
    dom = _render(f"{server}/00_core.html", tmp_path)
    for name in ("seed_everything", "pick_device", "kelly_home"):
        assert f'id="{name}"' in dom or f">{name}<" in dom, f"{name} not rendered on the core page"
    assert "Seed Python" in dom     # a docstring made it to the page


PAGES = {"exporters": "09_exporters.html", "audio": "03_audio.html", "samplers": "08_samplers.html",
         "callbacks": "11b_callbacks.html", "reliability": "11c_reliability.html"}
MIN_AUDIO_S = 1.0       # an audio player on the audio page plays at least this long
MIN_AUDIO_RMS = 1e-3    # and is not silence


def _soup(server, page, tmp_path):
    return BeautifulSoup(_render(f"{server}/{page}", tmp_path), "html.parser")


def _output_media(soup, tag):
    "The `<img>` / `<audio>` elements inside executed cells' outputs."
    return [el for out in soup.select("div.cell-output") for el in out.find_all(tag)]


def _media_file(site, el):
    src = el.get("src") or (el.find("source") or {}).get("src")
    assert src and not src.startswith(("data:", "http")), f"output media should be a file on the site, got {str(src)[:80]!r}"
    return site/src


@pytest.mark.parametrize("page", ["exporters", "audio"])
def test_page_shows_executed_images(page, site, server, tmp_path):
    imgs = _output_media(_soup(server, PAGES[page], tmp_path), "img")
    assert imgs, f"no <img> from an executed output on {PAGES[page]}"
    for el in imgs:
        f = _media_file(site, el)
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{f} is not a PNG on the site"


def test_exporters_page_shows_a_piano_roll(site, server, tmp_path):
    soup = _soup(server, PAGES["exporters"], tmp_path)
    after = soup.find(id="save_piano_roll")
    assert after is not None, "no save_piano_roll section on the exporters page"
    imgs = [el for el in after.find_all_next("img") if el.find_parent("div", class_="cell-output")]
    assert imgs, "no executed piano roll image after save_piano_roll's section"


def test_audio_page_plays_real_audio(site, server, tmp_path):
    players = _output_media(_soup(server, PAGES["audio"], tmp_path), "audio")
    assert players, "no <audio> element from an executed output on the audio page"
    for el in players:
        f = _media_file(site, el)
        y, sr = sf.read(f, dtype="float32")
        assert len(y) / sr >= MIN_AUDIO_S, f"{f.name}: {len(y) / sr:.2f} s of audio"
        assert float(np.sqrt(np.mean(np.square(y)))) > MIN_AUDIO_RMS, f"{f.name} is silent"


def test_index_gallery(site, server, tmp_path):
    soup = _soup(server, "index.html", tmp_path)
    assert _output_media(soup, "img"), "the index page shows no generated piano roll"
    assert _output_media(soup, "audio"), "the index page has no audio player of a model's output"


def _doc_host():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT/"settings.ini")
    return urlsplit(cfg["DEFAULT"]["doc_host"]).netloc


HREF, ID = re.compile(r'<a [^>]*href="([^"]*)"'), re.compile(r'\sid="([^"]*)"')


def test_symbol_links_stay_on_the_site(site):
    "Every link to a kelly symbol is relative and lands on an existing section of the site (files read directly)."
    host, bad, ids = _doc_host(), [], {}
    for page in sorted(site.glob("*.html")):
        for href in HREF.findall(page.read_text(encoding="utf-8")):
            if host in href: bad.append(f"{page.name}: -> {href}"); continue
            u = urlsplit(href)
            if u.scheme or u.netloc or not u.path.endswith(".html") or not u.fragment: continue
            target = site/u.path
            if target not in ids: ids[target] = set(ID.findall(target.read_text(encoding="utf-8"))) if target.is_file() else set()
            if u.fragment not in ids[target]: bad.append(f"{page.name}: -> {href} (no such section)")
    assert not bad, f"{len(bad)} symbol links leave the site or point nowhere, e.g.:\n" + "\n".join(bad[:15])


def _params(soup, symbol):
    "The rows of `symbol`'s parameter table: name -> (type, default, details)."
    head = soup.find(id=symbol.lower())
    assert head is not None, f"no section for {symbol}"
    table = head.find_next("table", class_="kelly-params")
    assert table is not None and table.find_previous(re.compile("^h[1-6]$")) is head, f"{symbol} has no parameter table"
    return {tr["data-param"]: tuple(td.get_text(" ", strip=True) for td in tr.find_all("td")[1:]) for tr in table.find_all("tr", attrs={"data-param": True})}


def test_parameter_tables(server, tmp_path):
    soup = _soup(server, PAGES["samplers"], tmp_path)
    p = _params(soup, "stream")
    assert p["model"][0] == "MusicTransformer" and p["model"][2] == "the language model"
    assert p["prompt"][0] == "" and "token ids" in p["prompt"][2], f"untyped prompt rendered as {p['prompt']}"
    assert p["config"][0] == "SamplingConfig | None", p["config"]
    assert "SamplingConfig fields" in p["**overrides"][2], p["**overrides"]
    assert p["return"][0] == "Iterator[torch.Tensor]" and "SamplingConfig" not in p["return"][2], f"stream returns {p['return']}"
    cfg = _params(soup, "SamplingConfig")
    assert cfg["temperature"][0] == "float" and cfg["temperature"][1] == "1.0" and "softmax temperature" in cfg["temperature"][2]
    gen = _params(soup, "Generation")
    assert list(gen) == ["ids", "lengths", "prompt_length"] and all(v[2] for v in gen.values()), gen
    err = soup.find(id="samplererror").find_next("code")
    assert err.get_text().startswith("class SamplerError("), err.get_text()
    text = soup.get_text()
    assert "NoneType" not in text and "__main__." not in text


@pytest.mark.parametrize("page,symbol,param", [("reliability", "Checkpoint", "directory"), ("callbacks", "Isolated", None)])
def test_callbacks_list_no_events(page, symbol, param, server, tmp_path):
    soup = _soup(server, PAGES[page], tmp_path)
    head = soup.find(id=symbol.lower())
    assert head is not None, f"no section for {symbol}"
    events = [tr["data-param"] for tr in soup.find_all("tr", attrs={"data-param": re.compile("^(after|before)_")})]
    assert not events, f"fastai events listed as parameters on {PAGES[page]}: {events[:5]}"
    if param: assert param in _params(soup, symbol)
    assert "NoneType" not in soup.get_text()
