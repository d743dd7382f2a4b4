"""Corrupt, truncated and non-MIDI files: kelly.midi raises MidiError naming the file, never anything else.

Files are corrupted on purpose from music21's bundled test MIDI files (and a few Bach chorales when the
corpus is built): truncated at many points, single bytes flipped, bytes inserted and deleted, text renamed .mid,
an empty file. The compiled byte checker must agree with its plain-Python twin on every one of them.
"""
import io
import random
import struct
from pathlib import Path

import mido
import music21
import numpy as np
import pytest
import symusic

from kelly.midi import (MidiError, Music, _scan_track, _scan_track_py, load_midi, parse_midi, repair, save_midi,
                        scan_midi)
from kelly.test_utils import synthetic_piano_midi, synthetic_pop_midi
from kelly.core import quoted

PRIMITIVE = sorted((Path(music21.__file__).parent/"midi"/"testPrimitive").glob("*.mid"))
N_FLIPS_PER_FILE = 150  # 21 files x 150 = 3,150 flipped files
SEED = 1234


def _corruptions(data: bytes, rng: random.Random, n: int):
    "Yield (label, corrupted bytes): flips, truncations, insertions and deletions."
    for _ in range(n):
        i = rng.randrange(len(data))
        kind = rng.randrange(4)
        if kind == 0:
            b = bytearray(data); b[i] = rng.randrange(256); yield f"flip@{i}", bytes(b)
        elif kind == 1:
            yield f"truncate@{i}", data[:i]
        elif kind == 2:
            yield f"insert@{i}", data[:i] + bytes([rng.randrange(256)]) + data[i:]
        else:
            yield f"delete@{i}", data[:i] + data[i + 1:]


def _load_or_midierror(data: bytes, name: str):
    "parse_midi must return Music or raise MidiError whose message starts with the file name."
    try:
        return parse_midi(data, name)
    except MidiError as e:
        assert str(e).startswith(quoted(name) + ":"), str(e)
        return None


def test_every_corruption_is_music_or_midierror():
    rng = random.Random(SEED)
    n_files = n_refused = 0
    for p in PRIMITIVE:
        data = p.read_bytes()
        for label, bad in _corruptions(data, rng, N_FLIPS_PER_FILE):
            m = _load_or_midierror(bad, f"{p.name}[{label}]")
            n_files += 1
            n_refused += m is None
            if m is not None: assert isinstance(m, Music)
    assert n_files == len(PRIMITIVE) * N_FLIPS_PER_FILE
    assert 0.3 * n_files < n_refused < n_files, (n_refused, n_files)  # many corruptions are still valid MIDI


def _track_bodies(data: bytes) -> list[tuple[int, int]]:
    "(start, end) of every MTrk chunk body of a valid file."
    return [(c[0], c[1]) for c in scan_midi(data).chunks]


def test_compiled_and_plain_checker_agree():
    "Flip bytes (same length, so the original chunk bounds still apply) and walk every track with both versions."
    rng = random.Random(SEED + 1)
    n, codes = 0, {}
    for p in PRIMITIVE:
        data = p.read_bytes()
        if len(data) > 20000: continue  # the plain walk is slow; the big files add nothing new here
        bodies = _track_bodies(data)
        for _ in range(60):
            b = bytearray(data); b[rng.randrange(14, len(b))] = rng.randrange(256); bad = bytes(b)
            for start, end in bodies:
                res = []
                for fn, buf in ((_scan_track, np.frombuffer(bad, np.uint8)), (_scan_track_py, bad)):
                    on = np.zeros((16, 128), np.int32)
                    res.append((tuple(int(v) for v in fn(buf, start, end, on)), on.copy()))
                assert res[0][0] == res[1][0] and np.array_equal(res[0][1], res[1][1]), p.name
                codes[res[0][0][0]] = codes.get(res[0][0][0], 0) + 1
                n += 1
    assert n > 1000
    assert {0, -1, -4, -5} <= set(codes), codes  # clean ends and several kinds of error were compared


