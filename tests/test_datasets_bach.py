"""The Bach corpus builder under real processes: a pool build, a SIGKILL in the middle, and a resume that only
builds what is missing."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kelly.core import sha256_file
from kelly.datasets import BACH_MANIFEST, MidiCorpus, bach_chorales, bach_sources

KILL_LIMIT = 16          # pieces in the interrupted build
POLL_S, WAIT_S = 0.05, 300


def _manifest(folder: Path) -> dict:
    try: return json.loads((folder/BACH_MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError): return {}


def _ok(folder: Path) -> dict:
    return {n: e for n, e in _manifest(folder).get("pieces", {}).items() if e["status"] == "ok"}


def test_sources_one_file_per_piece():
    sources = bach_sources()
    assert len(sources) == 410
    assert len({p.stem for p in sources}) == len(sources)
    assert all(p.parent.name == "bach" for p in sources)
    assert [p.suffix for p in sources if p.stem == "bwv277"] == [".mxl"]   # MusicXML preferred over Humdrum


def test_pool_build_killed_and_resumed(tmp_path):
    folder = tmp_path/"bach"
    code = f"from kelly.datasets import bach_chorales; bach_chorales(limit={KILL_LIMIT}, folder={str(folder)!r}, workers=2, progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while len(_ok(folder)) < 2 and proc.poll() is None and time.monotonic() < deadline: time.sleep(POLL_S)
        assert proc.poll() is None, "the build finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)   # the build and its pool workers, mid-flight
    finally:
        if proc.poll() is None: os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not _manifest(folder)["complete"]
    before = _ok(folder)
    assert 2 <= len(before) < KILL_LIMIT
    for name, entry in before.items():   # every recorded file is whole
        assert sha256_file(folder/name) == entry["sha256"]
    mtimes = {n: (folder/n).stat().st_mtime_ns for n in before}

    bach_chorales(limit=KILL_LIMIT, folder=folder, workers=2, progress=False)
    after = _manifest(folder)
    assert after["complete"] and len(_ok(folder)) == KILL_LIMIT
    assert {n: (folder/n).stat().st_mtime_ns for n in before} == mtimes   # nothing built twice
    assert not list(folder.glob(".*.tmp"))                                 # no temp file left behind
    corpus = MidiCorpus.from_folder(folder)
    assert len(corpus) == KILL_LIMIT and corpus.ignored == []             # the manifest and lock are hidden
    assert all((folder/n).read_bytes()[:4] == b"MThd" for n in corpus.names)


def test_concurrent_builders_share_one_build(tmp_path):
    folder = tmp_path/"bach"
    code = ("from kelly.core import setup_logging; setup_logging('INFO'); from kelly.datasets import bach_chorales; "
            f"bach_chorales(limit=4, folder={str(folder)!r}, workers=1, progress=False)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=WAIT_S)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum(log.count("building 4 of 4 Bach chorales") for log in logs) == 1, logs   # one converted, the other waited
    assert _manifest(folder)["complete"] and len(_ok(folder)) == 4
