"""kelly's music metrics agree with MusPy's own (`muspy.metrics`) on real MIDI files.

MusPy is a test-only dependency (the dev extras). These tests skip when it is missing, unless
KELLY_REQUIRE_MUSPY is set (CI sets it), in which case a missing MusPy is a failure."""
import math
import os
from pathlib import Path

import pytest

from kelly.datasets import bach_chorales
from kelly.midi import load_midi, to_miditoolkit
from kelly.music_metrics import MUSIC_METRICS, METERS, SCALES, drum_in_pattern_rate, measure_ticks, music_metrics, pitch_in_scale_rate
from kelly.test_utils import synthetic_pop_midi, synthetic_piano_midi

if os.environ.get("KELLY_REQUIRE_MUSPY"): import muspy
else: muspy = pytest.importorskip("muspy", reason="muspy is a test-only dependency (pip install -e '.[dev]')")

N_CHORALES = 24  # real pieces compared metric by metric


def to_muspy(music):
    "The same notes as a muspy.Music (one muspy track per kelly track, ticks kept)."
    tracks = [muspy.Track(program=t.program, is_drum=t.is_drum, name=t.name,
                          notes=[muspy.Note(time=int(s), pitch=int(p), duration=int(d), velocity=int(v))
                                 for s, p, d, v in zip(t.start, t.pitch, t.duration, t.velocity)])
              for t in music.tracks]
    return muspy.Music(resolution=music.tpq, tracks=tracks)


def muspy_values(mp, measure):
    "MusPy's value of every metric of `MUSIC_METRICS`."
    m = muspy.metrics
    return {"pitch_range": m.pitch_range(mp), "n_pitches_used": m.n_pitches_used(mp), "n_pitch_classes_used": m.n_pitch_classes_used(mp),
            "polyphony": m.polyphony(mp), "polyphony_rate": m.polyphony_rate(mp), "pitch_entropy": m.pitch_entropy(mp),
            "pitch_class_entropy": m.pitch_class_entropy(mp), "scale_consistency": m.scale_consistency(mp),
            "empty_beat_rate": m.empty_beat_rate(mp), "groove_consistency": m.groove_consistency(mp, measure),
            "drum_pattern_consistency": m.drum_pattern_consistency(mp)}


def assert_agree(ours: dict, theirs: dict, where: str):
    for k in MUSIC_METRICS:
        a, b = ours[k], float(theirs[k])
        if math.isnan(b): assert math.isnan(a), f"{where}: {k} kelly {a}, muspy nan"
        else: assert a == pytest.approx(b, rel=1e-9, abs=1e-12), f"{where}: {k} kelly {a}, muspy {b}"


@pytest.fixture(scope="module")
def chorales(kelly_home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KELLY_HOME", str(kelly_home))
        return sorted(bach_chorales(N_CHORALES, progress=False).glob("*.mid"))


def _compare_file(path: Path):
    music = load_midi(path)
    ours = vars(music_metrics(music))
    theirs = muspy_values(to_muspy(music), measure_ticks(music))
    assert_agree(ours, theirs, f"{path.name} (kelly's notes)")
    return music, ours


def test_metrics_agree_with_muspy_on_bach_chorales(chorales):
    assert len(chorales) == N_CHORALES
    for path in chorales: _compare_file(path)


def test_metrics_agree_with_muspy_reading_the_file_itself(chorales):
    "MusPy's own MIDI reader gives the same numbers: the note tables agree, not only the formulas."
    for path in chorales[:8]:
        music = load_midi(path)
        ours = vars(music_metrics(music))
        assert_agree(ours, muspy_values(muspy.read_midi(path), measure_ticks(music)), f"{path.name} (muspy.read_midi)")


def test_metrics_agree_with_muspy_with_drums_and_expressive_timing(tmp_path):
    "A pop song with drums, triplets and metre changes, and an unquantized piano performance."
    for i, mf in enumerate([synthetic_pop_midi(3, n_bars=16), synthetic_pop_midi(4, n_bars=12, tpq=384), synthetic_piano_midi(1, n_notes=300)]):
        path = tmp_path/f"piece-{i}.mid"
        mf.dump(str(path))
        music, ours = _compare_file(path)
        mp = to_muspy(music)
        for mode in SCALES:
            for root in range(12):
                assert pitch_in_scale_rate(music, root, mode) == pytest.approx(muspy.metrics.pitch_in_scale_rate(mp, root, mode))
        for meter in METERS:
            a, b = drum_in_pattern_rate(music, meter), muspy.metrics.drum_in_pattern_rate(mp, meter)
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)
