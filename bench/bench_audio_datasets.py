"""Lazy audio crops on a 10,000-file corpus: memory stays flat as the corpus grows.

Renders two Bach chorales (once, under $KELLY_HOME), cuts them into short clips, replicates the clips into corpora
of each requested size in a temporary folder, and measures each size in a fresh process, side by side:

- cold audio-cache build (all cores, its own process) and warm open (stat every file, verify checksums);
- process RSS (psutil) before and after drawing the same number of augmented training crops (gain, polarity,
  pitch shift by resampling, mixing), split into its anonymous part (heap) and its file-backed part (mapped
  pages), where Linux reports them;
- crops/s for random training crops without and with augmentation (dataset items), and for `AudioLoader`
  batches (augmented, fastai collation);
- two references measured in the same process: the same crops read through the memory map (every page touched
  stays resident in the process), and the whole cache decoded into RAM as float32 (what "loading the corpus" costs).

Usage: python bench/bench_audio_datasets.py [--sizes 100,10000] [--crops 20000] [--length 8000] [--clip-s 1.0] [--bs 32]
Numbers on a shared 2-core machine are noisy; the ratios between columns of one run are what to read.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

MB = 2 ** 20
SR = 16000          # sample rate of the corpus and the cache
SOURCE_PIECES = 2   # rendered chorales the clips are cut from


def memory() -> dict:
    "RSS in MB from psutil, plus its anonymous and file-backed parts from /proc where available."
    out = {"rss": psutil.Process().memory_info().rss / MB}
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"): out[key] = int(value.split()[0]) / 1024
    return out


def clips(clip_s: float) -> list[np.ndarray]:
    "Real audio: two rendered chorales cut into clips of `clip_s` seconds."
    from kelly.audio import load_audio
    from kelly.audio_datasets import bach_chorales_audio
    folder = bach_chorales_audio(SOURCE_PIECES, progress=False)
    n = int(clip_s * SR)
    out = []
    for p in sorted(folder.glob("*.flac")):
        y, _ = load_audio(p, sr=SR)
        out += [y[i:i + n] for i in range(0, len(y) - n + 1, n)]
    return out


def replicate(src: list[np.ndarray], n: int, dest: Path) -> Path:
    "A corpus of `n` WAV files: the clips of `src` over and over, 1,000 per sub-folder."
    from kelly.audio import save_audio
    for i in range(n):
        save_audio(dest/f"part{i // 1000:02d}"/f"clip{i:05d}.wav", src[i % len(src)], SR)
    return dest


def build(folder: Path, cache_dir: Path) -> dict:
    "Cold audio-cache build of one corpus, in this (fresh) process, on every core."
    from kelly.audio_datasets import AudioCache
    from kelly.tokenizer import default_workers
    t = time.perf_counter()
    AudioCache.for_corpus(folder, sample_rate=SR, folder=cache_dir, progress=False).close()
    return {"build_s": time.perf_counter() - t, "workers": default_workers()}


def measure(folder: Path, cache_dir: Path, n_crops: int, length: int, bs: int) -> dict:
    "Open the built cache and draw crops, in this (fresh) process."
    from kelly.audio_datasets import AudioAugmentation, AudioCache, AudioLoader, RandomCrops
    res = {"mem_imported": memory()}
    t = time.perf_counter()
    cache = AudioCache.for_corpus(folder, sample_rate=SR, folder=cache_dir, progress=False)   # stat every file, verify checksums
    res["open_s"] = time.perf_counter() - t
    res.update(files=len(cache), hours=cache.n_samples / SR / 3600, cache_mb=cache.n_samples * cache.dtype.itemsize / MB)
    ds = RandomCrops(cache, length, seed=0, crops_per_epoch=n_crops, augment=AudioAugmentation(seed=0))
    res["mem_before"] = memory()
    t = time.perf_counter()
    for i in range(n_crops): ds.item(i)
    res["items_per_s"] = n_crops / (time.perf_counter() - t)
    res["mem_after_items"] = memory()
    plain = RandomCrops(cache, length, seed=0, crops_per_epoch=n_crops)
    t = time.perf_counter()
    for i in range(n_crops): plain.item(i)
    res["plain_items_per_s"] = n_crops / (time.perf_counter() - t)
    dl = AudioLoader(ds, bs=bs)
    t, seen = time.perf_counter(), 0
    for x, _ in dl: seen += x.shape[0]
    res["loader_crops_per_s"] = seen / (time.perf_counter() - t)
    res["mem_after_loader"] = memory()
    # reference 1: the same crops sliced from the memory map (pages stay mapped into this process)
    for i in range(n_crops):
        doc, start = ds.locate(i)
        lo = int(cache.offsets[ds.docs[doc]]) + start
        np.array(cache.samples[lo:lo + length], dtype=np.float32)
    res["mem_after_mmap_reads"] = memory()
    # reference 2: the whole corpus in RAM as float32
    everything = np.fromfile(cache.folder/cache.manifest["samples"]["file"], dtype=cache.dtype).astype(np.float32)
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
    ap.add_argument("--sizes", default="100,10000", help="corpus sizes in files, comma-separated")
    ap.add_argument("--crops", type=int, default=20000, help="training crops drawn per measurement")
    ap.add_argument("--length", type=int, default=8000, help="samples per crop")
    ap.add_argument("--clip-s", type=float, default=1.0, help="seconds per corpus file")
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--build", nargs=2, help=argparse.SUPPRESS)     # corpus folder, cache folder
    ap.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build:
        print(json.dumps(build(*map(Path, a.build))))
        return
    if a.measure:
        print(json.dumps(measure(*map(Path, a.measure), a.crops, a.length, a.bs)))
        return
    src = clips(a.clip_s)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kelly-bench-audio-") as tmp:
        for n in [int(s) for s in a.sizes.split(",")]:
            t = time.perf_counter()
            folder = replicate(src, n, Path(tmp)/f"corpus{n}")
            write_s = time.perf_counter() - t
            row = {"write_s": write_s, **_run_child("--build", folder, Path(tmp)/f"cache{n}")}
            row.update(_run_child("--measure", folder, Path(tmp)/f"cache{n}", "--crops", a.crops, "--length", a.length, "--bs", a.bs))
            rows.append(row)
    report(rows, a, len(src))


def report(rows: list[dict], a, n_clips: int):
    def line(label, fn, fmt="{:>14.1f}"):
        cells = [fn(r) for r in rows]
        ratio = f"{cells[-1] / cells[0]:>10.2f}x" if len(rows) > 1 and cells[0] else ""
        print(f"{label:<48}" + "".join(fmt.format(c) for c in cells) + ratio)
    def delta(key, base="mem_before", part="rss"): return lambda r: r[key].get(part, float("nan")) - r[base].get(part, float("nan"))
    print(f"kelly audio datasets benchmark: {SR} Hz int16 cache, {a.clip_s} s files ({n_clips} distinct clips of "
          f"{SOURCE_PIECES} rendered chorales), crops of {a.length} samples, {a.crops} crops per measurement, bs={a.bs}, "
          f"{os.cpu_count()} CPUs (shared machine: timings are noisy)")
    print(f"{'':<48}" + "".join(f"{r['files']:>8} files" for r in rows) + ("   last/first" if len(rows) > 1 else ""))
    line("hours of audio in cache", lambda r: r["hours"], "{:>14.3f}")
    line("sample file, MB", lambda r: r["cache_mb"])
    line("writing the WAV corpus, s", lambda r: r["write_s"], "{:>14.2f}")
    line("cold cache build, s (all cores)", lambda r: r["build_s"], "{:>14.2f}")
    line("warm cache open (stat + verify), s", lambda r: r["open_s"], "{:>14.3f}")
    line("RSS after imports, MB", lambda r: r["mem_imported"]["rss"])
    line("RSS growth opening the cache (metadata), MB", delta("mem_before", "mem_imported"), "{:>14.2f}")
    line("RSS growth, augmented crops (pread), MB", delta("mem_after_items"), "{:>14.2f}")
    line("  of which anonymous (heap), MB", delta("mem_after_items", part="RssAnon"), "{:>14.2f}")
    line("RSS growth, then AudioLoader batches, MB", delta("mem_after_loader", "mem_after_items"), "{:>14.2f}")
    line("ref: then the same crops via the memmap, MB", delta("mem_after_mmap_reads", "mem_after_loader"), "{:>14.2f}")
    line("ref: then the whole corpus in RAM (float32), MB", delta("mem_all_in_ram", "mem_after_mmap_reads"), "{:>14.2f}")
    line("training crops/s, no augmentation (items)", lambda r: r["plain_items_per_s"], "{:>14,.0f}")
    line("augmented training crops/s (items)", lambda r: r["items_per_s"], "{:>14,.0f}")
    line("augmented training crops/s (AudioLoader)", lambda r: r["loader_crops_per_s"], "{:>14,.0f}")


if __name__ == "__main__":
    main()
