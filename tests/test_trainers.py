"""`kelly.trainers.train` end to end: a run that crashes and is resumed from its own run folder ends bit for bit where
an uninterrupted run ends, and a 2-process torchrun job (gloo on the CPU) trains the model one process would.

The data is real: the first chorales of kelly's built-in Bach corpus (built under the session's KELLY_HOME),
tokenized into the token cache and cut into augmented windows. The model is a small MusicTransformer, so each
run takes seconds. The equivalence of 2 ranks and 1 process for the callbacks themselves is proven in
tests/test_distributed.py; here the trainer's own distributed path is run end to end: process group from
torchrun's environment, sharded WindowLoaders, DDP, metrics summed over ranks, one run folder written by rank 0.
"""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tool
from test_distributed import RUN_TIMEOUT_S, _env
from train_job import CrashAt

from kelly.checkpoints import list_checkpoints, load_checkpoint
from kelly.reliability import ReliabilityConfig
from kelly.core import KELLY_HOME_ENV
from kelly.datasets import LMDataConfig
from kelly.models import TransformerConfig
from kelly.trainers import (CHECKPOINT_DIR, CONFIG_FILE, HISTORY_FILE, METRICS_FILE, OptimConfig, TrainConfig, train)

SCRIPT = str(ROOT/"tests"/"train_job.py")
N_PIECES = 8          # chorales of the built-in corpus
EPOCHS, STEPS_PER_EPOCH, BS = 3, 6, 8
CRASH_STEP = 10       # in epoch 1, two steps after the checkpoint of step 8
METRIC_RTOL = 1e-3    # 2 ranks vs 1 process: same windows, gradients averaged in another order


def small_config(runs_dir, name, bs=BS, world_size=1, dropout=0.1, sample_every=0) -> TrainConfig:
    "`bs` windows per batch and rank; `STEPS_PER_EPOCH` steps per epoch over all `world_size` ranks."
    return TrainConfig(name=name, runs_dir=runs_dir, corpus_limit=N_PIECES,
                       data=LMDataConfig(seq_len=64, bs=bs, valid_frac=0.25, windows_per_epoch=STEPS_PER_EPOCH * bs * world_size),
                       model=TransformerConfig(n_layers=2, width=64, n_heads=4, dropout=dropout),
                       optim=OptimConfig(epochs=EPOCHS, lr=3e-3),
                       reliability=ReliabilityConfig(checkpoint_every=4, keep_last=10, sample_every=sample_every, min_validity=0.0))   # untrained: judge collapse by share


@pytest.fixture(autouse=True)
def home(kelly_home, monkeypatch):
    monkeypatch.setenv(KELLY_HOME_ENV, str(kelly_home))
    return kelly_home


def test_crash_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    a = train(small_config(tmp_path, "a", sample_every=4), progress=False)
    assert a.metrics["valid_loss"] < math.log(a.learn.tokenizer.vocab_size)
    assert [s["step"] for s in a.metrics["samples"]] == list(range(4, EPOCHS * STEPS_PER_EPOCH + 1, 4))   # the monitor ran

    cfg_b = small_config(tmp_path, "b", sample_every=4)
    with pytest.raises(RuntimeError, match=f"crash at step {CRASH_STEP}"):
        train(cfg_b, cbs=[CrashAt(CRASH_STEP)], progress=False)
    b_dir = tmp_path/"b"
    assert not (b_dir/METRICS_FILE).exists()
    assert [p.name for p in list_checkpoints(b_dir/CHECKPOINT_DIR)][-1] == "step-000000008.pt"
    assert [r.split(",")[0] for r in (b_dir/HISTORY_FILE).read_text().splitlines()[1:]] == ["0"]   # epoch 0 logged before the crash

    b = train(TrainConfig.load(b_dir/CONFIG_FILE), resume=True, progress=False)
    assert b.run_dir == b_dir and b.metrics["resumed_from"] == str(b_dir/CHECKPOINT_DIR/"step-000000008.pt")
    assert b.metrics["steps"] == a.metrics["steps"] == EPOCHS * STEPS_PER_EPOCH
    for (k, p), q in zip(a.learn.model.state_dict().items(), b.learn.model.state_dict().values()): assert torch.equal(p, q), k
    rows = _history(b_dir/HISTORY_FILE)
    assert [r["epoch"] for r in rows] == [str(e) for e in range(EPOCHS)]   # every epoch once, none repeated or empty
    assert rows == _history(tmp_path/"a"/HISTORY_FILE)   # every column but the clock's, train_loss included, as written
    assert json.loads((b_dir/METRICS_FILE).read_text())["valid_loss"] == a.metrics["valid_loss"]


