"""kelly.datasets on real MIDI with the real tokenizer: corrupt and non-MIDI files, cache invalidation, damaged and
interrupted caches, concurrent builders, window contents, augmentation, and loaders that resume exactly (across
processes, worker counts and ranks)."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import miditoolkit
import numpy as np
import pytest
import torch

from kelly.core import KellyError, quoted
from kelly.datasets import (TOKEN_CACHE_MANIFEST, Augmentation, AugmentConfig, DatasetError, LMDataConfig,
                            MidiCorpus, RandomWindows, SlidingWindows, TokenCache, WindowLoader, bach_chorales,
                            default_cache_folder, lm_dataloaders)
from kelly.midi import load_midi
from kelly.tokenizer import Tokenizer, TokenizerConfig

N_PIECES = 24            # chorales in the shared small corpus
WAIT_S = 300
N_KILL_FILES = 1000      # files in the corpus whose cache build is killed


@pytest.fixture(scope="module")
def bach(kelly_home) -> Path:
    "A small real corpus shared by the module (built once per KELLY_HOME)."
    return bach_chorales(limit=N_PIECES, folder=kelly_home/"corpora"/f"bach_chorales-first{N_PIECES}", progress=False)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TokenizerConfig())


@pytest.fixture(scope="module")
def tok_pad_last() -> Tokenizer:
    "Special tokens at the end of the vocabulary: pad_id is not 0, so nothing may assume it."
    t = Tokenizer(TokenizerConfig(special_tokens_at_end=True))
    assert t.pad_id != 0 and t.bos_id != 1
    return t


def _copy(src: Path, dst: Path, n: int | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.mid"))[:n]: shutil.copy(p, dst/p.name)
    return dst


def _midi_with_drums(path: Path, top_pitch: int = 76):
    "A two-track file written with miditoolkit: a melody reaching `top_pitch` and a drum track."
    m = miditoolkit.MidiFile(ticks_per_beat=480)
    melody = miditoolkit.Instrument(program=0, name="melody")
    melody.notes = [miditoolkit.Note(velocity=80, pitch=p, start=i * 240, end=(i + 1) * 240) for i, p in enumerate(range(top_pitch - 16, top_pitch + 1))]
    drums = miditoolkit.Instrument(program=0, is_drum=True, name="drums")
    drums.notes = [miditoolkit.Note(velocity=100, pitch=36 + (i % 3) * 2, start=i * 240, end=i * 240 + 120) for i in range(17)]
    m.instruments = [melody, drums]
    m.dump(str(path))


def _data_byte_above_127(good: bytes) -> bytes:
    "The first note-on with velocity byte replaced by 0xE4 (a data byte above 127)."
    for i in range(len(good) - 2):
        if 0x90 <= good[i] <= 0x9F and good[i + 1] < 0x80 and 0 < good[i + 2] < 0x80:
            return good[:i + 2] + b"\xe4" + good[i + 3:]
    raise AssertionError("no note-on found")


# ---------------------------------------------------------------- corpus with corrupt and non-MIDI files

def test_mixed_folder_gives_good_files_and_a_report(bach, tok, tmp_path, caplog):
    folder = tmp_path/"mixed"
    _copy(bach, folder, 4)
    (folder/"sub").mkdir()
    good = sorted(bach.glob("*.mid"))
    shutil.copy(good[5], folder/"sub"/"nested.MID")
    data = good[4].read_bytes()
    bad = {"truncated.mid": data[:len(data) // 2], "header_flipped.mid": b"MThX" + data[4:],
           "data_byte.mid": _data_byte_above_127(data), "empty.mid": b"", "text.mid": b"just some words\n"}
    for name, content in bad.items(): (folder/name).write_bytes(content)
    for name in bad:   # each really is refused by kelly.midi, and the reason names the file
        with pytest.raises(KellyError, match=name): load_midi(folder/name)
    (folder/"README.txt").write_text("not music")
    (folder/"cover.png").write_bytes(b"\x89PNG")
    with caplog.at_level(logging.INFO, logger="kelly.datasets"):
        cache = TokenCache.for_corpus(folder, tok, folder=tmp_path/"cache", progress=False)
    assert cache.names == sorted([p.name for p in good[:4]] + ["sub/nested.MID"])
    report = json.loads(cache.report_path.read_text())
    assert sorted(s["file"] for s in report["skipped"]) == sorted(bad)
    for s in report["skipped"]: assert s["file"] in s["reason"], s   # the MidiError message, naming the file
    assert sorted(i["file"] for i in report["ignored"]) == ["README.txt", "cover.png"]
    assert (report["n_midi_files"], report["n_tokenized"]) == (10, 5)
    assert f"skipped 5 of 10 MIDI files in {quoted(folder)}" in caplog.text
    for i, name in enumerate(cache.names): assert np.array_equal(cache.doc(i), tok.encode_file(folder/name, add_special=False))


def test_folder_without_readable_midi_is_an_error(tok, tmp_path):
    folder = tmp_path/"junk"
    folder.mkdir()
    (folder/"a.mid").write_bytes(b"MThd\x00\x00")
    (folder/"b.midi").write_text("no")
    with pytest.raises(DatasetError, match="no readable MIDI") as e:
        TokenCache.for_corpus(folder, tok, folder=tmp_path/"cache", progress=False)
    assert str(folder) in str(e.value) and "report.json" in str(e.value)
    assert json.loads((tmp_path/"cache"/"report.json").read_text())["n_tokenized"] == 0
    for missing in (tmp_path/"nowhere", tmp_path/"empty"):
        if missing.name == "empty": missing.mkdir()
        with pytest.raises(DatasetError, match=str(missing)): lm_dataloaders(missing, tok, progress=False)


# ---------------------------------------------------------------- cache invalidation

def _built(caplog) -> bool: return "tokenized" in caplog.text


def test_cache_rebuilds_when_files_or_tokenizer_change(bach, tok, tok_pad_last, tmp_path, caplog):
    corpus_dir = _copy(bach, tmp_path/"corpus", 6)
    where = tmp_path/"cache"
    first = TokenCache.for_corpus(corpus_dir, tok, folder=where, progress=False)
    files = sorted(corpus_dir.glob("*.mid"))

    def again(tokenizer=tok, **kw):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kelly.datasets"):
            return TokenCache.for_corpus(corpus_dir, tokenizer, folder=where, progress=False, **kw)

    c = again(); assert not _built(caplog) and c.corpus_key == first.corpus_key          # unchanged: reused
    os.utime(files[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    c = again(); assert not _built(caplog)                                               # touched, same bytes: reused
    shutil.copy(bach/sorted(p.name for p in bach.glob("*.mid"))[10], files[0])
    c = again(); assert _built(caplog) and "1 changed" in caplog.text                    # changed content
    assert np.array_equal(c.doc(0), tok.encode_file(files[0], add_special=False))
    _copy(bach, corpus_dir, 8)
    c = again(); assert _built(caplog) and "2 file(s) added" in caplog.text and len(c) == 8
    files[-1].unlink()
    c = again(); assert _built(caplog) and "1 removed" in caplog.text and len(c) == 7
    c = again(tok_pad_last); assert _built(caplog) and "tokenizer changed" in caplog.text
    assert c.tokenizer_hash == tok_pad_last.hash
    corpus = MidiCorpus.from_folder(corpus_dir)
    assert default_cache_folder(corpus, tok) != default_cache_folder(corpus, tok_pad_last)   # by default each tokenizer keeps its own


def test_same_size_same_mtime_edit_needs_rehash(bach, tok, tmp_path, caplog):
    corpus_dir = _copy(bach, tmp_path/"corpus", 3)
    where = tmp_path/"cache"
    TokenCache.for_corpus(corpus_dir, tok, folder=where, progress=False)
    f = sorted(corpus_dir.glob("*.mid"))[0]
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01                                   # same size; then restore the mtime: only a hash can tell
    f.write_bytes(bytes(data)); os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level(logging.INFO, logger="kelly.datasets"):
        TokenCache.for_corpus(corpus_dir, tok, folder=where, progress=False)
        assert "tokenized" not in caplog.text
        TokenCache.for_corpus(corpus_dir, tok, folder=where, progress=False, rehash=True)
        assert "1 changed" in caplog.text


@pytest.mark.parametrize("damage", ["truncate_tokens", "flip_token_byte", "delete_offsets", "garbage_manifest", "truncate_manifest"])
def test_damaged_cache_is_detected_and_rebuilt(bach, tok, tmp_path, caplog, damage):
    corpus_dir = _copy(bach, tmp_path/"corpus", 4)
    where = tmp_path/"cache"
    good = TokenCache.for_corpus(corpus_dir, tok, folder=where, progress=False)
    expected = [np.array(good.doc(i)) for i in range(len(good))]
    tokens, offsets, manifest = where/good.manifest["tokens"]["file"], where/good.manifest["offsets"]["file"], where/TOKEN_CACHE_MANIFEST
    good.close(); del good
    if damage == "truncate_tokens": tokens.write_bytes(tokens.read_bytes()[:-6])
    elif damage == "flip_token_byte":
        b = bytearray(tokens.read_bytes()); b[len(b) // 2] ^= 0x10; tokens.write_bytes(bytes(b))
    elif damage == "delete_offsets": offsets.unlink()
    elif damage == "garbage_manifest": manifest.write_bytes(os.urandom(64))
    else: manifest.write_text(manifest.read_text()[:100])
    if damage != "garbage_manifest" and damage != "truncate_manifest":
        with pytest.raises(DatasetError, match="damaged"): TokenCache(where)
    with caplog.at_level(logging.INFO, logger="kelly.datasets"):
        again = TokenCache.for_corpus(corpus_dir, tok, folder=where, progress=False)
    assert any(r.levelno == logging.WARNING and "rebuilding" in r.getMessage() for r in caplog.records), caplog.text
    assert len(again) == len(expected) and all(np.array_equal(again.doc(i), e) for i, e in enumerate(expected))
    TokenCache(where, verify=True)   # intact again


def test_cache_killed_mid_build_leaves_the_old_cache(bach, tok, tmp_path):
    corpus_dir = tmp_path/"corpus"
    src = sorted(bach.glob("*.mid"))
    for i in range(N_KILL_FILES):
        target = corpus_dir/f"c{i // len(src):02d}"/src[i % len(src)].name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src[i % len(src)], target)
    where = tmp_path/"cache"
    code = (f"from kelly.datasets import TokenCache; from kelly.tokenizer import Tokenizer, TokenizerConfig; "
            f"TokenCache.for_corpus({str(corpus_dir)!r}, Tokenizer(TokenizerConfig()), folder={str(where)!r}, workers=1, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not list(where.glob(".tokens-*.tmp")) and proc.poll() is None and time.monotonic() < deadline: time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)   # while it streams ids into its temporary file
    finally:
        if proc.poll() is None: os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be interrupted"
    assert not (where/TOKEN_CACHE_MANIFEST).exists()           # nothing was published
    with pytest.raises(DatasetError): TokenCache(where)
    cache = TokenCache.for_corpus(corpus_dir, tok, folder=where, progress=False)
    assert len(cache) == N_KILL_FILES and not list(where.glob(".*.tmp"))
    assert sorted(p.name for p in where.iterdir() if not p.name.startswith(".")) == sorted(
        [TOKEN_CACHE_MANIFEST, "report.json", cache.manifest["tokens"]["file"], cache.manifest["offsets"]["file"]])


def test_concurrent_builders_tokenize_once(bach, tmp_path):
    corpus_dir = _copy(bach, tmp_path/"corpus", 8)
    where = tmp_path/"cache"
    code = ("from kelly.core import setup_logging; setup_logging('INFO'); from kelly.datasets import TokenCache; "
            "from kelly.tokenizer import Tokenizer, TokenizerConfig; "
            f"c = TokenCache.for_corpus({str(corpus_dir)!r}, Tokenizer(TokenizerConfig()), folder={str(where)!r}, workers=1, progress=False); print(c.n_tokens)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=WAIT_S) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(err.count("tokenized 8 files") for _, err in outs) == 1, outs
    assert outs[0][0] == outs[1][0]


# ---------------------------------------------------------------- windows

@pytest.fixture(scope="module")
def cache_pad_last(bach, tok_pad_last, tmp_path_factory):
    return TokenCache.for_corpus(bach, tok_pad_last, folder=tmp_path_factory.mktemp("cache_pad_last"), progress=False)


def test_window_contents_and_special_ids(cache_pad_last, tok_pad_last):
    t = tok_pad_last
    T = 64
    sw = SlidingWindows(cache_pad_last, t, seq_len=T)
    for i in range(len(sw)):
        x, y = sw[i]
        assert x.dtype == y.dtype == np.int64 and x.shape == y.shape == (T,)
        assert np.array_equal(x[1:], y[:-1])
    for d in range(len(cache_pad_last)):   # each document: bos, its ids, eos, then pad; every target scored once
        doc = np.asarray(cache_pad_last.doc(d), np.int64)
        first = int(sw.cum_counts[d - 1]) if d else 0
        ys = np.concatenate([sw[i][1] for i in range(first, int(sw.cum_counts[d]))])
        assert sw[first][0][0] == t.bos_id
        n = len(doc) + 1
        assert np.array_equal(ys[:n], np.append(doc, t.eos_id))
        assert (ys[n:] == t.pad_id).all()
    assert t.pad_id not in np.asarray(cache_pad_last.tokens)  # pads only ever come from padding


def test_short_documents_are_padded(cache_pad_last, tok_pad_last):
    t = tok_pad_last
    T = int(cache_pad_last.lengths.max()) + 10
    rw = RandomWindows(cache_pad_last, t, seq_len=T, seed=3, windows_per_epoch=50)
    for i in range(len(rw)):
        x, y = rw[i]
        doc, start = rw.locate(i)
        assert start == 0 and x[0] == t.bos_id
        n = int(cache_pad_last.lengths[doc]) + 1
        assert y[n - 1] == t.eos_id and (y[n:] == t.pad_id).all() and (x[n + 1:] == t.pad_id).all()


def test_random_windows_reach_every_document(cache_pad_last, tok_pad_last):
    rw = RandomWindows(cache_pad_last, tok_pad_last, seq_len=32, seed=0, windows_per_epoch=4000)
    counts = np.bincount([rw.locate(i)[0] for i in range(len(rw))], minlength=len(rw.docs))
    assert (counts > 0).all()
    expected = (rw.framed_lengths - 32) / (rw.framed_lengths - 32).sum() * len(rw)
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected.max())   # proportional to the number of windows


# ---------------------------------------------------------------- augmentation

def test_augmentation_deterministic_in_range_and_drums_untouched(tok, tmp_path):
    folder = tmp_path/"drums"; folder.mkdir()
    top = tok.config.pitch_range[1] - 2                            # two semitones of headroom
    _midi_with_drums(folder/"a.mid", top_pitch=top)
    _midi_with_drums(folder/"b.mid", top_pitch=top - 20)
    cache = TokenCache.for_corpus(folder, tok, folder=tmp_path/"cache", progress=False)
    ids = np.asarray(cache.doc(0), np.int64)
    aug = Augmentation(tok, AugmentConfig(transpose=6, velocity=0.2, tempo=0.2), seed=7)
    shifts = []
    for i in range(200):
        out = aug(ids, epoch=0, index=i)
        assert np.array_equal(out, aug(ids, epoch=0, index=i))          # deterministic
        semitones, *_ = aug.draw(ids, 0, i)
        shifts.append(semitones)
        lo, hi = tok.pitch_span(out)
        assert tok.config.pitch_range[0] <= lo and hi <= tok.config.pitch_range[1]
        music, original = tok.decode(out), tok.decode(ids)
        drums = [t for t in music.tracks if t.is_drum][0]
        drums0 = [t for t in original.tracks if t.is_drum][0]
        assert np.array_equal(drums.pitch, drums0.pitch)                  # drums never transposed
    assert max(shifts) == 2 and min(shifts) == -6                         # up only as far as the range allows
    other = Augmentation(tok, AugmentConfig(transpose=6, velocity=0.2, tempo=0.2), seed=8)
    assert any(not np.array_equal(aug(ids, 0, i), other(ids, 0, i)) for i in range(20))
    restored = Augmentation(tok)
    restored.load_state_dict(json.loads(json.dumps(aug.state_dict())))
    assert all(np.array_equal(aug(ids, 3, i), restored(ids, 3, i)) for i in range(20))


# ---------------------------------------------------------------- loaders

def _batches(dl, n=None):
    out = []
    for x, y in dl:
        out.append((x.clone(), y.clone()))
        if n is not None and len(out) == n: break
    return out


def _same(a, b): return len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


@pytest.fixture(scope="module")
def cfg():
    return LMDataConfig(seq_len=48, bs=8, valid_frac=0.2, seed=5, windows_per_epoch=96)


def test_lm_batches(bach, tok_pad_last, cfg, tmp_path):
    dls = lm_dataloaders(bach, tok_pad_last, config=cfg, cache_folder=tmp_path/"cache", progress=False)
    pad = tok_pad_last.pad_id
    for dl in (dls.train, dls.valid):
        for x, y in dl:
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == cfg.seq_len
            assert torch.equal(x[:, 1:], y[:, :-1])
            for row in y:   # once padding starts, it does not stop
                p = (row == pad).nonzero()
                if len(p): assert (row[p[0, 0]:] == pad).all()
    assert len(dls.train) == cfg.windows_per_epoch // cfg.bs
    train_names = {dls.cache.names[d] for d in dls.train.dataset.docs}
    valid_names = {dls.cache.names[d] for d in dls.valid.dataset.docs}
    assert not train_names & valid_names and len(train_names | valid_names) == N_PIECES
    assert len(valid_names) == round(cfg.valid_frac * N_PIECES)


def test_loader_resume_in_a_fresh_process_is_exact(bach, tok, cfg, tmp_path):
    cache_dir = tmp_path/"cache"
    dls = lm_dataloaders(bach, tok, config=cfg, cache_folder=cache_dir, progress=False)
    full = _batches(dls.train) + _batches(dls.train)        # two epochs, uninterrupted
    assert dls.train.epoch == 2 and not _same(full[:12], full[12:])   # epochs differ
    state_file, out = tmp_path/"state.json", tmp_path/"rest.pt"
    code = f"""