def test_data_bytes_above_127_are_refused_like_mido_strict():
    "Wherever mido's strict parser reports a data byte above 127, kelly refuses the file too."
    rng = random.Random(SEED + 2)
    n_checked = 0
    for p in PRIMITIVE:
        data = p.read_bytes()
        for _ in range(40):
            b = bytearray(data); b[rng.randrange(14, len(b))] = rng.randrange(128, 256); b = bytes(b)
            try:
                mido.MidiFile(file=io.BytesIO(b), clip=False)
                continue
            except Exception as e:
                if "data byte must be in range" not in str(e): continue
            n_checked += 1
            with pytest.raises(MidiError):
                parse_midi(b, p.name)
    assert n_checked > 20, n_checked


def test_files_on_disk(tmp_path):
    good = tmp_path/"good.mid"
    synthetic_pop_midi(seed=3).dump(str(good))
    data = good.read_bytes()
    cases = {
        "empty.mid": b"",
        "text.mid": b"This is a text file renamed to .mid\n" * 20,
        "truncated.mid": data[: len(data) // 2],
        "header_only.mid": data[:14],
        "flipped_status.mid": data[:40] + b"\xf4" + data[41:],
        "png.mid": b"\x89PNG\r\n\x1a\n" + bytes(100),
    }
    for name, content in cases.items():
        (tmp_path/name).write_bytes(content)
        with pytest.raises(MidiError) as e:
            load_midi(tmp_path/name)
        assert str(tmp_path/name) in str(e.value), str(e.value)
    with pytest.raises(MidiError, match="cannot read"):
        load_midi(tmp_path/"does_not_exist.mid")
    with pytest.raises(MidiError, match="is a folder, not a file"):
        load_midi(tmp_path)  # a folder: named as such (the fault work's clearer message)
    assert load_midi(good).n_notes > 0


def test_symusic_alone_accepts_what_kelly_refuses():
    "The reason the byte check exists: symusic loads these without complaint."
    body = b"\x00\xa0\x3c\xc8\x00\x90\x3c\x40\x60\x80\x3c\x00\x00\xff\x2f\x00"   # aftertouch value 200
    data = b"MThd" + struct.pack(">IHHH", 6, 1, 1, 480) + b"MTrk" + len(body).to_bytes(4, "big") + body
    symusic.Score.from_midi(data)
    with pytest.raises(MidiError, match="above 127"):
        parse_midi(data)
    cut = data[:14]  # the header promises a track that is not there
    assert symusic.Score.from_midi(cut).note_num() == 0
    with pytest.raises(MidiError, match="truncated"):
        parse_midi(cut)


def test_piano_fixture_roundtrips_through_a_file(tmp_path):
    "load -> repair -> save -> load gives the repaired notes back exactly."
    p = tmp_path/"piano.mid"
    synthetic_piano_midi(seed=5).dump(str(p))
    fixed, report = repair(load_midi(p))
    assert report.overlaps_trimmed > 0
    back = load_midi(save_midi(fixed, tmp_path/"fixed.mid"))
    assert np.array_equal(back.notes(), fixed.notes())


def test_plain_python_checker_loads_the_same(monkeypatch):
    "Without numba, scan_midi runs the plain-Python walk over bytes: same results on every test file."
    import kelly.midi as km
    compiled = {p.name: (km.scan_midi(p.read_bytes()), km.load_midi(p)) for p in PRIMITIVE}
    monkeypatch.setattr(km, "_scan_track", km._scan_track_py)
    monkeypatch.setattr(km, "_SCAN_COMPILED", False)
    for p in PRIMITIVE:
        scan, music = compiled[p.name]
        assert km.scan_midi(p.read_bytes()) == scan
        assert km.load_midi(p) == music
    with pytest.raises(MidiError, match="above 127"):
        body = b"\x00\xa0\x3c\xc8\x00\xff\x2f\x00"
        km.parse_midi(b"MThd" + struct.pack(">IHHH", 6, 1, 1, 480) + b"MTrk" + len(body).to_bytes(4, "big") + body)
