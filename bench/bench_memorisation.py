"""The memorisation index (`kelly.evaluation.NgramIndex`) at corpus scale: build time, memory, lookup time.

Tokenizes the Bach chorales once (the real token cache, under $KELLY_HOME), then tiles their token stream into
corpora of each requested number of files (a 10,000-file corpus is the chorales about 25 times over, written
to a temporary file and memory-mapped, read through the same `read(start, stop)` calls as a `TokenCache`).
For each size, in a fresh process: the index's build time, the bytes it holds, the process's peak RSS
growth during the build, and the time to check one chorale-length generated piece.

Usage: python bench/bench_memorisation.py [--sizes 410,10000] [--checks 20]
Numbers on a shared 2-core machine are noisy.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 2 ** 20


class TiledCache:
    "The chorales' token cache repeated until it holds `n_docs` documents: the attributes `NgramIndex` reads."
    def __init__(self, cache, n_docs: int, folder: Path):
        reps = -(-n_docs // len(cache))
        lengths = np.tile(cache.lengths, reps)[:n_docs]
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.n_tokens = int(self.offsets[-1])
        path = folder/"tokens.bin"
        mm = np.memmap(path, cache.dtype, mode="w+", shape=(self.n_tokens,))
        src = np.asarray(cache.tokens)
        for r in range(reps):
            s = r * len(src)
            if s >= self.n_tokens: break
            mm[s:min(s + len(src), self.n_tokens)] = src[:min(len(src), self.n_tokens - s)]
        mm.flush(); del mm
        self.tokens = np.memmap(path, cache.dtype, mode="r", shape=(self.n_tokens,))
        self.names = [f"{i // len(cache)}/{cache.names[i % len(cache)]}" for i in range(n_docs)]
        self.tokenizer_hash, self.folder = cache.tokenizer_hash, folder
    def read(self, start, stop): return np.array(self.tokens[start:stop])
    def __len__(self): return len(self.names)


def one_size(n_docs: int, checks: int) -> dict:
    from kelly.datasets import TokenCache, bach_chorales
    from kelly.evaluation import NgramIndex
    from kelly.tokenizer import Tokenizer, TokenType
    tok = Tokenizer()
    cache = TokenCache.for_corpus(bach_chorales(progress=False), tok, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tiled = TiledCache(cache, n_docs, Path(tmp))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time.perf_counter()
        index = NgramIndex(tiled, tok)
        build = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rng = np.random.default_rng(0)
        pieces = [np.asarray(cache.doc(int(i)), np.int64) for i in rng.integers(0, len(cache), checks)]
        for p in pieces:   # a fresh piece: the chorale's rhythm with its pitches in a random order
            m = tok.type_of[p] == TokenType.PITCH
            p[m] = rng.permutation(p[m])
        t = time.perf_counter()
        results = [index.check(p) for p in pieces]
        check = (time.perf_counter() - t) / checks
        copy = index.check(np.asarray(cache.doc(0), np.int64))
    return {"docs": n_docs, "tokens": tiled.n_tokens, "build_s": build, "index_mb": index.nbytes / MB,
            "bytes_per_token": index.nbytes / tiled.n_tokens, "peak_rss_growth_mb": peak - base,
            "check_ms": 1000 * check, "fresh_flagged": sum(r.flagged for r in results),
            "copy_flagged": copy.flagged, "copy_bars": copy.longest_bars}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="410,10000", help="corpus sizes in files, comma-separated")
    ap.add_argument("--checks", type=int, default=20, help="generated pieces checked per size")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.checks))); return
    print(f"{'files':>7} {'tokens':>12} {'build s':>8} {'index MiB':>10} {'B/token':>8} {'peak RSS +MiB':>14} {'check ms':>9}  fresh flagged  copy (bars)")
    for n in map(int, args.sizes.split(",")):
        r = subprocess.run([sys.executable, __file__, "--one", str(n), "--checks", str(args.checks)], capture_output=True, text=True, check=True)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{d['docs']:>7} {d['tokens']:>12,} {d['build_s']:>8.2f} {d['index_mb']:>10.1f} {d['bytes_per_token']:>8.1f} "
              f"{d['peak_rss_growth_mb']:>14.1f} {d['check_ms']:>9.1f}  {d['fresh_flagged']:>6}/{args.checks}  {d['copy_flagged']} ({d['copy_bars']})")


if __name__ == "__main__":
    main()
