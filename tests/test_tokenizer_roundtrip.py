"""Round trips on whole corpora: every Bach chorale (music21's corpus, built once into KELLY_HOME), music21's test
MIDI files, and written pop and piano-performance files, under many tokenizer configs; corpus tokenization in a pool;
a folder mixing good, corrupt and non-MIDI files."""
from pathlib import Path

import music21
import numpy as np
import pytest

from kelly.datasets import bach_chorales
from kelly.midi import Music, load_midi, repair, save_midi
from kelly.test_utils import synthetic_piano_midi, synthetic_pop_midi
from kelly.tokenizer import Tokenizer, TokenizerConfig, check_roundtrip, midi_files, tokenize_files

PRIMITIVE = sorted((Path(music21.__file__).parent/"midi"/"testPrimitive").glob("*.mid"))
N_BACH_PER_CONFIG = 40  # chorales per non-default config (the default config gets all of them)

CONFIG_CHANGES = ["special_tokens_at_end=true", "use_programs=false", "use_tempos=false", "use_time_signatures=false",
                  "velocity_bins=0", "velocity_bins=8", "grid=[4, 3]", "grid=[4]", "grid=[12, 8]", "tpq=960",
                  "pitch_range=[36, 96]", "drum_pitch_range=[35, 81]", "max_duration=4", "fine_duration_until=1",
                  "time_signatures=[4/4, 3/4]", "tempo_bins=4"]


@pytest.fixture(scope="module")
def bach(kelly_home) -> list[Path]:
    folder = bach_chorales(folder=kelly_home/"corpora"/"bach_chorales", progress=False)
    files = midi_files(folder)
    assert len(files) > 350, len(files)
    return files


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> list[Path]:
    "Pop songs and piano performances written with miditoolkit (several seeds)."
    d = tmp_path_factory.mktemp("written")
    paths = []
    for seed in range(4):
        for name, make in (("pop", synthetic_pop_midi), ("piano", synthetic_piano_midi)):
            p = d/f"{name}{seed}.mid"
            make(seed=seed).dump(str(p))
            paths.append(p)
    return paths


def test_every_bach_chorale_roundtrips(bach):
    report = check_roundtrip(bach, Tokenizer(), workers=2)
    print(report.summary())
    assert report.failed == [] and report.imperfect == []
    assert report.matched == report.total > 100_000


def test_music21_test_files_roundtrip():
    report = check_roundtrip(PRIMITIVE, Tokenizer(), workers=1)
    assert report.n_files == 21 and report.failed == [] and report.matched == report.total > 10_000


def test_written_pop_and_piano_roundtrip(written):
    report = check_roundtrip(written, Tokenizer(), workers=1)
    assert report.failed == [] and report.matched == report.total
    assert any(load_midi(p).tracks[0].is_drum for p in written)


@pytest.mark.parametrize("change", CONFIG_CHANGES)
def test_roundtrip_under_every_option(change, bach, written):
    "Each option changes the vocabulary; the round trip (notes, tempo map, metre) must stay exact."
    tok = Tokenizer(TokenizerConfig().override(change))
    for p in bach[:N_BACH_PER_CONFIG] + PRIMITIVE + written:
        m = load_midi(p)
        ids, _ = tok.encode_with_report(m)
        assert tok.grammar.is_valid(ids), (change, p.name)
        back, rep = tok.decode_with_report(ids)
        assert rep.n_skipped == 0, (change, p.name, rep)
        assert back == tok.quantize(m)[0], (change, p.name)


def test_decoded_music_survives_a_midi_file(bach, written, tmp_path):
    """encode -> decode -> save -> load keeps every note, the tempo map and the metre. Decoding merges the voices of
    one program into one track; where two voices sound the same key at once (chorale unisons), MIDI pairs note-offs
    first in, first out, which can swap their ends: there onsets, pitches, velocities and programs are compared.
    Files without such overlaps (the pop songs) must come back whole."""
    tok = Tokenizer()
    exact = 0
    for p in bach[:40] + written:
        m = tok.decode(tok.encode_file(p))
        back = load_midi(save_midi(m, tmp_path/p.name))
        assert back.tempos.tolist() == m.tempos.tolist() and back.time_signatures.tolist() == m.time_signatures.tolist()
        fix = repair(m)[1]
        if fix.overlaps_trimmed == 0 and fix.duplicates_dropped == 0:
            assert np.array_equal(back.notes(), m.notes()), p.name
            exact += 1
        else:
            key = ["start", "pitch", "velocity", "program"]
            assert np.array_equal(np.sort(back.notes()[key]), np.sort(m.notes()[key])), p.name
    assert exact >= 4, exact


def test_empty_midi_file(tmp_path):
    tok = Tokenizer()
    empty = save_midi(Music(), tmp_path/"empty.mid")
    ids = tok.encode_file(empty)
    assert tok.tokens(ids) == ["BOS_None", "EOS_None"] and tok.grammar.is_valid(ids)
    back = tok.decode(ids)
    assert back.n_notes == 0
    again = load_midi(save_midi(back, tmp_path/"again.mid"))
    assert again.n_notes == 0


def test_tokenize_files_pool_matches_one_process(bach):
    tok = Tokenizer()
    files = bach[:60]
    pooled = list(tokenize_files(tok, files, workers=2))
    single = list(tokenize_files(tok, files, workers=1))
    assert [p for p, _, _ in pooled] == files
    for (p, a, ea), (_, b, eb) in zip(pooled, single):
        assert ea is None and eb is None and np.array_equal(a, b), p
        assert a[0] != tok.bos_id  # no BOS/EOS by default: the token cache adds them per window


def test_mixed_folder(tmp_path, written):
    "Good, corrupt and non-MIDI files: the good ones round-trip, the others are named with a reason, nothing raises."
    d = tmp_path/"mixed"
    (d/"deeper").mkdir(parents=True)
    for p in written[:3]: (d/p.name).write_bytes(p.read_bytes())
    (d/"deeper"/"test05.MIDI").write_bytes(PRIMITIVE[4].read_bytes())
    good = written[0].read_bytes()
    (d/"truncated.mid").write_bytes(good[: len(good) // 3])
    (d/"empty.mid").write_bytes(b"")
    (d/"essay.mid").write_text("Dear reader, this is not music.\n")
    flipped = bytearray(good); flipped[60] = 0xF5; (d/"flipped.mid").write_bytes(bytes(flipped))
    (d/"readme.txt").write_text("not MIDI, not named like MIDI")
    report = check_roundtrip(d, Tokenizer(), workers=2)
    failed = {Path(p).name: reason for p, reason in report.failed}
    assert set(failed) == {"truncated.mid", "empty.mid", "essay.mid", "flipped.mid"}, failed
    for name, reason in failed.items(): assert name in reason
    assert report.n_files == 8 and report.matched == report.total > 0
    lines = report.lines()
    assert lines[0] == f"roundtrip: {report.matched}/{report.total} notes (100.00%) in 4 of 8 file(s); 4 failed, 0 skipped"   # failures counted
    assert len(lines) == 5 and all(str(d) in line for line in lines[1:])
