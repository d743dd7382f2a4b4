"""The `kelly` console command end to end, in real subprocesses."""
import os
import shutil
import subprocess
from pathlib import Path

import music21
import miditoolkit

from conftest import ROOT, tool

TEST_PRIMITIVES = Path(music21.__file__).parent/"midi"/"testPrimitive"


def kelly(*args, home, timeout=600):
    env = {**os.environ, "KELLY_HOME": str(home)}
    return subprocess.run([tool("kelly"), *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def test_tokenize_check_names_corrupt_files(tmp_path):
    folder = tmp_path/"mixed"; folder.mkdir()
    for p in sorted(TEST_PRIMITIVES.glob("*.mid")): shutil.copy(p, folder/p.name)
    midi = miditoolkit.MidiFile(ticks_per_beat=480)
    midi.instruments.append(miditoolkit.Instrument(program=0, name="piano"))
    midi.instruments[0].notes.append(miditoolkit.Note(velocity=100, pitch=60, start=0, end=480))
    midi.dump(str(tmp_path/"one.mid"))
    good = (tmp_path/"one.mid").read_bytes()
    assert good.count(bytes([0x90, 60, 100])) == 1
    (folder/"flipped.mid").write_bytes(good.replace(bytes([0x90, 60, 100]), bytes([0x90, 60, 0xC8])))  # velocity byte > 127
    (folder/"cut.mid").write_bytes(good[: len(good) // 2])
    (folder/"readme.mid").write_text("this is text")
    r = kelly("tokenize", "--check", folder, home=tmp_path/"home")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("roundtrip: ") and lines[0].endswith("notes (100.00%)"), lines[0]
    for name in ("flipped.mid", "cut.mid", "readme.mid"):
        assert sum(name in l for l in lines[1:]) == 1, f"{name} not reported once:\n{r.stdout}"
    assert "Traceback" not in r.stderr


def test_tokenize_builds_cache_and_reports(tmp_path):
    folder = tmp_path/"m"; folder.mkdir()
    for p in sorted(TEST_PRIMITIVES.glob("*.mid"))[:4]: shutil.copy(p, folder/p.name)
    (folder/"bad.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01")
    r = kelly("tokenize", folder, "--cache", tmp_path/"cache", home=tmp_path/"home")
    assert r.returncode == 0, r.stderr
    assert "in 4 files" in r.stdout and "skipped 1 file(s)" in r.stdout
    assert "bad.mid" in (tmp_path/"cache"/"report.json").read_text()


def test_errors_are_one_line(tmp_path):
    r = kelly("tokenize", tmp_path/"missing", home=tmp_path/"home")
    assert r.returncode == 1 and "missing" in r.stderr and "Traceback" not in r.stderr
    r = kelly("tokenize", tmp_path, "--velocity_bins", "lots", home=tmp_path/"home")
    assert r.returncode == 1 and "velocity_bins" in r.stderr and "Traceback" not in r.stderr
