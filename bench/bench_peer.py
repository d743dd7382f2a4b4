"""kelly's decoding backends against Hugging Face GPT-2 `generate` at the same size, idle and beside a competing process.

Issue 16's targets: kelly >= 4x HF tokens/s at batch 1 and >= 3x at batch 8, both on an idle machine and beside a
competing CPU-bound process.

Both models have the issue's GPT-2 peer size (6 layers, width 512, 8 heads, vocab 512, tied embeddings), randomly
initialised (speed does not depend on the weights), top-k 50 / top-p 0.95 sampling with the KV cache, a one-token
prompt and no eos stop, so every run generates exactly `--new` tokens per sequence.

- kelly runs `kelly.samplers.stream` with each backend (`torch`, the reference; `onnx`, ONNX Runtime fp32 with the
  KV cache bound in place; `int8`, ONNX Runtime dynamic INT8) and its thread policy (`SamplingConfig.threads=None`:
  the free cores, measured as each run starts), as `kelly generate` does.
- HF runs `GPT2LMHeadModel.generate` at 1 and at 2 intra-op threads; each ratio divides by the faster of the two, so
  the peer is not handicapped by a thread count we chose for it.

Within every round the runs alternate (kelly torch, onnx, int8, HF 1 thread, HF 2 threads), so a change of machine
load hits all of them; the median of `--rounds` rounds gives tokens/s. Conditions: `idle` (nothing started by this
script; the load average is printed beside every row, so a busy machine shows) and `competing` (beside
`--competitors` CPU-bound busy loops this script starts and stops).

transformers is a benchmark-only dependency (not in kelly's extras). Install it beside kelly without touching the
project's environment: `pip install --target /tmp/benchlib "transformers<5"` (remove the numpy it brings), then
`PYTHONPATH=/tmp/benchlib python bench/bench_peer.py`.

Usage: python bench/bench_peer.py [--new 512] [--rounds 3] [--competitors 1] [--batches 1,8] [--conditions idle,competing]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from kelly.core import intra_op_threads
from kelly.models import MusicTransformer, TransformerConfig
from kelly.samplers import SamplingConfig, stream

SIZE = dict(n_layers=6, width=512, n_heads=8, vocab_size=512)   # the GPT-2 peer
TOP_K, TOP_P = 50, 0.95
TARGETS = {1: 4.0, 8: 3.0}                                        # kelly / HF tokens/s, by batch size
BACKENDS = ("torch", "onnx", "int8")
HF_THREADS = (1, 2)
BUSY_LOOP = "while True: pass"


def loadavg() -> str:
    "The one-minute load average, for the rows."
    try: return f"{os.getloadavg()[0]:.2f}"
    except OSError: return "n/a"


def kelly_model() -> MusicTransformer:
    "kelly's transformer at the peer's size."
    cfg = TransformerConfig(n_layers=SIZE["n_layers"], width=SIZE["width"], n_heads=SIZE["n_heads"],
                            vocab_size=SIZE["vocab_size"], dropout=0.0, max_len=1024)
    return MusicTransformer(cfg).eval()


def hf_model():
    "Hugging Face GPT-2 at the same size."
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        sys.exit(f"transformers is not importable ({e}): pip install --target /tmp/benchlib 'transformers<5', "
                 "then run with PYTHONPATH=/tmp/benchlib")
    cfg = GPT2Config(n_layer=SIZE["n_layers"], n_embd=SIZE["width"], n_head=SIZE["n_heads"], vocab_size=SIZE["vocab_size"],
                     n_positions=2048, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def time_kelly(model, backend: str, batch: int, new: int, seed: int) -> float:
    "Seconds to generate `new` tokens for `batch` sequences with `backend` and kelly's thread policy."
    cfg = SamplingConfig(max_new_tokens=new, top_k=TOP_K, top_p=TOP_P, constrained=False, stop_at_eos=False, seed=seed,
                         backend=backend, threads=None)
    t = time.perf_counter()
    n = 0
    for _ in stream(model, None, prompt=[0], n=batch, config=cfg): n += 1
    assert n == new, (n, new)
    return time.perf_counter() - t


def time_hf(model, threads: int, batch: int, new: int, seed: int) -> float:
    "Seconds for HF `generate` to sample `new` tokens for `batch` sequences on `threads` intra-op threads."
    torch.manual_seed(seed)
    ids = torch.zeros(batch, 1, dtype=torch.long)
    with intra_op_threads(threads), torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=TOP_K, top_p=TOP_P,
                             max_new_tokens=new, min_new_tokens=new, use_cache=True, pad_token_id=0)
        dt = time.perf_counter() - t
    assert out.shape == (batch, 1 + new), out.shape
    return dt


def run_condition(kelly, hf, condition: str, batches: list[int], new: int, rounds: int) -> list[dict]:
    "Alternating runs of every side for each batch size; one row per batch size."
    rows = []
    for batch in batches:
        sides = [(f"kelly {b}", lambda r, b=b: time_kelly(kelly, b, batch, new, r)) for b in BACKENDS]
        sides += [(f"HF {t} thread{'s' if t > 1 else ''}", lambda r, t=t: time_hf(hf, t, batch, new, r)) for t in HF_THREADS]
        times = {name: [] for name, _ in sides}
        loads = []
        for r in range(rounds):
            for name, fn in sides: times[name].append(fn(r))
            loads.append(loadavg())
        tps = {name: batch * new / statistics.median(ts) for name, ts in times.items()}
        best_hf = max(v for k, v in tps.items() if k.startswith("HF"))
        rows.append({"condition": condition, "batch": batch, "tps": tps, "best_hf": best_hf, "loads": loads})
        line = " | ".join(f"{k} {v:7.1f}" for k, v in tps.items())
        print(f"{condition:<12} batch {batch}: tok/s {line} | load after each round {', '.join(loads)}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=512, help="new tokens per sequence")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per case (median reported)")
    ap.add_argument("--competitors", type=int, default=1, help="busy loops started for the `competing` condition")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--conditions", default="idle,competing", help="idle, competing or both")
    args = ap.parse_args()
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    kelly, hf = kelly_model(), hf_model()
    print(f"# bench_peer: torch {torch.__version__}, {os.cpu_count()} cores, load at start {loadavg()}; "
          f"kelly {kelly.n_params() / 1e6:.2f}M, HF GPT-2 {sum(p.numel() for p in hf.parameters()) / 1e6:.2f}M parameters; "
          f"{args.new} new tokens, {args.rounds} rounds", flush=True)
    for b in BACKENDS: time_kelly(kelly, b, 1, 8, 0)              # warm-up (the first onnx/int8 call exports the graph)
    for t in HF_THREADS: time_hf(hf, t, 1, 8, 0)
    rows = []
    for condition in args.conditions.split(","):
        procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.competitors)] if condition == "competing" else []
        try:
            if procs: time.sleep(2)                               # let the competitors get going
            rows += run_condition(kelly, hf, condition if not procs else f"competing x{args.competitors}", batches, args.new, args.rounds)
        finally:
            for p in procs: p.kill(); p.wait()
    print("\n# kelly / HF (the faster of HF's 1 and 2 threads); targets: batch 1 >= 4x, batch 8 >= 3x")
    for row in rows:
        ratios = ", ".join(f"{b} {row['tps'][f'kelly {b}'] / row['best_hf']:.2f}x" for b in BACKENDS)
        target = TARGETS.get(row["batch"])
        best = max(row["tps"][f"kelly {b}"] for b in BACKENDS) / row["best_hf"]
        verdict = "" if target is None else f" (target >= {target:g}x: {'met' if best >= target else 'NOT met'} by the best backend)"
        print(f"{row['condition']:<14} batch {row['batch']}: {ratios}{verdict}")


if __name__ == "__main__":
    main()
