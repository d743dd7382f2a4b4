"""`kelly.codec_trainer.train_codec` end to end in real processes on real audio (the first chorales of the built-in
corpus, rendered with FluidSynth under the session's KELLY_HOME): a codec run SIGKILLed mid-epoch and resumed from its
run folder ends bit for bit where an uninterrupted run ends (the quantizer's EMA buffers and k-means state travel in the
checkpoints), and a 2-process torchrun job (gloo) trains the codec one process trains.
"""
import json

import pytest
import torch

from conftest import tool
from test_distributed import RUN_TIMEOUT_S, _run
from test_kill_resume import sigkill_when
from test_trainers import SCRIPT, _train_job

from kelly.audio_datasets import AudioDataConfig
from kelly.checkpoints import list_checkpoints
from kelly.codec import CodecConfig
from kelly.codec_trainer import CodecTrainConfig
from kelly.core import KELLY_HOME_ENV
from kelly.quantizer import QuantizerConfig
from kelly.reliability import ReliabilityConfig
from kelly.trainers import CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, OptimConfig

N_PIECES, EPOCHS, STEPS_PER_EPOCH, BS, LENGTH = 4, 2, 6, 4, 8000
KILL_STEP = 9         # in epoch 1, one step after the checkpoint of step 8
WORLD_RTOL = 1e-3     # 2 ranks vs 1 process: same crops, gradients averaged in another order


def small_codec_config(runs_dir, name, world_size=1, quantizer_dropout=0.5) -> CodecTrainConfig:
    "A small frame codec; `STEPS_PER_EPOCH` steps per epoch over all ranks."
    return CodecTrainConfig(name=name, runs_dir=runs_dir, corpus_limit=N_PIECES, device="cpu",
                            data=AudioDataConfig(length=LENGTH, bs=BS, valid_frac=0.25, crops_per_epoch=STEPS_PER_EPOCH * BS * world_size,
                                                 augment=None),
                            model=CodecConfig(width=32, n_layers=1, latent_dim=16, griffin_lim=2,
                                              quantizer=QuantizerConfig(n_codebooks=2, codebook_size=32, kmeans_iters=2, quantizer_dropout=quantizer_dropout)),
                            optim=OptimConfig(epochs=EPOCHS, lr=1e-3, div=10.0, div_final=100.0),
                            reliability=ReliabilityConfig(checkpoint_every=4, keep_last=10), health_warmup=4, min_perplexity=1.0,
                            eval_batches=1, n_reconstructions=1, reconstruction_seconds=1.0)


@pytest.fixture(autouse=True)
def home(kelly_home, monkeypatch):
    monkeypatch.setenv(KELLY_HOME_ENV, str(kelly_home))
    return kelly_home


def test_sigkill_then_resume_the_codec_is_bitwise(tmp_path, home):
    """SIGKILL while paused after step 9 (newest checkpoint: step 8), resume from the run folder: the final weights and
    quantizer buffers equal, bit for bit, those of the same job never stopped."""
    runs = tmp_path/"runs"
    for name in ("whole", "killed"): small_codec_config(runs, name).save(tmp_path/f"{name}.yaml")
    whole = _train_job(tmp_path/"whole.yaml", tmp_path/"r_whole", "--codec", log=tmp_path/"whole.log")
    assert whole.wait(timeout=RUN_TIMEOUT_S) == 0, (tmp_path/"whole.log").read_text()[-4000:]

    killed = _train_job(tmp_path/"killed.yaml", tmp_path/"r_killed", "--codec", "--pause-at", str(KILL_STEP), log=tmp_path/"killed.log")
    sigkill_when(killed, f"PAUSED {KILL_STEP}")
    run = runs/"killed"
    assert not (run/METRICS_FILE).exists()
    assert list_checkpoints(run/CHECKPOINT_DIR)[-1].name == "step-000000008.pt"

    resumed = _train_job(run/CONFIG_FILE, tmp_path/"r_killed", "--codec", "--resume", log=tmp_path/"resumed.log")
    assert resumed.wait(timeout=RUN_TIMEOUT_S) == 0, (tmp_path/"resumed.log").read_text()[-4000:]
    a, b = (json.loads((tmp_path/r/"rank0.json").read_text()) for r in ("r_whole", "r_killed"))
    assert b["metrics"]["resumed_from"] == str(run/CHECKPOINT_DIR/"step-000000008.pt")
    assert a["metrics"]["steps"] == b["metrics"]["steps"] == EPOCHS * STEPS_PER_EPOCH
    wa, wb = (torch.load(tmp_path/r/"weights.pt", weights_only=True) for r in ("r_whole", "r_killed"))
    assert any("embed_sum" in k for k in wa) and any("cluster_size" in k for k in wa)   # the EMA state is compared too
    for k in wa: assert torch.equal(wa[k], wb[k]), f"{k} differs after SIGKILL + resume"


def test_two_processes_under_torchrun_train_the_codec_one_process_trains(tmp_path, home):
    """2 ranks with half the crops each (gloo) end where 1 process with all of them ends: weights and quantizer
    buffers within float tolerance, the same steps. Quantizer dropout is off here: each rank draws its own items'
    codebook counts from its own RNG stream (the same distribution, not the same draws as one process)."""
    one, two = (small_codec_config(tmp_path/"runs", n, quantizer_dropout=0.0) for n in ("one", "two"))
    two = CodecTrainConfig.from_dict({**two.to_dict(), "data": {**two.data.to_dict(), "bs": BS // 2}})
    one.save(tmp_path/"one.yaml"); two.save(tmp_path/"two.yaml")
    single = _train_job(tmp_path/"one.yaml", tmp_path/"r_one", "--codec", log=tmp_path/"one.log")
    assert single.wait(timeout=RUN_TIMEOUT_S) == 0, (tmp_path/"one.log").read_text()[-4000:]
    _run([tool("torchrun"), "--standalone", "--nproc_per_node=2", SCRIPT, str(tmp_path/"two.yaml"), "--report", str(tmp_path/"r_two"), "--codec", "--distributed"])
    r0, r1 = (json.loads((tmp_path/"r_two"/f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["weights"] == r1["weights"]   # ranks identical
    assert r0["metrics"]["steps"] == json.loads((tmp_path/"r_one"/"rank0.json").read_text())["metrics"]["steps"]
    wa, wb = (torch.load(tmp_path/r/"weights.pt", weights_only=True) for r in ("r_one", "r_two"))
    for k in wa:
        if wa[k].is_floating_point(): torch.testing.assert_close(wb[k], wa[k], rtol=WORLD_RTOL, atol=1e-4, msg=f"{k} differs between 2 ranks and 1 process")
        else: assert torch.equal(wa[k], wb[k]), k
