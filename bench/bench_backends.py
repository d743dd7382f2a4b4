"""Decoding backends side by side: torch (the reference), ONNX Runtime (fp32) and ONNX Runtime dynamic INT8.

Speed: `kelly.samplers.stream` with each `backend`, the CLI's settings (grammar constraints on, no eos stop so
every run has the same length), batch 1 and batch 8, runs alternating torch/onnx/int8 within every round so a
change of load hits all three; threads from kelly's policy (the free cores, measured as each run starts) unless
`--threads`. Two conditions: `as-is` and `competing` (beside N CPU-bound busy loops this script starts). Each row
prints the load average and the ratios onnx/torch and int8/torch.

Quality (with a trained bundle, `--model`, default: the newest language-model bundle under $KELLY_HOME/runs):
- validation perplexity of each backend, teacher-forced through the cached steps (prefill of bos, then one step
  per token) over `--ppl-pieces` MIDI files the model was not trained on (the last files, by name, of the corpus
  folder `--corpus`), each cut to `--ppl-len` tokens, with the ratio to torch's (target: within 1%);
- greedy decoding: the share of steps where onnx/int8 pick torch's token when fed torch's tokens;
- grammar validity (share of pieces the tokenizer's grammar accepts) of `--pieces` constrained samples per backend.

Without a bundle the model is the default job's architecture, randomly initialised (speed only; quality is skipped
and the output says so).

Usage: python bench/bench_backends.py [--model RUN_OR_BUNDLE] [--rounds 3] [--new 256] [--competitors 1] [--quick]
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kelly.core import available_cores, kelly_path
from kelly.inference import make_decoder
from kelly.models import MusicTransformer
from kelly.samplers import SamplingConfig, generate, stream
from kelly.tokenizer import Tokenizer

BACKENDS = ("torch", "onnx", "int8")
BUSY_LOOP = "while True: pass"
PPL_TARGET = 0.01


def loadavg() -> str:
    try: return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError: return "n/a"


def find_bundle(arg):
    from kelly.cli import bundle_folder, newest_bundle
    if arg: return bundle_folder(Path(arg))
    try: return newest_bundle(kind="lm")
    except Exception as e:   # no bundle: speed only
        print(f"# no language-model bundle found ({e}); speed on a random default-size model, no quality figures", flush=True)
        return None


def decode_tok_s(model, tok, backend: str, batch: int, new: int, threads) -> float:
    cfg = SamplingConfig(max_new_tokens=new, top_k=50, top_p=0.95, stop_at_eos=False, seed=0, backend=backend, threads=threads)
    t = time.perf_counter()
    for _ in stream(model, tok, n=batch, config=cfg): pass
    return batch * new / (time.perf_counter() - t)


def speed(model, tok, args, condition: str) -> list[dict]:
    rows = []
    for batch in (1, 8):
        res = {b: [] for b in BACKENDS}
        for b in BACKENDS: decode_tok_s(model, tok, b, batch, 8, args.threads)   # warm-up: exports once, builds sessions
        for r in range(args.rounds):
            for b in BACKENDS: res[b].append(decode_tok_s(model, tok, b, batch, args.new, args.threads))
        row = {"condition": condition, "batch": batch, "new_tokens": args.new, "load": loadavg(),
               **{f"{b}_tok_s": round(statistics.median(v), 1) for b, v in res.items()},
               **{f"{b}/torch": round(statistics.median(x / t for x, t in zip(res[b], res["torch"])), 2) for b in ("onnx", "int8")},
               "runs": {b: [round(x, 1) for x in v] for b, v in res.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


@torch.inference_mode()
def step_nll(model, backend: str, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    "Mean next-token NLL of ids [B, T] teacher-forced through the backend's cached steps, and the argmax tokens [B, T-1]."
    B, T = ids.shape
    dec = make_decoder(model, backend, batch_size=B, threads=1)
    cache = model.new_cache(B, T)
    logits = dec.prefill(ids[:, :1], cache)
    nll, picks = [], []
    for t in range(1, T):
        nll.append(F.cross_entropy(logits, ids[:, t], reduction="none"))
        picks.append(logits.argmax(-1))
        if t + 1 < T: logits = dec.step(ids[:, t], cache).clone()
    return float(torch.stack(nll).mean()), torch.stack(picks, 1)


def quality(model, tok, args) -> dict:
    corpus = Path(args.corpus) if args.corpus else kelly_path("corpora", "bach_chorales")
    files = sorted(p for p in corpus.rglob("*") if p.suffix.lower() in (".mid", ".midi"))[-args.ppl_pieces:]
    seqs = [np.asarray(tok.encode_file(p), dtype=np.int64) for p in files]
    seqs = [s[:args.ppl_len] for s in seqs if len(s) >= args.ppl_len]
    if not seqs: return {"error": f"no piece of {args.ppl_len} tokens among the last {args.ppl_pieces} files of {corpus}"}
    ids = torch.as_tensor(np.stack(seqs))
    out = {"pieces": len(seqs), "tokens_per_piece": args.ppl_len, "from": f"last {args.ppl_pieces} files of {corpus}"}
    nll_ref, picks_ref = step_nll(model, "torch", ids)
    out["torch_ppl"] = round(math.exp(nll_ref), 4)
    for b in ("onnx", "int8"):
        nll, picks = step_nll(model, b, ids)
        out[f"{b}_ppl"] = round(math.exp(nll), 4)
        out[f"{b}_ppl_ratio"] = round(math.exp(nll - nll_ref), 5)
        out[f"{b}_within_1pct"] = abs(math.exp(nll - nll_ref) - 1) <= PPL_TARGET
        out[f"{b}_greedy_agreement"] = round(float((picks == picks_ref).float().mean()), 5)
    for b in BACKENDS:
        gen = generate(model, tok, n=args.pieces, config=SamplingConfig(max_new_tokens=args.new, top_k=50, top_p=0.95, seed=0, backend=b))
        out[f"{b}_validity"] = sum(tok.grammar.is_valid(s) for s in gen.sequences()) / args.pieces
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a bundle or run folder [the newest language-model bundle]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=256, help="new tokens per run [256]")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for every backend [kelly's policy]")
    ap.add_argument("--competitors", type=int, default=1)
    ap.add_argument("--conditions", default="as-is,competing")
    ap.add_argument("--corpus", default=None, help="MIDI folder for the perplexity pieces [$KELLY_HOME/corpora/bach_chorales]")
    ap.add_argument("--ppl-pieces", type=int, default=16)
    ap.add_argument("--ppl-len", type=int, default=256)
    ap.add_argument("--pieces", type=int, default=8, help="constrained samples per backend for grammar validity [8]")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 round, 64 new tokens, 4 perplexity pieces of 128 tokens")
    args = ap.parse_args()
    if args.quick: args.rounds, args.new, args.ppl_pieces, args.ppl_len, args.pieces = 1, 64, 4, 128, 4
    print(f"# bench_backends: torch {torch.__version__}, {available_cores()} core(s), load {loadavg()}", flush=True)
    path = find_bundle(args.model)
    if path is not None:
        from kelly.exporters import load_bundle
        b = load_bundle(path, kind="lm"); model, tok = b.model.eval(), b.tokenizer
        print(f"# model: {path} ({model.n_params() / 1e6:.2f}M parameters)", flush=True)
    else:
        from kelly.trainers import TrainConfig
        torch.manual_seed(0)
        cfg = TrainConfig(); tok = Tokenizer(cfg.tokenizer); model = MusicTransformer(cfg.model).eval()
    rows = []
    for cond in args.conditions.split(","):
        procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.competitors)] if cond == "competing" else []
        if procs: time.sleep(1.0)
        try: rows += speed(model, tok, args, cond if not procs else f"competing x{args.competitors}")
        finally:
            for p in procs: p.kill(); p.wait()
    if path is not None and not args.no_quality:
        q = quality(model, tok, args)
        print(json.dumps({"quality": q, "load": loadavg()}), flush=True)
    print("# summary (median over rounds)")
    for r in rows:
        print(f"{r['condition']:>14} batch {r['batch']}: torch {r['torch_tok_s']:7.1f} tok/s, onnx {r['onnx_tok_s']:7.1f} "
              f"({r['onnx/torch']:.2f}x), int8 {r['int8_tok_s']:7.1f} ({r['int8/torch']:.2f}x)  load {r['load']}")
    print(f"# load at the end {loadavg()}")


if __name__ == "__main__":
    main()
