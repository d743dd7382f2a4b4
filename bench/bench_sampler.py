"""Sampling speed: kelly's KV-cached decoder against full recomputation and against Hugging Face GPT-2 `generate`.

Everything is measured in one run, side by side, with the same number of intra-op threads (default 2):

1. kelly vs Hugging Face transformers' GPT-2 at the same size (6 layers, width 512, 8 heads, vocab 512),
   top-k 50 / top-p 0.95 sampling, with the KV cache: batch 1 x 512 new tokens, batch 1 x 1,024, batch 8 x 512;
2. cache speedup at 1,024 new tokens: cached tokens/s over full-recomputation tokens/s, for kelly and for HF;
3. the overhead of grammar constraints (kelly only; needs `kelly.tokenizer`): a model of the same size over the
   tokenizer's vocabulary, generation time with constraints on vs off, plus the per-step cost of the mask
   operations timed on their own.

Runs alternate kelly and HF and repeat (`--repeats`; the minutes-long uncached case runs once), and the median
wall time gives tokens/s, so slow phases of a shared machine hit both sides alike. Each step is also timed (kelly
through `stream`, HF through a `streamer`): "steady" tokens/s is batch / median step time, which is less sensitive
to the multi-millisecond stalls that 2-thread OpenMP regions suffer when other processes share the cores. Both models are randomly initialised: speed does not depend on the weights, and
every sequence runs to the full length (no eos stopping on either side).

Targets (issue 5): kelly >= 2x HF tokens/s at batch 1 and >= 1.5x at batch 8; cache speedup >= 20x at 1,024;
constraint overhead < 5% of generation time.

Usage (transformers lives only in the benchmark venv):
    /work/benchvenv/bin/python bench/bench_sampler.py                 # everything (several minutes: uncached runs are slow)
    /work/benchvenv/bin/python bench/bench_sampler.py --quick         # short smoke run (smaller lengths, 1 repeat)
    python bench/bench_sampler.py --no-hf                             # kelly only (no transformers needed)
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from kelly.models import MusicTransformer, TransformerConfig
from kelly.samplers import SamplingConfig, grammar_forbidden, stream

SIZE = dict(n_layers=6, width=512, n_heads=8, vocab_size=512)   # the GPT-2 peer
TOP_K, TOP_P = 50, 0.95
HF_REFERENCE = {"b1_512": 125.0, "b1_1024": 112.0, "b8_512": 379.0, "nocache_1024": 5.4}   # tok/s measured by the issue author
TARGETS = {"b1": 2.0, "b8": 1.5, "cache_speedup": 20.0, "constraint_overhead": 0.05}


def loadavg() -> str:
    try: return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError: return "n/a"


def kelly_model(vocab_size: int = SIZE["vocab_size"]) -> MusicTransformer:
    cfg = TransformerConfig(n_layers=SIZE["n_layers"], width=SIZE["width"], n_heads=SIZE["n_heads"], vocab_size=vocab_size,
                            dropout=0.0, max_len=1024)
    return MusicTransformer(cfg).eval()


def hf_model():
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        sys.exit(f"transformers is not importable ({e}); run this script with the benchmark venv "
                 f"(/work/benchvenv/bin/python) or pass --no-hf")
    cfg = GPT2Config(n_layer=SIZE["n_layers"], n_embd=SIZE["width"], n_head=SIZE["n_heads"], vocab_size=SIZE["vocab_size"],
                     n_positions=2048, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def time_kelly(model, batch: int, new: int, use_cache: bool = True, tokenizer=None, constrained: bool = False, seed: int = 0):
    "(seconds, per-step seconds) to generate `new` tokens for `batch` sequences from a one-token prompt."
    prompt = [0] if tokenizer is None else [int(tokenizer.bos_id)]
    cfg = SamplingConfig(max_new_tokens=new, top_k=TOP_K, top_p=TOP_P, use_cache=use_cache, constrained=constrained,
                         stop_at_eos=False, seed=seed)
    stamps = []
    t = time.perf_counter()
    for tokens in stream(model, tokenizer, prompt=prompt, n=batch, config=cfg): stamps.append(time.perf_counter())
    dt = time.perf_counter() - t
    assert len(stamps) == new and tokens.shape == (batch,), (len(stamps), tokens.shape)
    return dt, [b - a for a, b in zip(stamps, stamps[1:])]


class _Stamps:
    "A transformers streamer that only records when each step's tokens arrive."
    def __init__(self): self.t = []
    def put(self, value): self.t.append(time.perf_counter())
    def end(self): pass


def time_hf(model, batch: int, new: int, use_cache: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    ids = torch.zeros(batch, 1, dtype=torch.long)
    st = _Stamps()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=TOP_K, top_p=TOP_P,
                             max_new_tokens=new, min_new_tokens=new, use_cache=use_cache, pad_token_id=0, streamer=st)
    dt = time.perf_counter() - t
    assert out.shape == (batch, 1 + new), out.shape
    return dt, [b - a for a, b in zip(st.t[1:], st.t[2:])]   # the first put is the prompt


def median_tps(times: list[float], tokens: int) -> float:
    return tokens / statistics.median(times)


def bench_peer(kelly, hf, cases, repeats: int) -> list[dict]:
    "kelly vs HF on each (name, batch, new, use_cache, repeats) case, runs alternating."
    rows = []
    for name, batch, new, use_cache, reps in cases:
        runs = {"kelly": [], "hf": []}
        steps = {"kelly": [], "hf": []}
        for r in range(min(reps, repeats)):
            for side, fn, model in (("kelly", time_kelly, kelly), ("hf", time_hf, hf)):
                if model is None: continue
                wall, st = fn(model, batch, new, use_cache, seed=r)
                runs[side].append(wall); steps[side].extend(st)
        row = {"case": name, "batch": batch, "new_tokens": new, "cache": use_cache}
        for side in ("kelly", "hf"):
            if not runs[side]: continue
            st = sorted(steps[side])
            row[f"{side}_tok_s"] = median_tps(runs[side], batch * new)
            row[f"{side}_steady_tok_s"] = batch / statistics.median(st)          # per-step median: less sensitive to stalls
            row[f"{side}_step_ms"] = {"p10": 1e3 * st[len(st) // 10], "median": 1e3 * statistics.median(st), "p90": 1e3 * st[9 * len(st) // 10]}
            row[f"{side}_runs_s"] = [round(x, 3) for x in runs[side]]
        if runs["hf"]:
            row["ratio"] = row["kelly_tok_s"] / row["hf_tok_s"]
            row["steady_ratio"] = row["kelly_steady_tok_s"] / row["hf_steady_tok_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_constraints(new: int, repeats: int) -> dict | None:
    "Generation time with grammar constraints on vs off, and the mask operations timed alone."
    try:
        from kelly.tokenizer import Tokenizer, TokenizerConfig
    except ImportError as e:
        print(f"constraint overhead: NOT MEASURED (kelly.tokenizer is not importable: {e})", flush=True)
        return None
    tok = Tokenizer(TokenizerConfig())
    model = kelly_model(tok.vocab_size)
    on, off, on_steps, off_steps = [], [], [], []
    time_kelly(model, 1, 16, tokenizer=tok, constrained=True)   # warm-up
    for r in range(repeats):
        wall, steps = time_kelly(model, 1, new, tokenizer=tok, constrained=False, seed=r); off.append(wall); off_steps += steps
        wall, steps = time_kelly(model, 1, new, tokenizer=tok, constrained=True, seed=r); on.append(wall); on_steps += steps
    # the constraint's own work per step, timed alone: gather the previous tokens' rows, mask the logits,
    # mask the positions the bar state rules out and advance that state
    from kelly.samplers import PositionRule
    forbidden = grammar_forbidden(tok, tok.vocab_size)
    rule = PositionRule(tok.grammar)
    rule.start(torch.tensor([[tok.bos_id]]))
    logits, prev = torch.randn(1, tok.vocab_size), torch.zeros(1, dtype=torch.long)
    n = 20_000
    with torch.inference_mode():
        t = time.perf_counter()
        for i in range(n):
            masked = logits.masked_fill(forbidden[prev], float("-inf")).masked_fill(rule.forbidden(), float("-inf"))
            rule.update(prev)
        mask_step = (time.perf_counter() - t) / n
    t_off, t_on = statistics.median(off), statistics.median(on)
    row = {"case": "constraints", "vocab_size": tok.vocab_size, "new_tokens": new, "off_s": round(t_off, 3), "on_s": round(t_on, 3),
           "overhead_end_to_end": (t_on - t_off) / t_off,
           "overhead_steady": statistics.median(on_steps) / statistics.median(off_steps) - 1, "mask_ops_us_per_step": mask_step * 1e6,
           "overhead_mask_ops": mask_step * new / t_off}
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (issue: 2)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case (median reported)")
    ap.add_argument("--quick", action="store_true", help="short smoke run: 1 repeat, lengths / 8")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face peer (transformers not needed)")
    ap.add_argument("--no-uncached", action="store_true", help="skip the slow full-recomputation runs")
    ap.add_argument("--cases", default="b1_512,b1_1024,b8_512,nocache_1024,constraints",
                    help="comma-separated subset of b1_512, b1_1024, b8_512, nocache_1024, constraints")
    ap.add_argument("--json", help="also write all results to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    div = 8 if args.quick else 1
    repeats = 1 if args.quick else args.repeats
    print(f"# bench_sampler: torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"loadavg at start {loadavg()}", flush=True)
    kelly = kelly_model()
    hf = None if args.no_hf else hf_model()
    print(f"# params: kelly {kelly.n_params()/1e6:.2f}M (tied embeddings, rotary positions)"
          + ("" if hf is None else f", HF GPT-2 {sum(p.numel() for p in hf.parameters())/1e6:.2f}M (tied, 2,048 learned positions)"), flush=True)
    time_kelly(kelly, 1, 16); time_kelly(kelly, 8, 16)   # warm-up
    if hf is not None: time_hf(hf, 1, 16); time_hf(hf, 8, 16)
    cases = [("b1_512", 1, 512 // div, True, repeats), ("b1_1024", 1, 1024 // div, True, repeats), ("b8_512", 8, 512 // div, True, repeats)]
    if not args.no_uncached: cases.append(("nocache_1024", 1, 1024 // div, False, 1))   # minutes per run: once
    wanted = set(args.cases.split(","))
    unknown = wanted - {c[0] for c in cases} - {"constraints", "nocache_1024"}
    if unknown: raise SystemExit(f"unknown case(s) {sorted(unknown)}")
    cases = [c for c in cases if c[0] in wanted]
    rows = bench_peer(kelly, hf, cases, repeats)
    rows_by = {r["case"]: r for r in rows}
    cons = bench_constraints(1024 // div, repeats) if "constraints" in wanted else None

    print(f"\n# summary (threads {args.threads}, loadavg at end {loadavg()}; HF reference figures from the issue in brackets)")
    for r in rows:
        ref = HF_REFERENCE.get(r["case"])
        line = f"{r['case']:>13}: kelly {r['kelly_tok_s']:8.1f} tok/s (steady {r['kelly_steady_tok_s']:7.1f})"
        if "hf_tok_s" in r: line += (f" | HF {r['hf_tok_s']:7.1f} tok/s (steady {r['hf_steady_tok_s']:7.1f}) [issue: {ref}]"
                                     f" | kelly/HF {r['ratio']:.2f}x (steady {r['steady_ratio']:.2f}x)")
        print(line)
    if "nocache_1024" in rows_by and "b1_1024" in rows_by:
        for side in ("kelly", "hf"):
            key = f"{side}_tok_s"
            if key in rows_by["nocache_1024"]:
                s = rows_by["b1_1024"][key] / rows_by["nocache_1024"][key]
                print(f"cache speedup at {1024 // div} tokens, {side}: {s:.1f}x (target for kelly >= {TARGETS['cache_speedup']:.0f}x)")
    if all("ratio" in rows_by.get(c, {}) for c in ("b1_512", "b1_1024", "b8_512")):
        print(f"targets: batch 1 kelly/HF >= {TARGETS['b1']}x: {min(rows_by['b1_512']['ratio'], rows_by['b1_1024']['ratio']):.2f}x; "
              f"batch 8 >= {TARGETS['b8']}x: {rows_by['b8_512']['ratio']:.2f}x")
    if cons:
        print(f"constraint overhead at {cons['new_tokens']} tokens (vocab {cons['vocab_size']}): end to end {100 * cons['overhead_end_to_end']:+.1f}% "
              f"(median runs; noisy), median step {100 * cons['overhead_steady']:+.1f}%, mask ops {cons['mask_ops_us_per_step']:.1f} us/step = {100 * cons['overhead_mask_ops']:.2f}% "
              f"of generation time (target < {100 * TARGETS['constraint_overhead']:.0f}%)")
    if args.json:
        with open(args.json, "w") as f: json.dump({"rows": rows, "constraints": cons, "threads": args.threads}, f, indent=1)


if __name__ == "__main__":
    main()
