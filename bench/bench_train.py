"""Training throughput of kelly's MusicTransformer at the issue's GPT-2 size, by training loop.

The model is the sampler benchmark's: 6 layers, width 512, 8 heads, vocab 512 (19.2M parameters with tied
embeddings and rotary positions; the issue's GPT-2 peer has 20.2M because of its 2,048 learned positions).
Each loop trains on batches of 16 x 256 tokens with AdamW and reports

- tokens/s (median step time over the timed steps, after warm-up steps), and
- achieved GFLOP/s by the 6N rule (6 x parameters x tokens/s) and its share of the machine's fp32 peak
  (184 GFLOP/s on 2 threads here, `--peak-gflops` to change).

Loops are registered in `LOOPS`: the plain PyTorch loop (the issue measured 679 tok/s, about 45% of peak, for HF
GPT-2 in a plain loop) and kelly's fastai loop (`kelly.trainers.lm_learner` + `fit_lm`: LMLoss, AdamW with a
one-cycle schedule, gradient clipping at 1.0, the pad-aware metrics, Throughput and the progress callbacks, batches
through a fastai DataLoader), both measured in one run with the same model, data and optimizer settings. A fastai
step is the time from one training batch's end to the next (data loading and every callback included). With
`--rounds N` the loops alternate N times and each reports its median over all rounds, so a load change on a shared
machine hits both. Each row also gives tokens per CPU-second of the process (`tok_per_cpu_s`): on a busy shared
machine, `--threads 1` and that figure compare the loops' work more steadily than the wall clock can.

The batches are token ids drawn uniformly at random (seeded): throughput does not depend on the token values,
and the benchmark must not need a corpus. This is stated in the output, not hidden.

Usage: python bench/bench_train.py [--threads 2] [--steps 6] [--warmup 2] [--rounds 1] [--loops plain,fastai]
"""
import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from kelly.models import MusicTransformer, TransformerConfig

SIZE = dict(n_layers=6, width=512, n_heads=8, vocab_size=512)
BATCH, SEQ_LEN = 16, 256
LR, WEIGHT_DECAY, BETAS = 3e-4, 0.1, (0.9, 0.95)
PEAK_GFLOPS = 184.0   # fp32, 2 threads, measured on the project's machines (DESIGN.md)
PLAIN_REFERENCE_TOK_S = 679.0


def make_model(seed: int = 0, dropout: float = 0.1) -> MusicTransformer:
    "The benchmark's model, freshly initialised with `seed`."
    torch.manual_seed(seed)
    return MusicTransformer(TransformerConfig(**SIZE, dropout=dropout, max_len=SEQ_LEN))


def make_batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    "`n` (x, y) pairs of random token ids [BATCH, SEQ_LEN], y = x shifted by one."
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, SIZE["vocab_size"], (BATCH, SEQ_LEN + 1), generator=g)
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return out


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS)


def plain_loop(model: MusicTransformer, batches, warmup: int) -> list[tuple[float, float]]:
    "Plain PyTorch: forward, cross-entropy, backward, AdamW step. Returns the timed steps' (wall, process CPU) seconds."
    model.train()
    opt = make_optimizer(model)
    times = []
    for i, (x, y) in enumerate(batches):
        t, c = time.perf_counter(), time.process_time()
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.detach().item()   # the value a loop would log; also a sync point on accelerators
        if i >= warmup: times.append((time.perf_counter() - t, time.process_time() - c))
    return times


