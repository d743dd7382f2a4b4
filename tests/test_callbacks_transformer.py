"""kelly's training callbacks on the real MusicTransformer, trained on real music.

The tokens here are the MIDI pitches (0-127) of music21's bundled test MIDI files, read with `kelly.midi.load_midi`
and put in onset order: real note sequences, without the tokenizer's vocabulary (its tests sit with the tokenizer).
The model is a small `kelly.models.MusicTransformer` (RoPE, tied embeddings, dropout), the samples come from
`kelly.samplers.generate` (KV cache). Checked: an interrupted run resumed from its checkpoint ends bit for bit where
an uninterrupted one ends; a NaN that reaches the weights is rolled back and training finishes; a collapse seen in
the sampler's output is rolled back; bf16 autocast trains the transformer on the CPU.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam

from kelly.callbacks import Checkpoint, Precision, Rollback, SampleMonitor, list_checkpoints, load_checkpoint
from kelly.core import seed_everything
from kelly.midi import load_midi
from kelly.models import MusicTransformer, TransformerConfig
from kelly.samplers import generate

music21 = pytest.importorskip("music21")
MIDI_DIR = Path(music21.__file__).parent/"midi"/"testPrimitive"
VOCAB = 128      # MIDI pitches
WINDOW = 32      # tokens per training example
BS = 16
N_TRAIN, N_VALID = 128, 32  # windows


def pitch_sequence(path: Path) -> np.ndarray:
    "The non-drum pitches of a MIDI file in onset order (then by pitch)."
    music = load_midi(path)
    notes = [(s, p) for t in music.tracks if not t.is_drum for s, p in zip(t.start.tolist(), t.pitch.tolist())]
    return np.array([p for _, p in sorted(notes)], dtype=np.int64)


@pytest.fixture(scope="module")
def windows():
    seqs = [pitch_sequence(p) for p in sorted(MIDI_DIR.glob("*.mid"))]
    ids = np.concatenate([s for s in seqs if len(s)])
    n = len(ids) // (WINDOW + 1)
    w = torch.from_numpy(ids[:n * (WINDOW + 1)].reshape(n, WINDOW + 1))
    assert n >= N_TRAIN + N_VALID, f"only {n} windows in {MIDI_DIR}"
    return w


def make_learner(windows, cbs=(), dropout=0.1, seed=0) -> Learner:
    seed_everything(seed)
    pairs = [(w[:-1], w[1:]) for w in windows]
    train = DataLoader(pairs[:N_TRAIN], bs=BS, shuffle=True, drop_last=True)
    valid = DataLoader(pairs[N_TRAIN:N_TRAIN + N_VALID], bs=BS)
    model = MusicTransformer(TransformerConfig(vocab_size=VOCAB, n_layers=2, width=32, n_heads=4, max_len=WINDOW, dropout=dropout))
    learn = Learner(DataLoaders(train, valid, device="cpu"), model, loss_func=CrossEntropyLossFlat(), opt_func=Adam, cbs=list(cbs))
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
    learn.logger = lambda *a: None
    return learn


class CrashAt(Callback):
    order = 99
    def __init__(self, step): self.step = step
    def after_batch(self):
        if self.training and self.learn.train_iter == self.step: raise RuntimeError(f"crash at step {self.step}")


class PoisonWeights(Callback):
    "After step `step`'s update, a NaN lands in the attention weights (as a bad update would put it there)."
    order = 99
    def __init__(self, step): self.step = step
    def after_batch(self):
        if self.training and self.learn.train_iter == self.step:
            with torch.no_grad(): next(self.learn.model.parameters()).view(-1)[0] = float("nan")


class ForceToken(Callback):
    "Collapse on purpose: after step `step`, the output always prefers `token` (its embedding row is blown up)."
    order = 61
    def __init__(self, step, token): self.step, self.token = step, token
    def after_batch(self):
        if self.training and self.learn.train_iter == self.step:
            with torch.no_grad(): self.learn.model.head.weight[self.token] *= 1000   # tied: the token's embedding too


def sample(model):
    return generate(model, prompt=[60], n=1, max_new_tokens=48, top_k=20, seed=0).ids[0, 1:]


def test_resume_after_a_crash_is_bitwise(windows, tmp_path):
    a = make_learner(windows)
    a.fit_one_cycle(3, 3e-3)
    b = make_learner(windows, [Checkpoint(tmp_path, every_n_steps=5, keep_last=10), CrashAt(13)])
    with pytest.raises(RuntimeError, match="crash at step 13"): b.fit_one_cycle(3, 3e-3)
    c = make_learner(windows, [Checkpoint(tmp_path, every_n_steps=5, keep_last=10, resume=True)])
    c.fit_one_cycle(3, 3e-3)
    assert c.checkpoint.resumed_from.name == "step-000000010.pt"   # epoch 1, 2 batches in
    assert a.recorder.values[-1][1] < a.recorder.values[0][1]      # it learns
    for (k, p), q in zip(a.model.state_dict().items(), c.model.state_dict().values()): assert torch.equal(p, q), k
    st = load_checkpoint(tmp_path/"step-000000010.pt")
    assert st["model"]["head.weight"].data_ptr() == st["model"]["embed.weight"].data_ptr()   # tied weights stay tied in the file


def test_nan_in_the_weights_is_rolled_back(windows, tmp_path):
    learn = make_learner(windows, [Checkpoint(tmp_path, every_n_steps=4, monitor=None), Rollback(), PoisonWeights(6)])
    learn.fit_one_cycle(2, 3e-3)
    assert learn.rollback.n_rollbacks == 1
    ev = learn.rollback.events[0]
    assert ev["step"] == 7 and "non-finite loss" in ev["reason"] and ev["restored"] == "step-000000004.pt"
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert learn.train_iter == 16 and all(math.isfinite(v) for row in learn.recorder.values for v in row)


def test_sampler_collapse_is_rolled_back(windows, tmp_path):
    learn = make_learner(windows, [Checkpoint(tmp_path, every_n_steps=4, monitor=None), Rollback(),
                                   SampleMonitor(sample, every_n_steps=4), ForceToken(8, token=67)])
    learn.fit_one_cycle(2, 3e-3)
    reports = list(learn.sample_monitor.reports)
    assert [r["step"] for r in reports] == [4, 8, 12, 16]
    assert reports[0]["collapse"] is None and reports[0]["top_token_share"] <= 0.5
    assert reports[1]["collapse"] and reports[1]["top_token_share"] > 0.5
    assert learn.rollback.n_rollbacks == 1 and learn.rollback.events[0]["restored"] == "step-000000004.pt"
    assert all(r["collapse"] is None for r in reports[2:])


def test_bf16_autocast_trains_the_transformer(windows, tmp_path):
    ref = make_learner(windows, dropout=0.0)
    ref.fit(1, 3e-3)
    learn = make_learner(windows, [Precision("bf16")], dropout=0.0)
    learn.fit(1, 3e-3)
    assert learn.precision.plan.dtype == torch.bfloat16
    assert abs(learn.recorder.values[-1][1] - ref.recorder.values[-1][1]) < 0.05 * ref.recorder.values[-1][1]
