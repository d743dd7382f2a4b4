"""Print kelly's tokenizer round-trip figures on the Bach chorales and on music21's test MIDI files.

For each corpus: `roundtrip: <matched>/<total> notes (<percent>%)` (notes whose pitch, onset, duration, velocity
and program survive encode -> decode, against the input quantized by the tokenizer's own rules), the files that
failed to load, the files below 100%, and what quantizing to the vocabulary changed (so that "100%" can be read
next to how much the reference differs from the raw file).

Usage: python tools/roundtrip_report.py [--tokenizer tok.json] [--workers N] [--corpus bach primitive DIR ...]
The Bach chorales are built once under $KELLY_HOME (kelly.datasets.bach_chorales).
"""
import argparse
import sys
import time
from pathlib import Path

import music21

from kelly.tokenizer import Tokenizer, check_roundtrip, midi_files


def corpus(name: str) -> list[Path]:
    if name == "bach":
        from kelly.datasets import bach_chorales
        return midi_files(bach_chorales(progress=False))
    if name == "primitive":
        return sorted((Path(music21.__file__).parent/"midi"/"testPrimitive").glob("*.mid"))
    return midi_files(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", help="a tokenizer JSON file (default: Tokenizer())")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    ap.add_argument("--corpus", nargs="+", default=["bach", "primitive"], help="bach, primitive and/or folders")
    args = ap.parse_args()
    tok = Tokenizer.load(args.tokenizer) if args.tokenizer else Tokenizer()
    print(f"tokenizer: vocab {tok.vocab_size}, hash {tok.hash[:12]}, grid {tok.config.grid}, tpq {tok.config.tpq}")
    perfect = True
    for name in args.corpus:
        files = corpus(name)
        t0 = time.perf_counter()
        report = check_roundtrip(files, tok, workers=args.workers)
        dt = time.perf_counter() - t0
        print(f"\n== {name}: {report.n_files} files, {dt:.1f} s")
        print("\n".join(report.lines()))
        for path, matched, total in report.imperfect: print(f"below 100%: {path}: {matched}/{total}")
        print(f"quantizing to the vocabulary: {report.changes}")
        perfect &= report.matched == report.total and not report.failed
    return 0 if perfect else 1


if __name__ == "__main__":
    sys.exit(main())
