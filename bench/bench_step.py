"""Milliseconds per decoding step of each backend, by position, with the sampler between steps.

`make_decoder(model, backend)` on the issue-16 benchmark model (6 layers, width 512, 8 heads, vocab 512, random
weights: speed does not depend on them), one prefill of one token, then `--steps` steps drawn with kelly's
`TokenSampler` (top-k 50 / top-p 0.95), timed in blocks of `--block` positions so a cost that grows with the cache
shows. Each backend runs with ONNX Runtime's (or torch's) `--threads` intra-op threads; `--sampler-threads` is torch's
while it samples between ONNX Runtime steps (kelly uses 1: with 2, both pools spin on the same two cores).

Usage: python bench/bench_step.py [--batches 1,8] [--threads 1,2] [--steps 512] [--block 128] [--sampler-threads 1]
"""
import argparse
import os
import time

import torch

from kelly.core import intra_op_threads
from kelly.inference import BACKENDS, make_decoder
from kelly.models import MusicTransformer, TransformerConfig
from kelly.samplers import SamplingConfig, TokenSampler

SIZE = dict(n_layers=6, width=512, n_heads=8, vocab_size=512)


@torch.inference_mode()
def block_times(model, backend: str, batch: int, threads: int, sampler_threads: int, steps: int, block: int) -> list[float]:
    "Mean ms per step in each block of `block` positions."
    with intra_op_threads(threads):
        dec = make_decoder(model, backend, batch_size=batch, threads=threads)
        cache = model.new_cache(batch, steps + 1)
        logits = dec.prefill(torch.zeros(batch, 1, dtype=torch.long), cache)
    sampler = TokenSampler(SamplingConfig(top_k=50, top_p=0.95, constrained=False, stop_at_eos=False), batch,
                           vocab_size=model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    tokens, out = torch.zeros(batch, dtype=torch.long), []
    with intra_op_threads(sampler_threads if getattr(dec, "owns_threads", False) else threads):
        for _ in range(steps // block):
            t = time.perf_counter()
            for _ in range(block):
                tokens = sampler(logits, tokens)
                logits = dec.step(tokens, cache)
            out.append(1e3 * (time.perf_counter() - t) / block)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", default="1,2", help="intra-op thread counts to try")
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--sampler-threads", type=int, default=1, help="torch's threads while sampling between ONNX Runtime steps")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = MusicTransformer(TransformerConfig(**SIZE, dropout=0.0, max_len=args.steps + 1)).eval()
    print(f"# bench_step: torch {torch.__version__}, {len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.2f}; "
          f"ms per step in blocks of {args.block} positions; sampler on {args.sampler_threads} torch thread(s) between ONNX Runtime steps")
    for batch in map(int, args.batches.split(",")):
        for threads in map(int, args.threads.split(",")):
            for backend in args.backends.split(","):
                ms = block_times(model, backend, batch, threads, args.sampler_threads, args.steps, args.block)
                print(f"batch {batch} threads {threads} {backend:5s}: " + " ".join(f"{x:6.2f}" for x in ms)
                      + f"   ({batch * 1e3 / (sum(ms) / len(ms)):7.1f} tok/s)", flush=True)


if __name__ == "__main__":
    main()
