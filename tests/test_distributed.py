"""Real torch.distributed on the CPU: 2 processes launched by torchrun (gloo) against 1 process.

With a global batch B, 2 ranks of B/2 must see the same loss at every step as 1 process with batch B (DDP
averages the gradients, ShardedDL gives step t of both ranks together exactly the items of step t of one
process), including across a rollback that only rank 0's data called for; only rank 0 may write checkpoints, and
asking for distributed training without the launcher's environment must be an error.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tool
from kelly.core import quoted

SCRIPT = str(ROOT/"tests"/"tiny_train.py")
RUN_TIMEOUT_S = 300
LOSS_TOL = 1e-5
NAN_STEP = 12  # rank 0's half of this batch (the whole batch in one process) is NaN: both runs must roll back alike
COMMON = ["--epochs", "3", "--n-train", "128", "--n-valid", "32", "--bs", "16", "--every", "5", "--nan-at", str(NAN_STEP)]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"): env.pop(k, None)
    return env


def _run(cmd):
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    return r


def _report(d, rank=0): return json.loads((d/f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "One single-process run and one 2-process torchrun run of the same training."
    t = tmp_path_factory.mktemp("dist")
    _run([sys.executable, SCRIPT, "--dir", str(t/"ck1"), "--report", str(t/"r1"), "--weights", str(t/"w1.pt"), *COMMON])
    r2 = _run([tool("torchrun"), "--standalone", "--nproc_per_node=2", SCRIPT, "--distributed", "--probe-fastai-ddl",
               "--dir", str(t/"ck2"), "--report", str(t/"r2"), "--weights", str(t/"w2.pt"), *COMMON])
    return t, r2


def test_two_processes_give_the_losses_of_one(runs):
    t, _ = runs
    one, r0, r1 = _report(t/"r1"), _report(t/"r2", 0), _report(t/"r2", 1)
    assert (one["world_size"], r0["world_size"], r1["world_size"]) == (1, 2, 2)
    assert len(one["losses"]) == len(r0["losses"]) == 3 * 128 // 16
    assert math.isnan(one["losses"][NAN_STEP - 1]) and math.isnan(r0["losses"][NAN_STEP - 1])
    assert one["n_rollbacks"] == r0["n_rollbacks"] == r1["n_rollbacks"] == 1   # every rank rolled back, not only rank 0
    diffs = [abs(a - b) for i, (a, b) in enumerate(zip(one["losses"], r0["losses"])) if i != NAN_STEP - 1]
    assert max(diffs) < LOSS_TOL, f"step-by-step losses differ by up to {max(diffs):.3g}: {list(zip(one['losses'], r0['losses']))}"
    assert r0["losses"][:NAN_STEP - 1] == r1["losses"][:NAN_STEP - 1] and r0["losses"][NAN_STEP:] == r1["losses"][NAN_STEP:]   # every rank saw the same global loss
    assert one["valid"][-1] < one["valid"][0] * 0.9      # and it did train
    assert max(abs(a - b) for a, b in zip(one["valid"], r0["valid"])) < LOSS_TOL
    w1, w2 = torch.load(t/"w1.pt", weights_only=True), torch.load(t/"w2.pt", weights_only=True)
    for k in w1: torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=LOSS_TOL)


def test_only_rank_0_writes_checkpoints(runs):
    t, _ = runs
    r0, r1 = _report(t/"r2", 0), _report(t/"r2", 1)
    assert r1["saved"] == []
    assert r0["saved"] == _report(t/"r1")["saved"]          # the same checkpoints as the single process
    names = sorted(p.name for p in (t/"ck2").iterdir())
    assert names == sorted([n for n in r0["saved"]] + [n + ".sha256" for n in r0["saved"]])   # no temp files, nothing else
    from kelly.checkpoints import load_checkpoint
    st = load_checkpoint(t/"ck2"/r0["saved"][-1])
    assert st["world_size"] == 2 and len(st["ranks"]) == 2  # but both ranks' RNG and data states are in it


def test_gloo_on_cpu_and_fastai_distributed_dl(runs):
    t, r2 = runs
    assert "on cpu with gloo" in r2.stderr                 # init_distributed's log line, from both ranks
    probe = _report(t/"r2")["fastai_distributed_dl"]
    if not torch.cuda.is_available():                       # why kelly has ShardedDL: fastai's loader needs CUDA
        assert probe, "fastai's DistributedDL worked on gloo/CPU: kelly's note about it is out of date"


def test_distributed_without_launcher_is_an_error(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--distributed", "--dir", str(tmp_path/"ck"), "--report", str(tmp_path/"r")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode != 0
    assert "DistributedError" in r.stderr and "torchrun --nproc_per_node" in r.stderr
    assert not (tmp_path/"ck").exists() and not (tmp_path/"r").exists()   # nothing trained, nothing written


def test_two_processes_resume_exactly(runs, tmp_path):
    "Both ranks' RNG and data states come back: 2 ranks resumed from step 10 end where 2 ranks never stopped."
    t, _ = runs
    from kelly.checkpoints import list_checkpoints, sidecar_path
    ck = tmp_path/"ck"
    ck.mkdir()
    for p in list_checkpoints(t/"ck2"):
        if p.name <= "step-000000010.pt":
            (ck/p.name).write_bytes(p.read_bytes()); sidecar_path(ck/p.name).write_bytes(sidecar_path(p).read_bytes())
    r = _run([tool("torchrun"), "--standalone", "--nproc_per_node=2", SCRIPT, "--distributed", "--resume",
              "--dir", str(ck), "--report", str(tmp_path/"r"), "--weights", str(tmp_path/"w.pt"), *COMMON])
    assert f"resuming from {quoted(ck/'step-000000010.pt')}" in r.stderr
    assert [_report(tmp_path/"r", k)["resumed_from"] for k in (0, 1)] == ["step-000000010.pt"] * 2
    w2, w3 = torch.load(t/"w2.pt", weights_only=True), torch.load(tmp_path/"w.pt", weights_only=True)
    for k in w2: assert torch.equal(w2[k], w3[k]), k
