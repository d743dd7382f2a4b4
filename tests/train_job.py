"""Run `kelly.trainers.train` (or, with --codec, `kelly.codec_trainer.train_codec`; with --prior,
`kelly.prior_trainer.train_prior`) from a config file, in one process or in each process of a torchrun job.

    python tests/train_job.py CONFIG --report DIR [--codec | --prior] [--resume] [--crash-at STEP] [--pause-at STEP]
    torchrun --standalone --nproc_per_node=2 tests/train_job.py CONFIG --report DIR --distributed

Driven by tests/test_trainers.py (not collected by pytest itself). Each rank writes DIR/rank<r>.json: the run
folder, the final metrics and a SHA-256 of its final weights; rank 0 also writes DIR/weights.pt. --crash-at S
raises an error after training step S (its update and checkpoint done), as a crash would; --pause-at S prints
"PAUSED S" on stdout after step S and sleeps, so a test can SIGKILL the process at a known point.
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from fastai.callback.core import Callback

from kelly.distributed import get_rank, setup_rank_logging
from tiny_train import PauseAt   # the same pause-and-wait-to-be-killed callback as the tiny learner's jobs
from kelly.trainers import TrainConfig, train
from kelly.codec_trainer import CodecTrainConfig, train_codec
from kelly.prior_trainer import PriorTrainConfig, train_prior


class CrashAt(Callback):
    "Raise after global training step `step`."
    order = 99

    def __init__(self, step: int): self.step = step

    def after_batch(self):
        if self.training and self.learn.train_iter == self.step: raise RuntimeError(f"crash at step {self.step}")


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items(): h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config", type=Path)
    ap.add_argument("--report", type=Path, required=True)
    ap.add_argument("--distributed", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--codec", action="store_true", help="the config is a CodecTrainConfig: train a codec")
    ap.add_argument("--prior", action="store_true", help="the config is a PriorTrainConfig: train a code prior")
    ap.add_argument("--crash-at", type=int, default=None)
    ap.add_argument("--pause-at", type=int, default=None)
    args = ap.parse_args()
    setup_rank_logging("INFO", stream=sys.stderr)
    cbs = [CrashAt(args.crash_at)] if args.crash_at is not None else []
    if args.pause_at is not None: cbs.append(PauseAt(args.pause_at))
    if args.prior: res = train_prior(PriorTrainConfig.load(args.config), distributed=args.distributed, resume=args.resume, cbs=cbs, progress=False)
    elif args.codec: res = train_codec(CodecTrainConfig.load(args.config), distributed=args.distributed, resume=args.resume, cbs=cbs, progress=False)
    else: res = train(TrainConfig.load(args.config), distributed=args.distributed, resume=args.resume, cbs=cbs, progress=False)
    rank = get_rank() if args.distributed else 0
    args.report.mkdir(parents=True, exist_ok=True)
    report = {"rank": rank, "run_dir": str(res.run_dir), "metrics": res.metrics, "weights": weights_digest(res.learn.model)}
    (args.report/f"rank{rank}.json").write_text(json.dumps(report))
    if rank == 0: torch.save(res.learn.model.state_dict(), args.report/"weights.pt")


if __name__ == "__main__":
    main()
