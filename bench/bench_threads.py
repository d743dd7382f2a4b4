"""Intra-op threads per workload: kelly's thread policy against torch's default (every core) and against one thread.

Workloads, each on the default job's model (`TrainConfig().model`: 4 layers, width 256, the tokenizer's vocabulary):

- `decode_b1`: KV-cached sampling of one sequence (top-k 50 / top-p 0.95, no constraints, no eos stop);
- `decode_b8`: the same with 8 sequences;
- `train`: forward, cross-entropy, backward and AdamW step on a batch of 16 x 256 random token ids.

Each workload runs with three thread settings, alternating within every round so that a change of load hits all
three alike (the order rotates every round, so none always runs right after a change of thread count): `default`
(torch's default, one thread per available core), `one` (1 thread) and `policy`
(`kelly.core.choose_threads`, evaluated right before the run, which reads the load at that moment). Two conditions:
`as-is` (whatever else runs on the machine) and `competing` (the same beside N CPU-bound processes this script
starts: busy loops, `--competitors`). Every row prints the 1-minute load average and the ratios `policy/default`
and `one/default`; the final summary gives each ratio's median over rounds.

Usage: python bench/bench_threads.py [--rounds 3] [--new 256] [--train-steps 3] [--competitors 1] [--quick]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from kelly.core import available_cores, choose_threads, intra_op_threads, system_load
from kelly.models import MusicTransformer
from kelly.samplers import SamplingConfig, stream
from kelly.trainers import TrainConfig

TOP_K, TOP_P = 50, 0.95
TRAIN_BATCH, TRAIN_LEN = 16, 256
BUSY_LOOP = "while True: pass"
VARIANTS = ("default", "one", "policy")


def loadavg() -> str:
    try: return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError: return "n/a"


def default_model() -> MusicTransformer:
    torch.manual_seed(0)
    cfg = TrainConfig().model
    return MusicTransformer(cfg)


def decode_tok_s(model, batch: int, new: int, threads: int) -> float:
    "Tokens/s of cached sampling with `threads` intra-op threads (the config's override, so the policy is bypassed)."
    cfg = SamplingConfig(max_new_tokens=new, top_k=TOP_K, top_p=TOP_P, constrained=False, stop_at_eos=False, seed=0, threads=threads)
    t = time.perf_counter()
    for _ in stream(model, None, prompt=[0], n=batch, config=cfg): pass
    return batch * new / (time.perf_counter() - t)


def train_tok_s(model, steps: int, threads: int) -> float:
    "Tokens/s of training steps (median step) with `threads` intra-op threads; the model is trained in place."
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    with intra_op_threads(threads):
        for i in range(steps + 1):   # the first step is warm-up
            ids = torch.randint(0, model.config.vocab_size, (TRAIN_BATCH, TRAIN_LEN + 1), generator=g)
            t = time.perf_counter()
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
            if i: times.append(time.perf_counter() - t)
    model.eval()
    return TRAIN_BATCH * TRAIN_LEN / statistics.median(times)


def workloads(args, model):
    "(name, policy workload kwargs, function of threads -> tok/s)."
    return [("decode_b1", dict(workload="decode"), lambda n: decode_tok_s(model, 1, args.new, n)),
            ("decode_b8", dict(workload="decode"), lambda n: decode_tok_s(model, 8, args.new, n)),
            ("train", dict(workload="train"), lambda n: train_tok_s(model, args.train_steps, n))]


def run_condition(name: str, args, model) -> list[dict]:
    rows = []
    cores = available_cores()
    for wname, policy_kw, fn in workloads(args, model):
        res = {"default": [], "one": [], "policy": []}
        chosen = []
        for r in range(args.rounds):
            for variant in VARIANTS[r % 3:] + VARIANTS[:r % 3]:      # rotated each round: no variant always follows a thread-count change
                if variant == "policy":
                    c = choose_threads(policy_kw["workload"], environ={})
                    n = c.threads; chosen.append(n)
                else: n = cores if variant == "default" else 1
                res[variant].append(fn(n))
        row = {"condition": name, "workload": wname, "load": loadavg(), "cores": cores, "policy_threads": chosen,
               **{f"{v}_tok_s": round(statistics.median(x), 1) for v, x in res.items()},
               "policy/default": round(statistics.median(p / d for p, d in zip(res["policy"], res["default"])), 2),
               "one/default": round(statistics.median(o / d for o, d in zip(res["one"], res["default"])), 2),
               "runs": {v: [round(t, 1) for t in x] for v, x in res.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per workload and condition [3]")
    ap.add_argument("--new", type=int, default=256, help="new tokens per decoding run [256]")
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps per run (after 1 warm-up) [3]")
    ap.add_argument("--competitors", type=int, default=1, help="CPU-bound processes started for the `competing` condition [1]")
    ap.add_argument("--conditions", default="as-is,competing", help="which conditions to run [as-is,competing]")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 64 new tokens, 1 training step")
    args = ap.parse_args()
    if args.quick: args.rounds, args.new, args.train_steps = 1, 64, 1
    if os.environ.get("OMP_NUM_THREADS"): print(f"note: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} is set; the policy variant ignores it here")
    print(f"# bench_threads: torch {torch.__version__}, {available_cores()} available core(s), torch default threads "
          f"{torch.get_num_threads()}, load {loadavg()} (1/5/15 min)", flush=True)
    model = default_model().eval()
    rows = []
    for cond in args.conditions.split(","):
        procs = []
        if cond == "competing":
            procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.competitors)]
            time.sleep(1.0)
        elif cond != "as-is": sys.exit(f"unknown condition {cond!r}: as-is or competing")
        try: rows += run_condition(cond if cond == "as-is" else f"competing x{args.competitors}", args, model)
        finally:
            for p in procs: p.kill(); p.wait()
    print("# summary (median over rounds; ratio > 1: faster than torch's default of one thread per core)")
    for r in rows:
        print(f"{r['condition']:>14} {r['workload']:>10}: default {r['default_tok_s']:8.1f} tok/s, one {r['one_tok_s']:8.1f}, "
              f"policy ({r['policy_threads']} thr) {r['policy_tok_s']:8.1f}  policy/default {r['policy/default']:.2f}x  "
              f"one/default {r['one/default']:.2f}x  (load {r['load']})")
    print(f"# load at the end {loadavg()}")


if __name__ == "__main__":
    main()
