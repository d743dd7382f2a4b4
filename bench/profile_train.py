"""torch.profiler table of one training step of the default job's model (forward, cross-entropy, backward, AdamW).

Random token ids (throughput does not depend on them), batch 16 x 256 (the default job's), intra-op threads from
`--threads` (default: kelly's policy for `train`). Prints the load, tokens/s of the profiled steps and the operator
table sorted by self CPU time: where a training step's time goes, to compare before and after a change.

Usage: python bench/profile_train.py [--threads N] [--steps 2] [--rows 25]
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from kelly.core import choose_threads, intra_op_threads
from kelly.models import MusicTransformer
from kelly.trainers import TrainConfig

BATCH, SEQ_LEN = 16, 256


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    choice = choose_threads("train", override=args.threads)
    torch.manual_seed(0)
    model = MusicTransformer(TrainConfig().model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ_LEN + 1))

    def step():
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()

    with intra_op_threads(choice.threads):
        step()   # warm-up
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps): step()
        dt = time.perf_counter() - t
    print(f"# {model.n_params() / 1e6:.2f}M parameters, {choice.reason}; {args.steps} profiled steps: "
          f"{args.steps * BATCH * SEQ_LEN / dt:.0f} tok/s (profiler on); load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
