"""The audio datasets under real processes and real files: a SIGKILL in the middle of rendering and a resume that
renders only what is missing, FluidSynth missing, corrupt files in a folder, the same augmented crop in a fresh
process, two torchrun ranks that split the crops between them, and a cache build killed and rebuilt."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, tool
from kelly.audio import AudioError, load_audio, save_audio
from kelly.audio_datasets import (AUDIO_CACHE_REPORT, BACH_AUDIO_MANIFEST, AudioAugmentation, AudioCache, AudioCorpus,
                                  AudioDataConfig, RandomCrops, audio_dataloaders, bach_chorales_audio)
from kelly.core import sha256_file
from kelly.datasets import DatasetError, bach_chorales

KILL_LIMIT = 10          # chorales in the interrupted render
POLL_S, WAIT_S = 0.05, 300
SR = 16000
CROP = 4000              # samples per crop in the crop tests


def _manifest(folder: Path) -> dict:
    try: return json.loads((folder/BACH_AUDIO_MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError): return {}


def _ok(folder: Path) -> dict:
    return {n: e for n, e in _manifest(folder).get("pieces", {}).items() if e["status"] == "ok"}


@pytest.fixture
def home(kelly_home, monkeypatch):
    "This process and its children use the session's KELLY_HOME."
    monkeypatch.setenv("KELLY_HOME", str(kelly_home))
    return kelly_home


def _tones(folder: Path, n: int, seconds: float = 1.0) -> Path:
    "`n` real audio files of different tones (sine waves at different pitches and lengths), written with save_audio."
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        t = np.arange(int(SR * seconds * (1 + i % 3))) / SR
        save_audio(folder/f"tone{i:02d}.wav", 0.4 * np.sin(2 * np.pi * (220 + 30 * i) * t), SR)
    return folder


def test_render_killed_and_resumed(home, tmp_path):
    bach_chorales(limit=KILL_LIMIT, workers=2, progress=False)   # the MIDI corpus first: the subprocess only renders
    folder = tmp_path/"audio"
    code = f"from kelly.audio_datasets import bach_chorales_audio; bach_chorales_audio({KILL_LIMIT}, folder={str(folder)!r}, workers=2, progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while len(_ok(folder)) < 2 and proc.poll() is None and time.monotonic() < deadline: time.sleep(POLL_S)
        assert proc.poll() is None, "the render finished (or failed) before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)   # Python, its threads and the FluidSynth processes, mid-flight
    finally:
        if proc.poll() is None: os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not _manifest(folder)["complete"]
    before = _ok(folder)
    assert 2 <= len(before) < KILL_LIMIT
    for name, entry in before.items():   # every recorded piece is whole, its MIDI beside it
        assert sha256_file(folder/name) == entry["sha256"]
        assert sha256_file(folder/entry["midi"]) == entry["midi_sha256"]
    mtimes = {n: (folder/n).stat().st_mtime_ns for n in before}

    assert bach_chorales_audio(KILL_LIMIT, folder=folder, workers=2, progress=False) == folder
    after = _manifest(folder)
    assert after["complete"] and len(_ok(folder)) == KILL_LIMIT
    assert {n: (folder/n).stat().st_mtime_ns for n in before} == mtimes   # nothing rendered twice
    assert not [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".render.wav"))]   # no temp file left behind
    corpus = AudioCorpus.from_folder(folder)
    assert len(corpus) == KILL_LIMIT and len(corpus.midi) == KILL_LIMIT and corpus.ignored == []
    for p in corpus.paths:
        y, sr = load_audio(p)
        assert sr == SR and y.ndim == 1 and np.abs(y).max() > 0.01


def test_missing_fluidsynth_is_an_error_with_the_install_hint(home, tmp_path, monkeypatch):
    bach_chorales(limit=1, progress=False)
    (tmp_path/"bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path/"bin"))   # no fluidsynth on PATH
    with pytest.raises(AudioError, match="apt-get install fluidsynth"):
        bach_chorales_audio(1, folder=tmp_path/"audio", progress=False)
    assert not list((tmp_path/"audio").glob("*.flac"))   # nothing half-rendered, no sine stand-in
    monkeypatch.setenv("KELLY_SOUNDFONT", str(tmp_path/"gone.sf2"))
    with pytest.raises(AudioError, match="gone.sf2"):
        bach_chorales_audio(1, folder=tmp_path/"audio", progress=False)


def test_corrupt_files_are_listed_in_the_report(tmp_path):
    folder = _tones(tmp_path/"corpus", 4)
    good = (folder/"tone00.wav").read_bytes()
    (folder/"cut.wav").write_bytes(good[:len(good) // 3])                 # truncated in the data chunk
    (folder/"empty.flac").write_bytes(b"")
    (folder/"noise.ogg").write_bytes(np.random.default_rng(0).bytes(5000))   # not audio
    (folder/"midi.wav").write_bytes((ROOT/"tests"/"conftest.py").read_bytes())  # text with an audio name
    (folder/"readme.txt").write_text("notes")
    cache = AudioCache.for_corpus(folder, folder=tmp_path/"cache", workers=2, progress=False)   # the process-pool path
    report = json.loads((cache.folder/AUDIO_CACHE_REPORT).read_text())
    skipped = {s["file"]: s["reason"] for s in report["skipped"]}
    assert sorted(skipped) == ["cut.wav", "empty.flac", "midi.wav", "noise.ogg"]
    for name, reason in skipped.items(): assert repr(str(folder/name)) in reason, reason   # each names its file
    assert "truncated" in skipped["cut.wav"] and "empty" in skipped["empty.flac"]
    assert report["ignored"] == [{"file": "readme.txt", "reason": "not an audio file name"}]
    assert cache.names == [f"tone{i:02d}.wav" for i in range(4)] and report["n_cached"] == 4
    y, _ = load_audio(folder/"tone03.wav")
    assert np.abs(cache.doc(3) - y).max() < 1e-4
    (folder/"empty.flac").unlink()   # fixing the corpus rebuilds the cache without that entry
    assert "empty.flac" not in dict(AudioCache.for_corpus(folder, folder=tmp_path/"cache", progress=False).skipped)


def test_same_seed_epoch_index_gives_the_same_crop_in_a_fresh_process(tmp_path):
    folder = _tones(tmp_path/"corpus", 6, seconds=0.7)
    cache = AudioCache.for_corpus(folder, folder=tmp_path/"cache", workers=1, progress=False)
    keys = [(7, 0, 0), (7, 0, 1), (7, 3, 1), (8, 3, 1), (7, 2, 11)]
    code = f"""