import json, torch
from kelly.datasets import lm_dataloaders, LMDataConfig
from kelly.tokenizer import Tokenizer, TokenizerConfig
cfg = LMDataConfig.from_dict(json.loads({json.dumps(json.dumps(cfg.to_dict()))}))
dls = lm_dataloaders({str(bach)!r}, Tokenizer(TokenizerConfig()), config=cfg, cache_folder={str(cache_dir)!r}, progress=False)
it = iter(dls.train)
for _ in range(7): next(it)
open({str(state_file)!r}, "w").write(json.dumps(dls.train.state_dict()))
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=WAIT_S)
    resumed = lm_dataloaders(bach, tok, config=cfg, cache_folder=cache_dir, progress=False)
    resumed.train.load_state_dict(json.loads(state_file.read_text()))
    assert (resumed.train.epoch, resumed.train.position) == (0, 7)
    rest = _batches(resumed.train) + _batches(resumed.train)
    assert _same(full[7:], rest)


def test_batches_do_not_depend_on_workers(bach, tok, cfg, tmp_path):
    one = _batches(lm_dataloaders(bach, tok, config=cfg, cache_folder=tmp_path/"c", progress=False).train)
    cfg2 = LMDataConfig.from_dict({**cfg.to_dict(), "num_workers": 2})
    two = lm_dataloaders(bach, tok, config=cfg2, cache_folder=tmp_path/"c", progress=False)
    assert _same(one, _batches(two.train))


