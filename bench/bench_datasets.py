"""Lazy windowed datasets on a 10,000-file corpus: memory stays flat as the corpus grows.

Builds the Bach chorales (once, under $KELLY_HOME), replicates them into corpora of each requested size, and
measures each size in a fresh process, side by side:

- cold token-cache build (all cores, its own process) and warm open (stat every file, verify checksums);
- process RSS (psutil) before and after drawing the same number of augmented training windows, split into its
  anonymous part (heap) and its file-backed part (mapped pages), where Linux reports them;
- windows/s for random training windows without and with augmentation (dataset items), and for `WindowLoader`
  batches (augmented, fastai collation);
- two references measured in the same process: the same windows read through the memory map (every page touched
  stays resident in the process), and the whole token array loaded into RAM (what "loading the corpus" costs).

Usage: python bench/bench_datasets.py [--sizes 1000,10000] [--windows 20000] [--seq-len 256] [--bs 32]
Numbers on a shared 2-core machine are noisy; the ratios between columns of one run are what to read.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

MB = 2 ** 20


def memory() -> dict:
    "RSS in MB from psutil, plus its anonymous and file-backed parts from /proc where available."
    out = {"rss": psutil.Process().memory_info().rss / MB}
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"): out[key] = int(value.split()[0]) / 1024
    return out


def replicate(src: list[Path], n: int, dest: Path) -> Path:
    "A corpus of `n` files: copies of `src` in sub-folders copy000/, copy001/, ... (idempotent)."
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        s = src[i % len(src)]
        p = dest/f"copy{i // len(src):03d}"/s.name
        if not p.exists():
            p.parent.mkdir(exist_ok=True)
            shutil.copyfile(s, p)
    return dest


def build(folder: Path, cache_dir: Path) -> dict:
    "Cold token-cache build of one corpus, in this (fresh) process, on every core."
    from kelly.datasets import TokenCache
    from kelly.tokenizer import Tokenizer, TokenizerConfig, default_workers
    t = time.perf_counter()
    TokenCache.for_corpus(folder, Tokenizer(TokenizerConfig()), folder=cache_dir, progress=False).close()
    return {"build_s": time.perf_counter() - t, "workers": default_workers()}


def measure(folder: Path, cache_dir: Path, n_windows: int, seq_len: int, bs: int) -> dict:
    "Open the built cache and draw windows, in this (fresh) process."
    from kelly.datasets import Augmentation, AugmentConfig, RandomWindows, TokenCache, WindowLoader
    from kelly.tokenizer import Tokenizer, TokenizerConfig
    tok = Tokenizer(TokenizerConfig())
    res = {"files": sum(1 for _ in folder.rglob("*.mid")), "mem_imported": memory()}
    t = time.perf_counter()
    cache = TokenCache.for_corpus(folder, tok, folder=cache_dir, progress=False)   # stat every file, verify checksums
    res["open_s"] = time.perf_counter() - t
    res.update(tokens=cache.n_tokens, cache_mb=cache.n_tokens * cache.dtype.itemsize / MB)
    ds = RandomWindows(cache, tok, seq_len=seq_len, seed=0, augment=Augmentation(tok, AugmentConfig(), seed=0))
    n = min(n_windows, len(ds))
    res["mem_before"] = memory()
    t = time.perf_counter()
    for i in range(n): ds.item(i)
    res["items_per_s"] = n / (time.perf_counter() - t)
    res["mem_after_items"] = memory()
    plain = RandomWindows(cache, tok, seq_len=seq_len, seed=0)
    t = time.perf_counter()
    for i in range(n): plain.item(i)
    res["plain_items_per_s"] = n / (time.perf_counter() - t)
    dl = WindowLoader(ds, bs=bs)
    t, seen = time.perf_counter(), 0
    for x, y in dl:
        seen += x.shape[0]
        if seen >= n: break
    res["loader_windows_per_s"] = seen / (time.perf_counter() - t)
    res["mem_after_loader"] = memory()
    # reference 1: the same windows sliced from the memory map (pages stay mapped into this process)
    for i in range(n):
        doc, start = ds.locate(i)
        d = ds.docs[doc]
        np.array(cache.tokens[cache.offsets[d] + max(start - 1, 0):cache.offsets[d] + start + seq_len])
    res["mem_after_mmap_reads"] = memory()
    # reference 2: the whole corpus in RAM
    everything = np.fromfile(cache.folder/cache.manifest["tokens"]["file"], dtype=cache.dtype).astype(np.int64)
    res["mem_all_in_ram"] = memory()
    res["in_ram_mb"] = everything.nbytes / MB
    cache.close()
    return res


def _run_child(*args) -> dict:
    r = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True)
    if r.returncode: sys.exit(f"benchmark child {args} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000", help="corpus sizes in files, comma-separated")
    ap.add_argument("--windows", type=int, default=20000, help="training windows drawn per measurement")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--build", nargs=2, help=argparse.SUPPRESS)     # corpus folder, cache folder
    ap.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build:
        print(json.dumps(build(*map(Path, a.build))))
        return
    if a.measure:
        print(json.dumps(measure(*map(Path, a.measure), a.windows, a.seq_len, a.bs)))
        return
    from kelly.core import kelly_path
    from kelly.datasets import bach_chorales
    src = sorted(bach_chorales().glob("*.mid"))
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            folder, cache_dir = replicate(src, n, kelly_path("bench", f"bach_x{n}")), Path(tmp)/f"cache{n}"
            row = _run_child("--build", folder, cache_dir)
            row.update(_run_child("--measure", folder, cache_dir, "--windows", a.windows, "--seq-len", a.seq_len, "--bs", a.bs))
            rows.append(row)
    report(rows, a)


def report(rows: list[dict], a):
    def line(label, fn, fmt="{:>14.1f}"):
        cells = [fn(r) for r in rows]
        ratio = f"{cells[-1] / cells[0]:>10.2f}x" if len(rows) > 1 and cells[0] else ""
        print(f"{label:<46}" + "".join(fmt.format(c) for c in cells) + ratio)
    def delta(key, base="mem_before", part="rss"): return lambda r: r[key].get(part, float("nan")) - r[base].get(part, float("nan"))
    print(f"kelly datasets benchmark: seq_len={a.seq_len}, bs={a.bs}, {a.windows} windows per measurement, "
          f"{os.cpu_count()} CPUs (shared machine: timings are noisy)")
    print(f"{'':<46}" + "".join(f"{r['files']:>8} files" for r in rows) + ("   last/first" if len(rows) > 1 else ""))
    line("tokens in cache", lambda r: r["tokens"], "{:>14,.0f}")
    line("token file, MB", lambda r: r["cache_mb"])
    line("cold cache build, s (all cores)", lambda r: r["build_s"], "{:>14.2f}")
    line("warm cache open (stat + verify), s", lambda r: r["open_s"], "{:>14.3f}")
    line("RSS after imports, MB", lambda r: r["mem_imported"]["rss"])
    line("RSS growth opening the cache (metadata), MB", delta("mem_before", "mem_imported"), "{:>14.2f}")
    line("RSS growth, augmented windows (pread), MB", delta("mem_after_items"), "{:>14.2f}")
    line("  of which anonymous (heap), MB", delta("mem_after_items", part="RssAnon"), "{:>14.2f}")
    line("RSS growth, then WindowLoader batches, MB", delta("mem_after_loader", "mem_after_items"), "{:>14.2f}")
    line("ref: then the same windows via the memmap, MB", delta("mem_after_mmap_reads", "mem_after_loader"), "{:>14.2f}")
    line("ref: then the whole corpus in RAM (int64), MB", delta("mem_all_in_ram", "mem_after_mmap_reads"), "{:>14.2f}")
    line("training windows/s, no augmentation (items)", lambda r: r["plain_items_per_s"], "{:>14,.0f}")
    line("augmented training windows/s (items)", lambda r: r["items_per_s"], "{:>14,.0f}")
    line("augmented training windows/s (WindowLoader)", lambda r: r["loader_windows_per_s"], "{:>14,.0f}")


if __name__ == "__main__":
    main()