import hashlib, json
from kelly.audio_datasets import AudioAugmentation, AudioAugmentConfig, AudioCache, RandomCrops
cache = AudioCache({str(cache.folder)!r})
cfg = AudioAugmentConfig(mix=0.5, pitch_shift=2)
out = [hashlib.sha256(RandomCrops(cache, {CROP}, seed=s, crops_per_epoch=20, augment=AudioAugmentation(cfg, seed=s)).item(i, e)[0].tobytes()).hexdigest()
       for s, e, i in {keys!r}]
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads(r.stdout.strip().splitlines()[-1])
    from kelly.audio_datasets import AudioAugmentConfig
    cfg = AudioAugmentConfig(mix=0.5, pitch_shift=2)
    # indices drawn in reverse order in this process: nothing carries over from one draw to the next
    ours = [hashlib.sha256(RandomCrops(cache, CROP, seed=s, crops_per_epoch=20, augment=AudioAugmentation(cfg, seed=s)).item(i, e)[0].tobytes()).hexdigest()
            for s, e, i in reversed(keys)][::-1]
    assert ours == theirs
    assert len(set(ours)) == len(keys)   # another index, epoch or seed gives another crop


def test_two_torchrun_ranks_see_disjoint_shards(tmp_path):
    folder = _tones(tmp_path/"corpus", 12)
    out = tmp_path/"out"; out.mkdir()
    script = tmp_path/"ranks.py"
    script.write_text(f"""
import json, os
from kelly.core import setup_logging
from kelly.audio_datasets import AudioDataConfig, audio_dataloaders
setup_logging("INFO")
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
cfg = AudioDataConfig(length={CROP}, bs=3, valid_frac=0.25, crops_per_epoch=40)
dls = audio_dataloaders({str(folder)!r}, cfg, rank, world, cache_folder={str(tmp_path/'cache')!r}, workers=1, progress=False)
train = dls.train
idxs = train.get_idxs()
locs = [list(map(int, train.dataset.locate(i, 0))) for i in idxs]
batches = [xb.numpy().tolist() for xb, _ in train]
valid = dls.valid.get_idxs()
json.dump({{"idxs": idxs, "locs": locs, "n_batches": len(batches), "first": batches[0][0][:50], "valid": valid,
            "n_valid": len(dls.valid.dataset), "epoch": train.epoch}}, open({str(out)!r} + f"/rank{{rank}}.json", "w"))
""")
    r = subprocess.run([tool("torchrun"), "--standalone", "--nproc_per_node=2", str(script)], capture_output=True, text=True,
                       timeout=WAIT_S, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("building audio cache") == 1, r.stderr[-4000:]   # one rank built it, the other waited and reused it
    r0, r1 = (json.loads((out/f"rank{k}.json").read_text()) for k in (0, 1))
    assert set(r0["idxs"]).isdisjoint(r1["idxs"])
    assert sorted(r0["idxs"] + r1["idxs"]) == list(range(40 - 40 % 6))   # whole global batches of 2 ranks x 3
    assert r0["idxs"][:3] == [0, 1, 2] and r1["idxs"][:3] == [3, 4, 5]     # rank r takes block r of each global batch
    assert r0["n_batches"] == r1["n_batches"] == 40 // 2 // 3   # equal steps on every rank, last partial batch dropped
    assert r0["first"] != r1["first"]
    assert r0["epoch"] == r1["epoch"] == 1
    assert sorted(set(r0["valid"]) | set(r1["valid"])) == list(range(r0["n_valid"]))   # validation covered, wrapping around
    assert len(r0["valid"]) == len(r1["valid"])


def test_concurrent_renderers_share_one_render(home, tmp_path):
    bach_chorales(limit=2, progress=False)
    folder = tmp_path/"audio"
    code = ("from kelly.core import setup_logging; setup_logging('INFO'); from kelly.audio_datasets import bach_chorales_audio; "
            f"bach_chorales_audio(2, folder={str(folder)!r}, workers=1, progress=False)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=WAIT_S)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum(log.count("rendering 2 of 2 Bach chorales") for log in logs) == 1, logs   # one rendered, the other waited
    assert _manifest(folder)["complete"] and len(_ok(folder)) == 2


def test_cache_build_killed_then_rebuilt(tmp_path):
    folder = tmp_path/"corpus"
    for i in range(1500):   # many short files: the build takes long enough to be caught mid-way
        save_audio(folder/f"c{i // 500}"/f"{i:04d}.wav", np.full(1600, (i % 200 - 100) / 200), SR)
    cache_dir = tmp_path/"cache"
    code = f"from kelly.audio_datasets import AudioCache; AudioCache.for_corpus({str(folder)!r}, folder={str(cache_dir)!r}, workers=2, progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        def writing(): return any(p.stat().st_size > 0 for p in cache_dir.glob(".samples-*.tmp")) if cache_dir.is_dir() else False
        while not writing() and proc.poll() is None and time.monotonic() < deadline: time.sleep(0.01)
        assert proc.poll() is None, "the cache build finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)   # the builder and its decoding workers
    finally:
        if proc.poll() is None: os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (cache_dir/"manifest.json").exists()   # the manifest comes last: no half-built cache is ever published
    with pytest.raises(DatasetError, match="no manifest.json"): AudioCache(cache_dir)
    cache = AudioCache.for_corpus(folder, folder=cache_dir, workers=2, progress=False)
    assert len(cache) == 1500 and cache.skipped == [] and cache.n_samples == 1500 * 1600
    assert not list(cache_dir.glob(".*.tmp"))   # the killed build's temporary file is gone
    i = 1234
    assert np.allclose(cache.doc(cache.names.index(f"c{i // 500}/{i:04d}.wav")), (i % 200 - 100) / 200, atol=1e-4)
