"""Long pieces through the sliding KV cache: validity and MusPy's metrics of pieces 4x the training window against
pieces within it, from one model bundle.

Three sets of `--n` pieces are sampled with the same settings and seed (grammar constraints on, top-k `--top-k`):

- `within`: `max_len - 1` new tokens, so every position attends to the whole piece (no sliding);
- `long`: `--multiple` x `max_len` new tokens through the sliding KV cache (window = `max_len`, positions continue);
- `long_nowindow`: the same length with `window=0` (attention over everything; distances beyond any seen in
  training), the alternative the sliding cache replaces.

For each set: grammar validity, the largest share of one token (collapse), decode reports, and the mean and
standard error of every `kelly.music_metrics` metric; then, for the long sets, each metric's difference from the
`within` mean in units of the two sets' combined standard error (|z| < 2: within noise). Counts such as pitches
used grow with a piece's length, so the like-for-like comparison is paired: for every long piece, its
end (from the first Bar among its last `max_len` tokens) against its opening of the same number of tokens (inside
the window), each decoded as a piece of its own. The drift of each metric is the mean of tail - head over the
pieces, with its standard error: that shows drift at the end of a piece rather than an average over it.

Usage: python bench/bench_long_pieces.py --model RUN_OR_BUNDLE [--n 16] [--multiple 4] [--seed 0] [--json OUT]
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from kelly.exporters import load_bundle
from kelly.metrics import max_token_share
from kelly.music_metrics import MUSIC_METRICS, music_metrics
from kelly.samplers import generate


def bundle_path(p: Path) -> Path:
    return p/"bundle" if (p/"bundle"/"manifest.json").is_file() else p


def head_and_tail(seq: np.ndarray, n_tokens: int, tok) -> tuple[np.ndarray, np.ndarray]:
    """The end of a piece from the first Bar among its last `n_tokens` tokens (or the last Bar, if none), and its opening of the same length, each
    after a bos so that it decodes as a piece of its own: the same number of tokens at the start (inside the
    window) and at the end (after the cache has slid `multiple - 1` windows)."""
    bars = np.flatnonzero(seq == tok.bar_id)
    inside = bars[bars >= len(seq) - n_tokens]
    tail_start = int(inside[0]) if len(inside) else int(bars[-1])   # a bar longer than n_tokens: from its start
    tail = seq[tail_start:]
    return seq[:len(tail) + 1], np.concatenate([[tok.bos_id], tail])


def measure(seqs, tok) -> dict:
    valid = [float(tok.grammar.validity(s)) for s in seqs]
    share = [float(max_token_share(s, tok)) for s in seqs]
    musics, skipped, notes = [], 0, []
    for s in seqs:
        music, rep = tok.decode_with_report(s)
        musics.append(music); skipped += rep.misplaced + rep.unfinished + rep.out_of_range; notes.append(music.n_notes)
    rows = [music_metrics(m).to_dict() for m in musics if m.n_notes]
    metrics = {}
    for k in MUSIC_METRICS:
        v = np.array([r[k] for r in rows if r[k] is not None], float)
        metrics[k] = {"mean": float(v.mean()) if len(v) else None, "se": float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None, "n": int(len(v))}
    return {"pieces": len(seqs), "tokens_mean": float(np.mean([len(s) for s in seqs])), "bars_mean": float(np.mean([(s == tok.bar_id).sum() for s in seqs])),
            "notes_mean": float(np.mean(notes)), "validity_mean": float(np.mean(valid)), "validity_min": float(np.min(valid)),
            "top_token_share_max": float(np.max(share)), "skipped_ids": int(skipped), "metrics": metrics}


def z(a: dict, b: dict) -> float | None:
    if a["mean"] is None or b["mean"] is None or not a["se"] or not b["se"]: return None
    return (b["mean"] - a["mean"]) / math.sqrt(a["se"] ** 2 + b["se"] ** 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="a run folder or bundle folder")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--multiple", type=int, default=4, help="long pieces are this many training windows")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b = load_bundle(bundle_path(args.model))
    tok, W = b.tokenizer, b.model.config.max_len
    common = dict(n=args.n, seed=args.seed, top_k=args.top_k, stop_at_eos=False)
    sets, out = {}, {"model": str(args.model), "window": W, "n": args.n, "multiple": args.multiple}
    for name, kw in (("within", dict(max_new_tokens=W - 1)), ("long", dict(max_new_tokens=args.multiple * W)),
                     ("long_nowindow", dict(max_new_tokens=args.multiple * W, window=0))):
        t = time.perf_counter()
        gen = generate(b.model, tok, **common, **kw)
        sets[name] = gen.sequences()
        out[name] = measure(sets[name], tok)
        out[name]["seconds"] = round(time.perf_counter() - t, 1)
    for name in ("long", "long_nowindow"):
        pairs = [head_and_tail(s, W, tok) for s in sets[name]]
        out[f"{name}_head"] = measure([h for h, _ in pairs], tok)
        out[f"{name}_tail"] = measure([t for _, t in pairs], tok)
        heads = [music_metrics(tok.decode(h)).to_dict() for h, _ in pairs]
        tails = [music_metrics(tok.decode(t)).to_dict() for _, t in pairs]
        out[f"{name}_drift"] = {}
        for k in MUSIC_METRICS:   # paired: tail minus head of the same piece
            d = np.array([t[k] - h[k] for h, t in zip(heads, tails) if h[k] is not None and t[k] is not None], float)
            se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
            out[f"{name}_drift"][k] = {"mean": float(d.mean()) if len(d) else None, "se": se, "z": float(d.mean() / se) if se else None, "n": int(len(d))}
    print(f"window {W} tokens; {args.n} pieces per set; long = {args.multiple} x window")
    names = ["within", "long", "long_head", "long_tail", "long_nowindow_tail"]
    print(f"{'':26}" + "".join(f"{n:>20}" for n in names))
    for key in ("tokens_mean", "bars_mean", "notes_mean", "validity_mean", "validity_min", "top_token_share_max", "skipped_ids"):
        print(f"{key:26}" + "".join(f"{out[n][key]:>20.3f}" for n in names))
    print("music metrics, mean ± standard error; drift = tail - head of the same pieces (paired), z = drift / its standard error")
    print(f"{'':26}" + "".join(f"{n:>20}" for n in names) + f"{'drift (sliding)':>24}{'drift (window=0)':>24}")
    for k in MUSIC_METRICS:
        cells = []
        for n in names:
            m = out[n]["metrics"][k]
            cells.append(f"{'-':>20}" if m["mean"] is None else f"{m['mean']:>13.3f}±{(m['se'] or 0):<6.3f}")
        for n in ("long_drift", "long_nowindow_drift"):
            d = out[n][k]
            cells.append(f"{'-':>24}" if d["z"] is None else f"{d['mean']:>+14.3f} (z{d['z']:+5.1f})")
        print(f"{k:26}" + "".join(cells))
    if args.json: args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
