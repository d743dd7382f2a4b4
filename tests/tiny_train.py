"""A tiny but complete kelly training run, driven by the process tests (not collected by pytest itself).

    python tests/tiny_train.py --dir CKPT --report OUT [--resume] [--pause-at STEP] [--weights FILE] ...
    torchrun --standalone --nproc_per_node=2 tests/tiny_train.py --distributed --dir CKPT --report OUT ...

It trains `kelly.test_utils.synth_learner` (a small MLP on a seeded regression, Adam, one-cycle) with the callbacks
a long run uses: Precision, Checkpoint (every N steps + epoch ends, optional resume), Rollback, and, with
--distributed, DistributedTraining (gloo on the CPU). Each rank writes OUT/rank<r>.json: the global training loss
of every step, the validation losses, the checkpoints it wrote and where it resumed from. Rank 0 saves the final
weights with --weights. --nan-at S poisons the inputs of step S on rank 0 (a rollback must follow on every rank). --pause-at S prints "PAUSED S" on stdout after step S (its update and its checkpoint, if
one is due) and sleeps, so a test can SIGKILL it at a known point; --pause-in-save S does the same half way through
writing step S's checkpoint file.
"""
import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from fastai.callback.core import Callback

from kelly.callbacks import DistributedTraining, Precision
from kelly.distributed import distributed_session, get_rank, get_world_size
from kelly.reliability import Checkpoint, Rollback
from kelly.test_utils import synth_learner
from kelly.core import setup_logging

PAUSE_S = 600  # how long --pause-at waits to be killed


class RecordLosses(Callback):
    "The training loss of every step, averaged over all ranks (what one process with the global batch sees)."
    order = 64  # before Rollback (65), which cancels the rest of after_loss for a batch it skips

    def before_fit(self): self.losses = []

    def after_loss(self):
        if not self.training: return
        x = self.learn.loss.detach().float().clone()
        if get_world_size() > 1:
            dist.all_reduce(x)
            x /= get_world_size()
        self.losses.append(float(x))


class NanAt(Callback):
    "Make the inputs of global step `step` NaN, on rank 0 only: the rollback decision must still be taken by every rank."
    order = 1

    def __init__(self, step: int): self.step = step

    def before_batch(self):
        if self.training and self.learn.train_iter + 1 == self.step and get_rank() == 0:
            self.learn.xb = (torch.full_like(self.learn.xb[0], float("nan")),)


class PauseAt(Callback):
    "After global step `step` (its update and checkpoint done), say so on stdout and wait to be killed."
    order = 99

    def __init__(self, step: int): self.step = step

    def after_batch(self):
        if self.training and self.learn.train_iter == self.step:
            print(f"PAUSED {self.step}", flush=True)
            time.sleep(PAUSE_S)


def pause_in_save(step: int):
    "Make the checkpoint write of global step `step` stop half way (bytes in atomic_write's temp file, no rename yet)."
    import io
    import kelly.reliability as kc   # the Checkpoint callback looks save_checkpoint up there
    from kelly.core import atomic_write
    real_save = kc.save_checkpoint
    def half_save(state, path):
        path = Path(path)
        if path.name != kc.checkpoint_name(step): return real_save(state, path)
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        with atomic_write(path, "wb") as f:
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
            print(f"PAUSED IN SAVE {step}", flush=True)
            time.sleep(PAUSE_S)
    kc.save_checkpoint = half_save


def probe_fastai_distributed_dl(learn) -> str:
    "Try fastai's own DistributedDL on this process group; return the error it raises ('' if it works)."
    from fastai.distributed import DistributedDL
    try:
        DistributedDL(learn.dls.train).get_idxs()
        return ""
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="checkpoint folder")
    ap.add_argument("--report", required=True, help="folder for rank<r>.json")
    ap.add_argument("--weights", help="rank 0 saves the final state_dict here")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--n-valid", type=int, default=32)
    ap.add_argument("--bs", type=int, default=16, help="global batch size")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--augment", type=float, default=0.0)
    ap.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    ap.add_argument("--keep-last", type=int, default=20)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--pause-at", type=int, default=0)
    ap.add_argument("--pause-in-save", type=int, default=0, help="stop half way through writing the checkpoint of this step")
    ap.add_argument("--nan-at", type=int, default=0, help="NaN inputs at this step (rank 0 only)")
    ap.add_argument("--distributed", action="store_true")
    ap.add_argument("--probe-fastai-ddl", action="store_true")
    return ap.parse_args(argv)


def train(args) -> dict:
    cbs = [Precision(args.precision), Checkpoint(args.dir, every_n_steps=args.every, keep_last=args.keep_last, resume=args.resume),
           Rollback(), RecordLosses()]
    if args.distributed: cbs.append(DistributedTraining())
    if args.pause_at: cbs.append(PauseAt(args.pause_at))
    if args.pause_in_save: pause_in_save(args.pause_in_save)
    if args.nan_at: cbs.append(NanAt(args.nan_at))
    learn = synth_learner(args.n_train, args.n_valid, bs=args.bs, seed=args.seed, dropout=args.dropout, augment=args.augment, lr=args.lr, cbs=cbs)
    learn.fit_one_cycle(args.epochs, args.lr)
    report = {"rank": get_rank(), "world_size": get_world_size(), "losses": learn.record_losses.losses,
              "valid": [row[1] for row in learn.recorder.values if len(row) > 1],
              "saved": [p.name for p in learn.checkpoint.saved],
              "resumed_from": learn.checkpoint.resumed_from.name if learn.checkpoint.resumed_from else None,
              "n_rollbacks": learn.rollback.n_rollbacks, "train_iter": learn.train_iter}
    if args.probe_fastai_ddl: report["fastai_distributed_dl"] = probe_fastai_distributed_dl(learn)
    if get_rank() == 0 and args.weights: torch.save(learn.model.state_dict(), args.weights)
    return report


def main(argv=None):
    args = parse_args(argv)
    setup_logging("INFO")
    torch.set_num_threads(1)   # the same arithmetic in every run, whatever else shares the machine
    if args.distributed:
        with distributed_session("cpu") as info:
            report = train(args)
    else: report = train(args)
    out = Path(args.report)
    out.mkdir(parents=True, exist_ok=True)
    (out/f"rank{report['rank']}.json").write_text(json.dumps(report, indent=1))
    logging.getLogger("kelly").info("rank %d done: %d steps", report["rank"], report["train_iter"])


if __name__ == "__main__":
    sys.exit(main())