def _history(path) -> list[dict]:
    """history.csv's rows without the clock columns (`time`, `tokens_per_s`), values as the file holds them (text). A resumed run's rows must
    equal an uninterrupted run's exactly: the same weights give the same losses, and the running training-loss
    average (fastai's smoothed loss, the `train_loss` column) travels in the checkpoint, so no float tolerance."""
    import csv
    with open(path, newline="") as f: rows = list(csv.DictReader(f))
    assert rows and "train_loss" in rows[0], rows
    return [{k: v for k, v in r.items() if k != "time" and not k.endswith("_per_s")} for r in rows]


def test_resume_without_a_name_continues_the_latest_run(tmp_path):
    with pytest.raises(RuntimeError, match="crash at step 5"):
        train(small_config(tmp_path, None), cbs=[CrashAt(5)], progress=False)
    (run,) = [p for p in tmp_path.iterdir()]
    assert run.name.startswith("run-")
    res = train(small_config(tmp_path, None), resume=True, progress=False)
    assert res.run_dir == run and res.metrics["resumed_from"].endswith("step-000000004.pt")
    state = load_checkpoint(list_checkpoints(run/CHECKPOINT_DIR)[-1])
    assert state["config"]["values"]["name"] == run.name


def _run(cmd):
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    return r


def test_two_processes_under_torchrun_train_what_one_process_trains(tmp_path, home):
    "2 ranks with batch 8 each vs 1 process with batch 16: the same windows per step, the same model at the end."
    one = train(small_config(tmp_path/"runs", "one", bs=2 * BS, dropout=0.0), progress=False)
    cfg = tmp_path/"two.yaml"
    small_config(tmp_path/"runs", "two", bs=BS, world_size=2, dropout=0.0).save(cfg)
    r = _run([tool("torchrun"), "--standalone", "--nproc_per_node=2", SCRIPT, str(cfg), "--report", str(tmp_path/"report"), "--distributed"])
    assert "distributed: rank 0 of 2 (local rank 0) on cpu with gloo" in r.stderr   # ranks > 0 log warnings only
    r0, r1 = (json.loads((tmp_path/"report"/f"rank{k}.json").read_text()) for k in (0, 1))
    run = tmp_path/"runs"/"two"
    assert r0["run_dir"] == r1["run_dir"] == str(run)                         # rank 0 chose the folder for both
    assert r0["weights"] == r1["weights"]                                      # DDP kept the replicas identical
    m0, m1, m = r0["metrics"], r1["metrics"], one.metrics
    assert m0["world_size"] == 2 and m0["steps"] == m["steps"] == EPOCHS * STEPS_PER_EPOCH
    for key in ("token_accuracy", "perplexity"): assert m0[key] == m1[key], key   # summed over ranks: every rank reports the whole set
    for key in ("valid_loss", "token_accuracy", "perplexity"):
        assert math.isclose(m0[key], m[key], rel_tol=METRIC_RTOL), (key, m0[key], m[key])
    w1, w2 = one.learn.model.state_dict(), torch.load(tmp_path/"report"/"weights.pt", weights_only=True)
    for k in w1: torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-4)
    assert json.loads((run/METRICS_FILE).read_text())["world_size"] == 2      # rank 0 wrote the run folder
    assert len((run/HISTORY_FILE).read_text().splitlines()) == EPOCHS + 1
    state = load_checkpoint(list_checkpoints(run/CHECKPOINT_DIR)[-1])
    assert state["world_size"] == 2 and state["config"]["class"] == "TrainConfig"