def test_ranks_share_an_epoch_without_overlap(bach, tok, cfg, tmp_path):
    single = lm_dataloaders(bach, tok, config=cfg, cache_folder=tmp_path/"c", progress=False)
    ranks = [lm_dataloaders(bach, tok, config=LMDataConfig.from_dict({**cfg.to_dict(), "bs": cfg.bs // 2}), rank=r, world_size=2,
                            cache_folder=tmp_path/"c", progress=False) for r in range(2)]
    assert len(ranks[0].train) == len(ranks[1].train) == len(single.train)
    one = _batches(single.train)
    for step, (a, b) in enumerate(zip(_batches(ranks[0].train), _batches(ranks[1].train))):
        # step t of two ranks holds exactly the windows of step t of one process (interleaved)
        both = torch.stack([a[0], b[0]], 1).reshape(-1, cfg.seq_len)
        assert torch.equal(both, one[step][0])
    single_valid = torch.cat([x for x, _ in single.valid])               # validation: every window, equal counts per rank
    n = len(single_valid)
    padded = torch.arange(-(-n // 2) * 2) % n                              # an odd count repeats the first window on rank 1
    for r in range(2): assert torch.equal(torch.cat([x for x, _ in ranks[r].valid]), single_valid[padded[r::2]])
    assert len(ranks[0].valid) == len(ranks[1].valid)


def test_saved_state_from_other_data_is_refused(bach, tok, cfg, tmp_path):
    dls = lm_dataloaders(bach, tok, config=cfg, cache_folder=tmp_path/"c", progress=False)
    state = dls.train.state_dict()
    other = lm_dataloaders(bach, tok, config=LMDataConfig.from_dict({**cfg.to_dict(), "valid_frac": 0.3}), cache_folder=tmp_path/"c", progress=False)
    with pytest.raises(DatasetError, match="another corpus, tokenizer or split"): other.train.load_state_dict(state)
    wider = lm_dataloaders(bach, tok, config=LMDataConfig.from_dict({**cfg.to_dict(), "bs": 4}), cache_folder=tmp_path/"c", progress=False)
    with pytest.raises(DatasetError, match="bs="): wider.train.load_state_dict(state)


def test_fastai_learner_trains_on_the_loaders(bach, tok_pad_last, cfg, tmp_path):
    from fastai.callback.progress import ProgressCallback  # noqa: F401  (adds Learner.no_bar)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    t = tok_pad_last
    dls = lm_dataloaders(bach, t, config=cfg, cache_folder=tmp_path/"c", progress=False)
    model = torch.nn.Sequential(torch.nn.Embedding(t.vocab_size, 16), torch.nn.Linear(16, t.vocab_size))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(ignore_index=t.pad_id))
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
    losses = [v[1] for v in learn.recorder.values]
    assert losses[-1] < losses[0] and np.isfinite(losses).all()
    assert dls.train.epoch == 2
