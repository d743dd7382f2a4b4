"""Kill and resume: a run SIGKILLed after a checkpoint and resumed ends with the weights of a run never stopped.

Run A trains 3 epochs (24 steps) uninterrupted. Run B is the same run (dropout and augmentation noise on, so the
RNG streams matter), killed with SIGKILL while paused after step S, then resumed from its folder to the end.
The final weights must be equal bit for bit on the CPU.
"""
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from kelly.checkpoints import list_checkpoints
from kelly.core import quoted

SCRIPT = str(ROOT/"tests"/"tiny_train.py")
RUN_TIMEOUT_S = 300
COMMON = ["--epochs", "3", "--n-train", "128", "--bs", "16", "--every", "5", "--dropout", "0.2", "--augment", "0.05"]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"): env.pop(k, None)
    return env


def _run(args, log):
    with open(log, "w") as err:
        r = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=err,
                           text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, f"run failed ({r.returncode}):\n{log.read_text()[-8000:]}"
    return log.read_text()


def _wait_for(proc, text, timeout_s):
    "Read proc's stdout until a line contains `text`; fail (after killing it) on exit or timeout."
    deadline, seen = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None: break
            seen.append(line)
            if text in line: return
    proc.kill()
    pytest.fail(f"never saw {text!r} (exit code {proc.poll()}); stdout: {''.join(seen)[-2000:]}")


def sigkill_when(proc, text, timeout_s=RUN_TIMEOUT_S):
    "Wait until proc prints `text` (it then sleeps, paused by the job), SIGKILL it and check that the signal ended it."
    try:
        _wait_for(proc, text, timeout_s)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None: proc.kill()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    t = tmp_path_factory.mktemp("run_a")
    _run(["--dir", str(t/"ck"), "--report", str(t/"r"), "--weights", str(t/"w.pt"), *COMMON], t/"log.txt")
    return torch.load(t/"w.pt", weights_only=True)


@pytest.mark.parametrize("kill_after,resume_from", [
    (23, "step-000000020.pt"),        # mid-epoch: 4 of epoch 3's 8 batches replayed from the data state
    (17, "step-000000016-end.pt"),    # right after an epoch-end checkpoint
])
def test_sigkill_then_resume_gives_identical_weights(tmp_path, uninterrupted, kill_after, resume_from):
    ck, report = tmp_path/"ck", tmp_path/"r"
    with open(tmp_path/"log_b.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, SCRIPT, "--dir", str(ck), "--report", str(report), "--pause-at", str(kill_after), *COMMON],
                                cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=err, text=True)
        sigkill_when(proc, f"PAUSED {kill_after}")
    assert not report.exists()                                       # it really died before finishing
    assert list_checkpoints(ck)[-1].name == resume_from             # the newest checkpoint before the kill
    log = _run(["--dir", str(ck), "--report", str(report), "--resume", "--weights", str(tmp_path/"w.pt"), *COMMON], tmp_path/"log_c.txt")
    assert f"resuming from {quoted(ck/resume_from)}" in log
    rep = json.loads((report/"rank0.json").read_text())
    assert rep["resumed_from"] == resume_from and rep["train_iter"] == 24
    resumed = torch.load(tmp_path/"w.pt", weights_only=True)
    assert resumed.keys() == uninterrupted.keys()
    for k in uninterrupted: assert torch.equal(resumed[k], uninterrupted[k]), f"{k} differs after kill + resume"


def test_resume_skips_a_checkpoint_cut_short_by_the_kill(tmp_path, uninterrupted):
    "A checkpoint left truncated (as if the kill hit it mid-write without the atomic rename) is skipped and named."
    ck = tmp_path/"ck"
    with open(tmp_path/"log_b.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, SCRIPT, "--dir", str(ck), "--report", str(tmp_path/"r"), "--pause-at", "21", *COMMON],
                                cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=err, text=True)
        sigkill_when(proc, "PAUSED 21")
    newest = ck/"step-000000020.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    log = _run(["--dir", str(ck), "--report", str(tmp_path/"r"), "--resume", "--weights", str(tmp_path/"w.pt"), *COMMON], tmp_path/"log_c.txt")
    assert "skipping checkpoint step-000000020.pt" in log and "SHA-256 mismatch" in log
    assert f"resuming from {quoted(ck/'step-000000016-end.pt')}" in log
    resumed = torch.load(tmp_path/"w.pt", weights_only=True)
    for k in uninterrupted: assert torch.equal(resumed[k], uninterrupted[k])


def test_sigkill_in_the_middle_of_a_checkpoint_write(tmp_path, uninterrupted):
    "Killed while step 20's checkpoint is half on disk: no file under the real name, the leftover temp file is removed."
    ck = tmp_path/"ck"
    with open(tmp_path/"log_b.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, SCRIPT, "--dir", str(ck), "--report", str(tmp_path/"r"), "--pause-in-save", "20", *COMMON],
                                cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=err, text=True)
        sigkill_when(proc, "PAUSED IN SAVE 20")
    leftovers = [p.name for p in ck.iterdir() if p.name.startswith(".step-000000020.pt.")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")      # half a file, under a temp name only
    assert list_checkpoints(ck)[-1].name == "step-000000016-end.pt"
    log = _run(["--dir", str(ck), "--report", str(tmp_path/"r"), "--resume", "--weights", str(tmp_path/"w.pt"), *COMMON], tmp_path/"log_c.txt")
    assert "removed 1 unfinished checkpoint write(s)" in log and f"resuming from {quoted(ck/'step-000000016-end.pt')}" in log
    assert not [p for p in ck.iterdir() if p.name.endswith(".tmp")]
    resumed = torch.load(tmp_path/"w.pt", weights_only=True)
    for k in uninterrupted: assert torch.equal(resumed[k], uninterrupted[k])
