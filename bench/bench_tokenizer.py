"""kelly's MIDI loading and REMI tokenizer against MidiTok 3.1's REMI, side by side in one run, on the same files.

Measures, in one process, with kelly and MidiTok interleaved repeat by repeat (best of `--repeat`):

- load:      symusic.Score(path) (MidiTok's loader)        vs kelly.midi.load_midi(path) (byte check + symusic)
- encode:    MidiTok encode(in-memory Score)                vs kelly encode(in-memory Music)
- file->ids: symusic.Score(path) + MidiTok encode           vs kelly Tokenizer.encode_file(path)
- decode:    MidiTok decode(TokSequence) -> Score           vs kelly decode(ids) -> Music
- corpus:    kelly tokenize_files on 1 worker vs every core (MidiTok has no parallel equivalent in this loop)

Throughput is counted in notes of the input files (symusic's count). Both tokenizers use REMI with programs,
tempos and time signatures and 32 velocity bins; MidiTok's grid is its default beat_res {(0, 4): 8, (4, 12): 4},
kelly's is (8, 3) (32nds and triplets). MidiTok is imported here only, never by kelly.

Run with the bench venv (it has miditok; kelly is installed there editable):
    /work/benchvenv/bin/python bench/bench_tokenizer.py [--corpus bach|primitive|DIR] [--limit N] [--repeat R]
The Bach chorales are built once under $KELLY_HOME by kelly.datasets.bach_chorales(). The machine load (from
/proc/loadavg) is printed before and after: on a shared 2-core machine read the ratios, not the absolute numbers.
"""
import argparse
import importlib.metadata
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import symusic

warnings.filterwarnings("ignore")


def load_average() -> str:
    try: return Path("/proc/loadavg").read_text().split(" ")[:3].__str__()
    except OSError: return "n/a"


def corpus_files(which: str, limit: int | None) -> list[Path]:
    if which == "bach":
        from kelly.datasets import bach_chorales
        files = sorted(Path(bach_chorales(progress=False)).glob("*.mid"))
    elif which == "primitive":
        import music21
        files = sorted((Path(music21.__file__).parent/"midi"/"testPrimitive").glob("*.mid"))
    else:
        from kelly.tokenizer import midi_files
        files = midi_files(which)
    return files[:limit] if limit else files


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="bach", help="bach, primitive, or a folder of MIDI files")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N files")
    ap.add_argument("--repeat", type=int, default=5, help="repeats per measurement (best is reported)")
    ap.add_argument("--workers", type=int, default=None, help="processes for the corpus measurement (default: every core)")
    ap.add_argument("--corpus-repeat", type=int, default=5, help="the corpus measurement tokenizes the files this many times")
    args = ap.parse_args()

    import miditok
    from kelly.midi import load_midi
    from kelly.tokenizer import Tokenizer, default_workers, tokenize_files

    files = corpus_files(args.corpus, args.limit)
    datas = [p.read_bytes() for p in files]
    n_notes = sum(symusic.Score(str(p)).note_num() for p in files)
    workers = args.workers or default_workers()
    print(f"corpus: {args.corpus}, {len(files)} files, {n_notes} notes; cores available: {default_workers()}; "
          f"load average before: {load_average()}")

    mt = miditok.REMI(miditok.TokenizerConfig(use_programs=True, use_tempos=True, use_time_signatures=True, num_velocities=32))
    kt = Tokenizer()
    print(f"MidiTok {importlib.metadata.version('miditok')} REMI vocab {len(mt)}; kelly REMI vocab {kt.vocab_size} ({kt.hash[:12]})")

    # warm up both (numba compile/cache load, MidiTok's lazy tables), and keep inputs for the in-memory steps
    scores = [symusic.Score(str(p)) for p in files]
    musics = [load_midi(p) for p in files]
    mt_seqs = [mt.encode(s) for s in scores]
    kt_ids = [kt.encode(m) for m in musics]
    for s in mt_seqs[:5]: mt.decode(s)
    for i in kt_ids[:5]: kt.decode(i)
    extra = sum(m.n_notes for m in musics) - n_notes
    if extra: print(f"(kelly loads {extra} more notes than symusic: note-ons without a note-off, which symusic drops)")

    rows = []
    def measure(name, midi_tok, kelly):
        t_mt = t_k = float("inf")
        for _ in range(args.repeat):  # interleave, so that load changes hit both sides alike
            t_mt = min(t_mt, best_of(midi_tok, 1)); t_k = min(t_k, best_of(kelly, 1))
        rows.append((name, n_notes / t_mt, n_notes / t_k))

    measure("load (file -> in memory)", lambda: [symusic.Score(str(p)) for p in files], lambda: [load_midi(p) for p in files])
    measure("encode (in memory -> ids)", lambda: [mt.encode(s) for s in scores], lambda: [kt.encode(m) for m in musics])
    measure("file -> ids", lambda: [mt.encode(symusic.Score(str(p))) for p in files], lambda: [kt.encode_file(p) for p in files])
    measure("decode (ids -> in memory)", lambda: [mt.decode(s) for s in mt_seqs], lambda: [kt.decode(i) for i in kt_ids])

    print(f"\n{'step':28s} {'MidiTok notes/s':>16s} {'kelly notes/s':>16s} {'kelly / MidiTok':>16s}")
    for name, a, b in rows:
        print(f"{name:28s} {a:16,.0f} {b:16,.0f} {b / a:15.2f}x")

    corpus = files * args.corpus_repeat  # a bigger job, so that pool start-up is a small part of it
    for w in (1, workers):
        r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        s0 = resource.getrusage(resource.RUSAGE_SELF)
        n_ok = sum(ids is not None for _, ids, _ in tokenize_files(kt, corpus, workers=w))
        wall = time.perf_counter() - t0
        r1, s1 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) + (s1.ru_utime - s0.ru_utime + s1.ru_stime - s0.ru_stime)
        assert n_ok == len(corpus)
        print(f"corpus file -> ids, kelly tokenize_files, {len(corpus)} files, {w} worker(s): {n_notes * args.corpus_repeat / wall:,.0f} notes/s "
              f"(wall {wall:.2f} s, cpu {cpu:.2f} s, {cpu / wall:.2f} cores busy)")
    tokens = sum(len(i) for i in kt_ids)
    print(f"sequence length: kelly {tokens / n_notes:.2f} tokens/note, MidiTok {sum(len(s.ids) for s in mt_seqs) / n_notes:.2f} tokens/note")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    sys.exit(main())