def test_unequal_validation_shards_are_evened_out_so_the_job_trains(tmp_path, home):
    """An odd number of validation windows with a per-rank batch of half of them: split plainly, rank 0 would run 2
    validation batches and rank 1 one, and fastai's per-batch loss gather would wait forever. The datasets layer
    evens the shards out (the shorter shard repeats a window): both ranks get the same number of batches, and the
    2-process job trains to the end."""
    from kelly.datasets import bach_chorales, lm_dataloaders
    from kelly.tokenizer import Tokenizer
    cfg = small_config(tmp_path/"runs", "uneven", world_size=2)
    tok, corpus = Tokenizer(cfg.tokenizer), bach_chorales(N_PIECES, progress=False)
    for stride in range(64, 32, -1):   # a validation stride giving an odd number of windows
        data = cfg.data.override(f"valid_stride={stride}")
        n = len(lm_dataloaders(corpus, tok, config=data, progress=False).valid.dataset)
        if n % 2 and n >= 3: break
    else: pytest.fail("no stride gives an odd number of validation windows")
    per_rank = [len(lm_dataloaders(corpus, tok, config=data.override(f"bs={n // 2}"), rank=rank, world_size=2, progress=False).valid) for rank in (0, 1)]
    assert per_rank[0] == per_rank[1] == 2, per_rank   # 2 batches each, the shorter shard padded
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "data": data.override(f"bs={n // 2}", f"windows_per_epoch={2 * STEPS_PER_EPOCH * (n // 2)}").to_dict()})
    cfg.save(tmp_path/"uneven.yaml")
    cmd = [tool("torchrun"), "--standalone", "--nproc_per_node=2", SCRIPT, str(tmp_path/"uneven.yaml"), "--report", str(tmp_path/"report"), "--distributed"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    # the datasets layer pads the shorter validation shard, so the job trains instead of hanging
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads((tmp_path/"report"/"rank0.json").read_text())["metrics"]["world_size"] == 2


def _train_job(cfg_path, report, *args, log):
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, SCRIPT, str(cfg_path), "--report", str(report), *args], cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, stderr=err, text=True)


def test_sigkill_then_resume_the_music_transformer_is_bitwise(tmp_path, home):
    """The music model on real chorales (augmentation, dropout and the sample monitor on), SIGKILLed while paused after
    step 10 (its newest checkpoint is step 8's), resumed from its run folder: the final weights equal, bit for bit,
    those of the same job never stopped. Both runs are separate processes with the same environment."""
    from test_kill_resume import sigkill_when
    runs = tmp_path/"runs"
    for name in ("whole", "killed"): small_config(runs, name, sample_every=4).save(tmp_path/f"{name}.yaml")
    whole = _train_job(tmp_path/"whole.yaml", tmp_path/"r_whole", log=tmp_path/"whole.log")
    assert whole.wait(timeout=RUN_TIMEOUT_S) == 0, (tmp_path/"whole.log").read_text()[-4000:]

    killed = _train_job(tmp_path/"killed.yaml", tmp_path/"r_killed", "--pause-at", str(CRASH_STEP), log=tmp_path/"killed.log")
    sigkill_when(killed, f"PAUSED {CRASH_STEP}")
    run = runs/"killed"
    assert not (tmp_path/"r_killed").exists() and not (run/METRICS_FILE).exists()     # it died before finishing
    assert list_checkpoints(run/CHECKPOINT_DIR)[-1].name == "step-000000008.pt"

    resumed = _train_job(run/CONFIG_FILE, tmp_path/"r_killed", "--resume", log=tmp_path/"resumed.log")
    assert resumed.wait(timeout=RUN_TIMEOUT_S) == 0, (tmp_path/"resumed.log").read_text()[-4000:]
    a, b = (json.loads((tmp_path/r/"rank0.json").read_text()) for r in ("r_whole", "r_killed"))
    assert b["metrics"]["resumed_from"] == str(run/CHECKPOINT_DIR/"step-000000008.pt")
    assert a["metrics"]["steps"] == b["metrics"]["steps"] == EPOCHS * STEPS_PER_EPOCH
    wa, wb = (torch.load(tmp_path/r/"weights.pt", weights_only=True) for r in ("r_whole", "r_killed"))
    assert wa.keys() == wb.keys()
    for k in wa: assert torch.equal(wa[k], wb[k]), f"{k} differs after SIGKILL + resume"
    assert a["weights"] == b["weights"]
    # the history of the killed run (epoch 0 before the kill, epochs 1-2 after) reads as the uninterrupted one's, train_loss included
    hist = _history(run/HISTORY_FILE)
    assert [r["epoch"] for r in hist] == [str(e) for e in range(EPOCHS)]
    assert hist == _history(runs/"whole"/HISTORY_FILE)


