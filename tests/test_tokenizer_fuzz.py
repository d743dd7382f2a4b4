"""decode never raises: 10,000+ random id sequences per the issue, plus grammar-shaped ones, checked against the
token-by-token reference decoder, under several vocabulary layouts."""
import numpy as np
import pytest
import torch

from kelly.midi import MIDI_MAX, Music, parse_midi, save_midi, from_miditoolkit
from kelly.test_utils import synthetic_pop_midi
from kelly.tokenizer import DecodeReport, TokenType, Tokenizer, TokenizerConfig, _decode_reference

N_RANDOM = 10_000  # uniform random sequences per configuration (the issue asks for at least 10,000)
N_GRAMMAR = 1_000  # sequences drawn from the type grammar (dense in notes) per configuration
N_REFERENCE = 500  # of those, how many are also decoded by the slow reference
MAX_LEN = 300

CONFIGS = {
    "default": TokenizerConfig(),
    "specials_at_end": TokenizerConfig(special_tokens_at_end=True),
    "lean": TokenizerConfig(use_programs=False, use_tempos=False, use_time_signatures=False, grid=(4, 3), velocity_bins=0),
}


def _grammar_walk(tok: Tokenizer, rng: np.random.Generator, n: int) -> list[int]:
    """A sequence whose token TYPES follow the grammar. Values are random, except that positions mostly rise within
    a bar (so that many notes decode); some still go back or overflow the bar, which decode must skip."""
    by_type = [np.flatnonzero(tok.type_of == k) for k in range(len(TokenType))]
    has = np.array([len(x) > 0 for x in by_type])
    has[TokenType.EOS] = False  # the sequence ends when we say so
    pos_ids = by_type[TokenType.POSITION]
    ids, t, last_pos = [tok.bos_id], TokenType.BOS, -1
    for _ in range(n):
        nxt = np.flatnonzero(tok.grammar.allowed[t] & has)
        if not len(nxt): break
        t = int(rng.choice(nxt))
        if t == TokenType.BAR: last_pos = -1
        if t == TokenType.POSITION and rng.random() < 0.9 and last_pos + 1 < len(pos_ids) // 3:
            last_pos = int(rng.integers(last_pos + 1, len(pos_ids) // 3))  # rising, and inside even a short bar
            ids.append(int(pos_ids[last_pos]))
        else:
            ids.append(int(rng.choice(by_type[t])))
    return ids + ([tok.eos_id] if rng.random() < 0.5 else [])


def _check_music(tok: Tokenizer, m: Music, rep: DecodeReport, n_ids: int):
    assert isinstance(m, Music) and m.tpq == tok.config.tpq
    assert rep.n_notes == m.n_notes and 0 <= rep.n_skipped <= n_ids
    for t in m.tracks:
        assert t.n_notes > 0
        assert np.all(t.duration > 0) and np.all(t.start >= 0)
        assert np.all((t.velocity >= 1) & (t.velocity <= MIDI_MAX)) and np.all((t.pitch >= 0) & (t.pitch <= MIDI_MAX))
    assert np.all(np.diff(m.tempos["tick"]) > 0) if len(m.tempos) > 1 else True


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_ids_never_raise(name):
    tok = Tokenizer(CONFIGS[name])
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, MAX_LEN, N_RANDOM)
    total_notes = 0
    for n in lengths:
        ids = rng.integers(-50, tok.vocab_size + 50, n)  # in and out of the vocabulary
        m, rep = tok.decode_with_report(ids)
        _check_music(tok, m, rep, n)
        total_notes += rep.n_notes
    assert len(lengths) >= 10_000


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grammar_shaped_ids_match_reference(name):
    tok = Tokenizer(CONFIGS[name])
    rng = np.random.default_rng(1)
    n_notes = 0
    for i in range(N_GRAMMAR):
        ids = _grammar_walk(tok, rng, int(rng.integers(0, MAX_LEN)))
        if i % 3 == 0:  # sprinkle garbage into some of them
            k = int(rng.integers(0, 5))
            at = rng.integers(0, len(ids) + 1, k)
            ids = np.insert(np.array(ids), at, rng.integers(-5, tok.vocab_size + 5, k)).tolist()
        m, rep = tok.decode_with_report(ids)
        _check_music(tok, m, rep, len(ids))
        n_notes += rep.n_notes
        if i < N_REFERENCE:
            notes, tempos, _, misplaced = _decode_reference(tok, ids)
            fast = sorted(map(tuple, m.notes()[["start", "duration", "pitch", "velocity", "program"]].tolist()))
            assert fast == notes, ids
            assert rep.misplaced + rep.unfinished == misplaced, ids
            assert m.tempos["tick"].tolist() == [tk for tk, _ in tempos]
    assert n_notes > 5 * N_GRAMMAR, n_notes  # these sequences really do hold notes


def test_odd_inputs_never_raise():
    tok = Tokenizer()
    good = tok.encode(from_miditoolkit(synthetic_pop_midi(seed=0, n_bars=4)))
    inputs = [[], [tok.eos_id], [tok.pad_id] * 10, [tok.mask_id] * 3, good.tolist(), good.astype(np.int8), good.astype(np.uint64),
              good.astype(np.float32), good.reshape(1, -1), torch.tensor(good), torch.tensor(good).float(), [[1, 2], [3, [4]]],
              "garbage", None, 3.5, [np.nan, np.inf, -np.inf], [2**70, -2**70], [True, False], np.array([], np.int64),
              np.array(["a", "b"]), {"not": "a sequence"}, b"\x00\x01"]
    for x in inputs:
        m, rep = tok.decode_with_report(x)
        assert isinstance(m, Music)
    assert tok.decode(torch.tensor(good)) == tok.decode(good) == tok.decode(good.tolist())


def test_decoded_garbage_is_a_writable_midi_file(tmp_path):
    "Whatever decode returns can be written as a MIDI file and read back with the same notes."
    tok = Tokenizer()
    rng = np.random.default_rng(2)
    written = 0
    for i in range(200):
        m = tok.decode(_grammar_walk(tok, rng, 200))
        if m.n_notes == 0: continue
        path = save_midi(m, tmp_path/f"{i}.mid")
        back = parse_midi(path.read_bytes(), str(path))
        # MIDI cannot keep two overlapping notes of one key apart in every case, so compare note counts and onsets
        assert back.n_notes == m.n_notes
        assert sorted(back.notes()["start"].tolist()) == sorted(m.notes()["start"].tolist())
        written += 1
    assert written > 100
