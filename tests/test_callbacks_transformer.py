"""kelly's training callbacks on the real MusicTransformer, trained on real tokens.

The tokens are music21's bundled test MIDI files encoded by `kelly.tokenizer.Tokenizer` (REMI, with bos/eos), cut
into windows. The model is a small `kelly.models.MusicTransformer` (RoPE, tied embeddings, dropout) sized from the
tokenizer, the samples come from `kelly.samplers.generate` (KV cache) and are judged with the tokenizer's grammar.
Checked: an interrupted run resumed from its checkpoint ends bit for bit where an uninterrupted one ends, and a
resume with another tokenizer is refused; a NaN that reaches the weights is rolled back and training finishes; a
collapse seen in the sampler's output is rolled back; bf16 autocast trains the transformer on the CPU; and resume is
bitwise on kelly's own data pipeline too (`kelly.datasets.lm_dataloaders`: token cache, random windows, augmentation).
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

from kelly.checkpoints import CheckpointError, load_checkpoint
from kelly.callbacks import Precision
from kelly.reliability import Checkpoint, Rollback, SampleMonitor
from kelly.core import seed_everything
from kelly.models import MusicTransformer, TransformerConfig
from kelly.samplers import generate
from kelly.tokenizer import Tokenizer, TokenizerConfig

music21 = pytest.importorskip("music21")
MIDI_DIR = Path(music21.__file__).parent/"midi"/"testPrimitive"
WINDOW = 32      # tokens per training example
BS = 16
N_TRAIN, N_VALID = 128, 32  # windows


@pytest.fixture(scope="module")
def tok(): return Tokenizer(TokenizerConfig())


@pytest.fixture(scope="module")
def windows(tok):
    seqs = [tok.encode_file(p) for p in sorted(MIDI_DIR.glob("*.mid"))]
    ids = np.concatenate(seqs).astype(np.int64)
    n = len(ids) // (WINDOW + 1)
    w = torch.from_numpy(ids[:n * (WINDOW + 1)].reshape(n, WINDOW + 1))
    assert n >= N_TRAIN + N_VALID, f"only {n} windows in {MIDI_DIR}"
    return w


def make_learner(windows, tok, cbs=(), dropout=0.1, seed=0) -> Learner:
    seed_everything(seed)
    pairs = [(w[:-1], w[1:]) for w in windows]
    train = DataLoader(pairs[:N_TRAIN], bs=BS, shuffle=True, drop_last=True)
    valid = DataLoader(pairs[N_TRAIN:N_TRAIN + N_VALID], bs=BS)
    model = MusicTransformer(TransformerConfig(vocab_size=tok.vocab_size, n_layers=2, width=32, n_heads=4, max_len=WINDOW, dropout=dropout))
    loss = CrossEntropyLossFlat(ignore_index=tok.pad_id)
    learn = Learner(DataLoaders(train, valid, device="cpu"), model, loss_func=loss, opt_func=Adam, cbs=list(cbs))
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
    "Collapse on purpose: after step `step`, the final norm ignores its input and points at `token`'s embedding."
    order = 61
    def __init__(self, step, token): self.step, self.token = step, token
    def after_batch(self):
        if self.training and self.learn.train_iter == self.step:
            m = self.learn.model
            with torch.no_grad():
                e = m.embed.weight[self.token]
                m.norm.weight.zero_(); m.norm.bias.copy_(1000 * e / e.norm())   # every position's logits peak at `token`


def sampler(tok):
    """The sample monitor's generate function: 48 tokens after bos, top-k 20, through the KV cache, unconstrained
    (grammar-constrained decoding would hide a collapse from the monitor and make every sample valid)."""
    return lambda model: generate(model, tok, n=1, max_new_tokens=48, top_k=20, seed=0, stop_at_eos=False, constrained=False).ids[0, 1:]


def test_resume_after_a_crash_is_bitwise(windows, tok, tmp_path):
    a = make_learner(windows, tok)
    a.fit_one_cycle(3, 3e-3)
    b = make_learner(windows, tok, [Checkpoint(tmp_path, every_n_steps=5, keep_last=10, tokenizer=tok), CrashAt(13)])
    with pytest.raises(RuntimeError, match="crash at step 13"): b.fit_one_cycle(3, 3e-3)
    other = Tokenizer(TokenizerConfig(special_tokens_at_end=True))
    refused = make_learner(windows, tok, [Checkpoint(tmp_path, every_n_steps=5, keep_last=10, tokenizer=other, resume=True)])
    with pytest.raises(CheckpointError, match="refusing to resume"): refused.fit_one_cycle(3, 3e-3)
    c = make_learner(windows, tok, [Checkpoint(tmp_path, every_n_steps=5, keep_last=10, tokenizer=tok, resume=True)])
    c.fit_one_cycle(3, 3e-3)
    assert c.checkpoint.resumed_from.name == "step-000000010.pt"   # epoch 1, 2 batches in
    assert a.recorder.values[-1][1] < a.recorder.values[0][1]      # it learns
    for (k, p), q in zip(a.model.state_dict().items(), c.model.state_dict().values()): assert torch.equal(p, q), k
    st = load_checkpoint(tmp_path/"step-000000010.pt")
    assert st["model"]["head.weight"].data_ptr() == st["model"]["embed.weight"].data_ptr()   # tied weights stay tied in the file
    assert Tokenizer.from_json(st["tokenizer"]["json"]) == tok                                   # the tokenizer travels with it


def test_nan_in_the_weights_is_rolled_back(windows, tok, tmp_path):
    learn = make_learner(windows, tok, [Checkpoint(tmp_path, every_n_steps=4, monitor=None), Rollback(), PoisonWeights(6)])
    learn.fit_one_cycle(2, 3e-3)
    assert learn.rollback.n_rollbacks == 1
    ev = learn.rollback.events[0]
    assert ev["step"] == 7 and "non-finite loss" in ev["reason"] and ev["restored"] == "step-000000004.pt"
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert learn.train_iter == 16 and all(math.isfinite(v) for row in learn.recorder.values for v in row)


def test_sampler_collapse_is_rolled_back(windows, tok, tmp_path):
    pitch = tok.token_to_id("Pitch_67")
    monitor = SampleMonitor(sampler(tok), every_n_steps=4, validity=tok.grammar.validity, min_validity=0.0)   # barely trained: judge by share
    learn = make_learner(windows, tok, [Checkpoint(tmp_path, every_n_steps=4, monitor=None), Rollback(), monitor, ForceToken(8, token=pitch)])
    learn.fit_one_cycle(2, 3e-3)
    reports = list(learn.sample_monitor.reports)
    assert [r["step"] for r in reports] == [4, 8, 12, 16]
    assert reports[0]["collapse"] is None and reports[0]["top_token_share"] <= 0.5
    assert reports[1]["collapse"] and reports[1]["top_token_share"] > 0.5
    assert reports[1]["validity"] < reports[0]["validity"]          # the grammar sees it too: Pitch after Pitch is invalid
    assert learn.rollback.n_rollbacks == 1 and learn.rollback.events[0]["restored"] == "step-000000004.pt"
    assert all(r["collapse"] is None for r in reports[2:])


def test_bf16_autocast_trains_the_transformer(windows, tok, tmp_path):
    ref = make_learner(windows, tok, dropout=0.0)
    ref.fit(1, 3e-3)
    learn = make_learner(windows, tok, [Precision("bf16")], dropout=0.0)
    learn.fit(1, 3e-3)
    assert learn.precision.plan.dtype == torch.bfloat16
    assert abs(learn.recorder.values[-1][1] - ref.recorder.values[-1][1]) < 0.05 * ref.recorder.values[-1][1]


def test_resume_with_kelly_datasets_loader_is_bitwise(tok, tmp_path):
    "The same on kelly's own data pipeline: lm_dataloaders (token cache, random windows, augmentation, WindowLoader state)."
    from kelly.datasets import LMDataConfig, lm_dataloaders
    cfg = LMDataConfig(seq_len=WINDOW, bs=8, windows_per_epoch=64, valid_frac=0.2)   # augmentation on (the default)
    def learner(cbs=()):
        torch.manual_seed(0)
        dls = lm_dataloaders(MIDI_DIR, tok, config=cfg, cache_folder=tmp_path/"cache", workers=1, progress=False)
        model = MusicTransformer(TransformerConfig(vocab_size=tok.vocab_size, n_layers=2, width=32, n_heads=4, max_len=WINDOW))
        learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(ignore_index=tok.pad_id), opt_func=Adam, cbs=list(cbs))
        learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
        learn.logger = lambda *a: None
        return learn
    a = learner(); a.fit_one_cycle(2, 3e-3)
    b = learner([Checkpoint(tmp_path/"ck", every_n_steps=3, keep_last=10, tokenizer=tok), CrashAt(11)])
    with pytest.raises(RuntimeError, match="crash at step 11"): b.fit_one_cycle(2, 3e-3)
    st = load_checkpoint(tmp_path/"ck"/"step-000000009.pt")
    assert st["ranks"][0]["data"]["loaders.0"]["epoch"] == 1 and st["ranks"][0]["data"]["loaders.0"]["position"] == 0   # start of epoch 1
    c = learner([Checkpoint(tmp_path/"ck", every_n_steps=3, keep_last=10, tokenizer=tok, resume=True)])
    c.fit_one_cycle(2, 3e-3)
    assert c.checkpoint.resumed_from.name == "step-000000009.pt"
    assert (c.dls.train.epoch, c.dls.train.position) == (a.dls.train.epoch, a.dls.train.position)
    for (k, p), q in zip(a.model.state_dict().items(), c.model.state_dict().values()): assert torch.equal(p, q), k
