"""kelly.audio end to end: real FluidSynth renders of real chorales, real bad files, real missing tools."""
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kelly.audio import (AudioError, check_audio_folder, load_audio, midi_f0, render_midi, render_music, save_audio,
                         ticks_to_seconds, track_pitch, write_pitch_csv, plot_pitch)
from kelly.midi import Music, load_midi



@pytest.fixture(scope="module")
def chorales(tmp_path_factory):
    "Two Bach chorales as MIDI, built by kelly.datasets into a temporary KELLY_HOME."
    mp = pytest.MonkeyPatch()
    mp.setenv("KELLY_HOME", str(tmp_path_factory.mktemp("kelly_home")))
    from kelly.datasets import bach_chorales
    folder = bach_chorales(limit=2, progress=False)
    yield sorted(folder.glob("*.mid"))
    mp.undo()


def test_render_chorale_loads_in_librosa(chorales, tmp_path):
    import librosa
    mid = chorales[0]
    wav = render_midi(mid, tmp_path/"out"/"chorale.wav")
    y, sr = librosa.load(wav, sr=None)
    music = load_midi(mid)
    end = float(ticks_to_seconds(music, music.end_tick))
    assert sr == 16000
    assert end <= len(y) / sr < end + 4, (len(y) / sr, end)
    assert np.sqrt(np.mean(y ** 2)) > 0.01
    assert oct(os.stat(wav).st_mode & 0o777) != "0o600"  # not the temp file's private mode
    assert not list((tmp_path/"out").glob(".*"))  # no temp file left behind
    flac = render_midi(mid, tmp_path/"chorale.flac", reverb=True, chorus=True)
    assert sf.info(flac).format == "FLAC"


def test_rendered_voice_pitch_matches_its_notes(chorales, tmp_path):
    "A soprano rendered as a flute is tracked back to its MIDI notes (and written as CSV and PNG)."
    music = load_midi(chorales[1])
    sop = next(t for t in music.tracks if t.name.strip().lower() == "soprano").copy()
    sop.program = 73
    voice = Music(music.tpq, [sop], music.tempos, music.time_signatures)
    y, sr = load_audio(render_music(voice, tmp_path/"flute.wav"), duration=20)
    tr = track_pitch(y, sr=sr)
    ref, ref_voiced = midi_f0(voice, tr.times.numpy())
    hit = ref_voiced & tr.voiced.numpy()
    rpa = (np.abs(1200 * np.log2(tr.f0.numpy()[hit] / ref[hit])) < 50).sum() / ref_voiced.sum()
    assert rpa > 0.9, rpa
    csv = write_pitch_csv(tr, tmp_path/"f0.csv")
    assert len(csv.read_text().splitlines()) == 1 + len(tr.times)
    plot_pitch(y, sr, tr, tmp_path/"f0.png")
    assert (tmp_path/"f0.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_fluidsynth_names_the_install_command(chorales, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without fluidsynth
    with pytest.raises(AudioError, match="apt-get install fluidsynth fluid-soundfont-gm"):
        render_midi(chorales[0], tmp_path/"x.wav")
    assert not (tmp_path/"x.wav").exists()
    out = render_midi(chorales[0], tmp_path/"sine.wav", synth="sine")  # the explicit choice still works
    assert load_audio(out)[0].std() > 0.01


def test_missing_soundfont(chorales, tmp_path, monkeypatch):
    monkeypatch.setenv("KELLY_SOUNDFONT", str(tmp_path/"nowhere.sf2"))
    with pytest.raises(AudioError, match=r"nowhere\.sf2.*KELLY_SOUNDFONT not found.*brew install fluid-synth"):
        render_midi(chorales[0], tmp_path/"x.wav")


def test_corrupt_midi_is_an_audio_error(tmp_path):
    bad = tmp_path/"bad.mid"
    bad.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0MTrk\x00\x00\x10\x00\x00\x90")
    with pytest.raises(AudioError, match=repr(str(bad)).replace("\\", "\\\\")):
        render_midi(bad, tmp_path/"bad.wav", synth="sine")
    assert not (tmp_path/"bad.wav").exists()


def _good_wav(path: Path) -> Path:
    sf.write(path, (0.5 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    return path


BAD_FILES = {  # name -> (how to make it, what the message says)
    "empty.wav": (lambda p: p.write_bytes(b""), "file is empty"),
    "text.wav": (lambda p: p.write_text("not audio at all\n" * 20), "not audio that libsndfile can read"),
    "truncated.wav": (lambda p: p.write_bytes(_good_wav(p).read_bytes()[:9000]), "truncated"),
    "garbage.flac": (lambda p: p.write_bytes(b"fLaC" + os.urandom(3000)), "not audio"),
    "missing.wav": (lambda p: None, "file not found"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_raise_audio_error_naming_the_file(tmp_path, name):
    make, reason = BAD_FILES[name]
    p = tmp_path/name
    make(p)
    with pytest.raises(AudioError) as e:
        load_audio(p)
    assert str(e.value).startswith(repr(str(p)) + ": ")
    assert reason in str(e.value)


def test_unreadable_file(tmp_path):
    p = _good_wav(tmp_path/"locked.wav")
    p.chmod(0)
    try:
        if os.access(p, os.R_OK): pytest.skip("running as root: a chmod 000 file is still readable")
        with pytest.raises(AudioError, match="cannot read: Permission denied"):
            load_audio(p)
    finally:
        p.chmod(0o644)


def test_check_folder_reports_every_file(tmp_path):
    _good_wav(tmp_path/"a.wav")
    (tmp_path/"sub").mkdir()
    save_audio(tmp_path/"sub"/"b.flac", np.zeros((2, 800), np.float32) + 0.1, 8000)
    for name in ("empty.wav", "text.wav", "truncated.wav"):
        BAD_FILES[name][0](tmp_path/name)
    (tmp_path/"notes.txt").write_text("ignored: not an audio suffix")
    report = check_audio_folder(tmp_path)
    assert [s.path.name for s in report.ok] == ["a.wav", "b.flac"]
    assert [(s.sample_rate, s.channels) for s in report.ok] == [(16000, 1), (8000, 2)]
    assert sorted(s.path.name for s in report.failed) == ["empty.wav", "text.wav", "truncated.wav"]
    assert "2 of 5 audio files load" in report.summary()
    with pytest.raises(AudioError, match="not found"):
        check_audio_folder(tmp_path/"nope")


def test_failed_save_keeps_the_old_file(tmp_path):
    p = save_audio(tmp_path/"x.wav", np.zeros(100, np.float32), 16000)
    before = p.read_bytes()
    with pytest.raises(AudioError, match="NaN"):
        save_audio(p, np.array([0.0, np.nan], np.float32), 16000)
    with pytest.raises(AudioError, match="shape"):
        save_audio(p, np.zeros((1, 2, 3), np.float32), 16000)
    assert p.read_bytes() == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["x.wav"]
