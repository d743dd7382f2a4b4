"""kelly's residual vector quantizer under real torch.distributed: 2 gloo processes launched by torchrun against 1.

Each of 2 ranks quantizes half of every global batch; the EMA codebooks must end where 1 process with the whole
batch ends (k-means init and dead-code resets included), and identical on both ranks. The same run with the sum over
ranks switched off (the quantizer believing it runs alone) must drift: that shows the comparison can fail.
"""
import json
import sys

import pytest
import torch

from conftest import ROOT, tool
from test_distributed import _run

SCRIPT = str(ROOT/"tests"/"quantizer_job.py")
TOL = 1e-5
COMMON = ["--steps", "12"]


def _state(d, rank=0): return torch.load(d/f"rank{rank}.pt", weights_only=True)
def _report(d, rank=0): return json.loads((d/f"rank{rank}.json").read_text())
def _torchrun(*args): return _run([tool("torchrun"), "--standalone", "--nproc_per_node=2", SCRIPT, *args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "One single-process run and one 2-process run of the same quantizer training."
    t = tmp_path_factory.mktemp("rvq")
    _run([sys.executable, SCRIPT, "--out", str(t/"one"), *COMMON])
    _torchrun("--out", str(t/"two"), *COMMON)
    return t


def test_two_processes_learn_the_codebooks_of_one(runs):
    one, two0, two1 = _state(runs/"one"), _state(runs/"two", 0), _state(runs/"two", 1)
    assert _report(runs/"one")["world_size"] == 1 and _report(runs/"two")["world_size"] == 2
    for k in one:
        torch.testing.assert_close(two0[k], one[k], rtol=0, atol=TOL, msg=lambda m: f"{k}: {m}")
        assert torch.equal(two0[k], two1[k]), f"{k} differs between the ranks"
    assert all(bool(one[k]) for k in one if k.endswith("initialised"))
    h1, h2 = _report(runs/"one")["health"], _report(runs/"two")["health"]
    resets = [step[k] for step in h1 for k in step if k.endswith("_resets")]
    assert sum(resets) > 0, resets                              # the run did reset dead codes
    for a, b in zip(h1, h2):
        assert a.keys() == b.keys()
        for k in a: assert a[k] == pytest.approx(b[k], rel=1e-5), (k, a[k], b[k])


def test_without_the_sum_over_ranks_the_codebooks_drift(runs):
    "The check above can fail: with kelly's collectives switched off the 2-process codebooks differ from 1's."
    t = runs/"nosync"
    _torchrun("--out", str(t), "--no-sync", *COMMON)
    one, two0, two1 = _state(runs/"one"), _state(t, 0), _state(t, 1)
    assert (two0["codebooks.0.embed"] - one["codebooks.0.embed"]).abs().max() > 100 * TOL
    assert not torch.equal(two0["codebooks.0.cluster_size"], two1["codebooks.0.cluster_size"])


def test_quantizer_dropout_keeps_the_ranks_identical(runs):
    "With quantizer dropout each rank draws for its own items, yet every statistic is summed, so codebooks agree."
    t = runs/"dropout"
    _torchrun("--out", str(t), "--dropout", "0.5", *COMMON)
    two0, two1 = _state(t, 0), _state(t, 1)
    for k in two0: assert torch.equal(two0[k], two1[k]), f"{k} differs between the ranks"
    assert not torch.equal(two0["codebooks.2.embed"], _state(runs/"two")["codebooks.2.embed"])   # dropout did act