def fastai_loop(model: MusicTransformer, batches, warmup: int) -> list[tuple[float, float]]:
    "kelly's fastai loop (`lm_learner` + `fit_lm`) over the same batches. Returns the timed steps' (wall, process CPU) seconds."
    from types import SimpleNamespace
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from kelly.trainers import OptimConfig, fit_lm, lm_learner

    class StepTimes(Callback):
        "(wall, CPU) seconds from the end of one training batch to the end of the next (the first from the start of training)."
        order = 100
        def before_train(self): self.learn.step_times, self._t = [], (time.perf_counter(), time.process_time())
        def after_batch(self):
            if not self.training: return
            now = (time.perf_counter(), time.process_time())
            self.learn.step_times.append((now[0] - self._t[0], now[1] - self._t[1]))
            self._t = now

    rows = [(x[i], y[i]) for x, y in batches for i in range(len(x))]
    dls = DataLoaders(DataLoader(rows, bs=BATCH, drop_last=True), DataLoader(rows[:BATCH], bs=BATCH), device="cpu")
    vocab = SimpleNamespace(vocab_size=SIZE["vocab_size"], pad_id=0)   # random ids: id 0 (~0.2% of targets) is ignored as pad
    optim = OptimConfig(epochs=1, lr=LR, weight_decay=WEIGHT_DECAY, beta2=BETAS[1], moms=(BETAS[0],) * 3)
    learn = lm_learner(dls, vocab, model=model, optim=optim, cbs=[StepTimes()], progress=False)
    fit_lm(learn)
    return learn.step_times[warmup:]


LOOPS: dict[str, Callable] = {"plain": plain_loop, "fastai": fastai_loop}


def report(name: str, times: list[tuple[float, float]], n_params: int, peak: float) -> dict:
    """tok/s from the median wall time per step (and the 6N rule's GFLOP/s), plus tokens per CPU-second of this
    process: on a shared machine the CPU figure moves less with other people's load than the wall-clock one."""
    wall, cpu = [t for t, _ in times], [c for _, c in times]
    tok_s = BATCH * SEQ_LEN / statistics.median(wall)
    gflops = 6 * n_params * tok_s / 1e9
    return {"loop": name, "tok_s": round(tok_s, 1), "gflops_6n": round(gflops, 1), "pct_peak": round(100 * gflops / peak, 1),
            "tok_per_cpu_s": round(BATCH * SEQ_LEN / statistics.median(cpu), 1),
            "step_s": [round(t, 3) for t in wall], "cpu_s": [round(c, 3) for c in cpu]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per loop")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the loops this many times (medians over all rounds)")
    ap.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated, from {list(LOOPS)}")
    ap.add_argument("--peak-gflops", type=float, default=PEAK_GFLOPS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.loops.split(",") if n]
    unknown = [n for n in names if n not in LOOPS]
    if unknown: raise SystemExit(f"unknown loop(s) {unknown}; available: {list(LOOPS)}")
    print(f"# bench_train: torch {torch.__version__}, threads {torch.get_num_threads()}, batch {BATCH}x{SEQ_LEN}, AdamW, "
          f"random token ids (seeded), loadavg at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    times = {name: [] for name in names}
    batches = make_batches(args.warmup + args.steps)
    for r in range(args.rounds):
        for name in names:
            model = make_model()
            times[name] += LOOPS[name](model, batches, args.warmup)
            if args.rounds > 1: print(f"# round {r + 1}: {name} median step {statistics.median(t for t, _ in times[name][-args.steps:]):.3f} s", flush=True)
    rows = []
    for name in names:
        row = report(name, times[name], make_model().n_params(), args.peak_gflops)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"# loadavg at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; params {make_model().n_params()/1e6:.2f}M; "
          f"issue's plain-loop reference: {PLAIN_REFERENCE_TOK_S} tok/s")
    if len(rows) > 1:
        base = rows[0]["tok_s"]
        for r in rows[1:]:
            print(f"{r['loop']} / {rows[0]['loop']}: {r['tok_s'] / base:.3f}x wall (overhead {100 * (1 - r['tok_s'] / base):+.1f}%), "
                  f"{r['tok_per_cpu_s'] / rows[0]['tok_per_cpu_s']:.3f}x per CPU-second (overhead {100 * (1 - r['tok_per_cpu_s'] / rows[0]['tok_per_cpu_s']):+.1f}%)")


if __name__ == "__main__":
    main()