def overfitting_config(runs_dir, name, patience=2) -> TrainConfig:
    """A wide model at a high, barely annealed learning rate on 4 chorales without augmentation: it memorises the
    training windows, and the validation loss stops improving a few epochs in (epoch 5 of 8 here)."""
    return TrainConfig(name=name, runs_dir=runs_dir, corpus_limit=4,
                       data=LMDataConfig(seq_len=64, bs=8, valid_frac=0.2, windows_per_epoch=96, augment=None),
                       model=TransformerConfig(n_layers=2, width=128, n_heads=4, dropout=0.0),
                       optim=OptimConfig(epochs=8, lr=1e-2, pct_start=0.1, div_final=2, weight_decay=0.0),
                       reliability=ReliabilityConfig(rollback=False, patience=patience, keep_last=1))


def test_early_stopping_bundles_the_best_epoch_and_survives_a_resume(tmp_path):
    """A real run whose validation loss stops improving, crashed one epoch after its best epoch and resumed: the resumed
    run keeps the best-so-far from its checkpoint, stops `patience` epochs after the best epoch, and bundles the best
    epoch's weights (not the last), saying so in metrics.json and in the bundle's metadata."""
    from kelly.exporters import load_bundle
    cfg = overfitting_config(tmp_path, "of")
    steps = cfg.data.windows_per_epoch // cfg.data.bs
    crash = 6 * steps + 1                       # the first step of epoch 7
    with pytest.raises(RuntimeError, match=f"crash at step {crash}"):
        train(cfg, cbs=[CrashAt(crash)], progress=False)
    run = tmp_path/"of"
    before = load_checkpoint(list_checkpoints(run/CHECKPOINT_DIR)[-1])["callbacks"]["checkpoint"]
    res = train(TrainConfig.load(run/CONFIG_FILE), resume=True, progress=False)
    valid = [float(r.split(",")[2]) for r in (run/HISTORY_FILE).read_text().splitlines()[1:]]
    best_epoch = valid.index(min(valid)) + 1
    assert best_epoch < 6, valid                                        # the crash came after the best epoch ...
    assert before["epoch"] == best_epoch and before["value"] == min(valid)   # ... which the checkpoint remembered
    m = json.loads((run/METRICS_FILE).read_text())
    assert m["stopped_early_at_epoch"] == best_epoch + cfg.reliability.patience < cfg.optim.epochs, (m, valid)
    assert len(valid) == best_epoch + cfg.reliability.patience          # every epoch once, none after the stop
    b = m["bundled"]
    assert (b["weights"], b["monitor"], b["epoch"], b["step"], b["value"]) == ("best", "valid_loss", best_epoch, best_epoch * steps, min(valid))
    assert m["best"] == {k: b[k] for k in ("monitor", "value", "step", "epoch")}
    bundle = load_bundle(res.bundle)
    assert bundle.metadata["metrics"]["bundled"] == b
    best = load_checkpoint(run/CHECKPOINT_DIR/b["checkpoint"])["model"]
    last = res.learn.model.state_dict()
    assert all(torch.equal(v, best[k]) for k, v in bundle.model.state_dict().items())
    assert not all(torch.equal(v, last[k]) for k, v in bundle.model.state_dict().items())   # not the last weights
