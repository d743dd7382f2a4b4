"""The code prior's decoding backends side by side: torch (the reference), ONNX Runtime (fp32) and its dynamic INT8.

Speed: `kelly.code_sampler.sample_codes` with each `backend` (top-k 250, the default sampling), clips of `--clip`
seconds at batch 1 and 8, runs alternating torch/onnx/int8 within every round so a change of load hits all three,
threads from kelly's policy; conditions `as-is` and `competing` (beside N busy loops this script starts). Frames
per second per clip, the median over `--rounds`, and each backend's ratio to torch.

Quality (with a trained prior, `--model PRIOR_RUN`, default: the newest prior run under $KELLY_HOME/runs): the
code cross-entropy (nats per code, blanks skipped) of each backend on the prior's validation windows (the held-out
pieces of the code cache its bundle names, `kelly.prior_trainer.prior_dataloaders` with the training split), teacher-forced
through the cached steps (prefill of the first position, then one step per position), and its perplexity ratio
to torch's (target: within 1%); and the share of positions where the greedy code of every stream matches torch's.
Without a trained prior the model is the default-size prior, randomly initialised (speed only; the output says so).

Usage: python bench/bench_prior_backends.py [--model PRIOR_RUN] [--rounds 3] [--clip 4] [--batches 1,8] [--valid-batches 4]
"""
import argparse
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from kelly.code_sampler import CodeSamplingConfig, sample_codes
from kelly.core import kelly_path
from kelly.exporters import load_prior
from kelly.inference import BACKENDS, make_decoder
from kelly.prior import CodePrior, PriorConfig
from kelly.prior_trainer import CodeCache, PriorDataConfig, prior_dataloaders

BUSY_LOOP = "while True: pass"


def load() -> str: return " ".join(f"{x:.2f}" for x in os.getloadavg())


def newest_prior_run() -> Path | None:
    "The newest run folder under $KELLY_HOME/runs whose bundle is a prior (its manifest says kind prior)."
    runs = sorted(kelly_path("runs").glob("*/bundle/manifest.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p.parent.parent for p in runs if '"kind": "prior"' in p.read_text()), None)


def frames_per_second(prior, backend: str, n: int, seconds: float) -> float:
    "Frames per second per clip of `sample_codes` with `backend`."
    t0 = time.perf_counter()
    gen = sample_codes(prior, n=n, seconds=seconds, seed=0, backend=backend)
    return gen.codes.shape[-1] / (time.perf_counter() - t0)


def speed(prior, args) -> list[str]:
    lines = []
    for b in BACKENDS: sample_codes(prior, n=1, seconds=0.2, seed=0, backend=b)     # warm-up: exports and sessions
    for condition in args.conditions.split(","):
        procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.competitors)] if condition == "competing" else []
        try:
            if procs: time.sleep(2)
            for n in [int(b) for b in args.batches.split(",")]:
                runs = {b: [] for b in BACKENDS}
                for _ in range(args.rounds):
                    for b in BACKENDS: runs[b].append(frames_per_second(prior, b, n, args.clip))
                fps = {b: statistics.median(v) for b, v in runs.items()}
                name = condition if not procs else f"competing x{len(procs)}"
                line = (f"{name:>13} batch {n}: " + ", ".join(f"{b} {fps[b]:7.1f} frames/s" + ("" if b == "torch" else f" ({fps[b] / fps['torch']:.2f}x)")
                                                            for b in BACKENDS) + f"   [load {load()}]")
                print(line, flush=True); lines.append(line)
        finally:
            for p in procs: p.kill(); p.wait()
    return lines


@torch.inference_mode()
def teacher_forced(prior, backend: str, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    "Summed cross-entropy (nats) over the non-blank targets and the greedy ids `[B, L, S]`, through the cached steps of `backend`."
    B, L, S = x.shape
    dec = make_decoder(prior, backend, batch_size=B, threads=torch.get_num_threads())
    cache = prior.new_cache(B, L)
    logits = [dec.prefill(x[:, :1], cache).clone()]
    for t in range(1, L): logits.append(dec.step(x[:, t], cache).clone())
    logits = torch.stack(logits, 1)                                        # [B, L, S, V]
    ce = F.cross_entropy(logits.flatten(0, 2), y.flatten(), ignore_index=prior.pattern.ignore_index, reduction="sum")
    return float(ce), logits.argmax(-1)


def quality(pair, args):
    meta = pair.prior.metadata
    cache = CodeCache(meta["code_cache"], verify=False)
    prior = pair.prior.model.eval()
    dls = prior_dataloaders(cache, prior.pattern, prior.config.max_frames, PriorDataConfig(bs=8))
    totals, agree, count, codes = {b: 0.0 for b in BACKENDS}, {b: 0 for b in BACKENDS}, 0, 0
    for i, (x, y) in enumerate(dls.valid):
        if i == args.valid_batches: break
        ref = None
        for b in BACKENDS:
            ce, greedy = teacher_forced(prior, b, x, y)
            totals[b] += ce
            if ref is None: ref = greedy
            agree[b] += int((greedy == ref).all(-1).sum())
        codes += int((y != prior.pattern.ignore_index).sum()); count += x.shape[0] * x.shape[1]
    ppl = {b: math.exp(totals[b] / codes) for b in BACKENDS}
    print(f"quality on {i} validation batch(es) of {dls.valid.bs} x {prior.config.max_frames} frames ({codes} codes, held-out pieces of {cache.folder}):")
    for b in BACKENDS:
        print(f"  {b:5s}: {totals[b] / codes:.4f} nats per code, perplexity {ppl[b]:.3f} (x{ppl[b] / ppl['torch']:.5f} of torch's; "
              f"within 1%: {abs(ppl[b] / ppl['torch'] - 1) <= 0.01}), greedy agreement with torch {agree[b] / count:.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a prior run folder or bundle [the newest prior run]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clip", type=float, default=4.0, help="seconds per speed run [4]")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--competitors", type=int, default=1)
    ap.add_argument("--conditions", default="as-is,competing")
    ap.add_argument("--valid-batches", type=int, default=4, help="validation batches for the quality check [4]")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    run = Path(args.model) if args.model else newest_prior_run()
    pair = None
    if run is not None: pair = load_prior(run/"bundle" if (run/"bundle").is_dir() else run)
    prior = pair.prior.model.eval() if pair else CodePrior(PriorConfig()).eval()
    print(f"# bench_prior_backends: torch {torch.__version__}, {len(os.sched_getaffinity(0))} core(s), load {load()}; "
          f"prior {'from ' + str(run) if pair else 'default size, untrained (no prior run found: speed only)'}, {prior.n_params() / 1e6:.2f} M parameters")
    speed(prior, args)
    if pair: quality(pair, args)


if __name__ == "__main__":
    main()
