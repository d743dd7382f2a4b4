"""`kelly generate --backend torch|onnx|int8` timed end to end, as a user runs it, alternating backends in each round.

Each run is a fresh `kelly generate` process (import, bundle load, the ONNX export or quantization where the bundle
does not carry them, decoding, MIDI and piano-roll writing): the wall time a user waits. Conditions `as-is` and
`competing` (beside N CPU-bound busy loops this script starts). Prints the load and each backend's time over torch's.

Usage: python bench/bench_generate_cli.py --model RUN_OR_BUNDLE [-n 8] [--max_new_tokens 512] [--rounds 2] [--competitors 1]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BACKENDS = ("torch", "onnx", "int8")


def loadavg() -> str:
    try: return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError: return "n/a"


def run(args, backend: str, out: str) -> float:
    cmd = [sys.executable, "-m", "kelly.cli", "--log-level", "WARNING", "generate", "--model", args.model, "-n", str(args.n),
           "--max_new_tokens", str(args.max_new_tokens), "--seed", "0", "--backend", backend, "--out", out]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0: sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--competitors", type=int, default=1)
    ap.add_argument("--conditions", default="as-is,competing")
    args = ap.parse_args()
    print(f"# bench_generate_cli: n={args.n}, max_new_tokens={args.max_new_tokens}, load {loadavg()}", flush=True)
    tmp = tempfile.mkdtemp(prefix="kelly-bench-gen-")
    try:
        for cond in args.conditions.split(","):
            procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.competitors)] if cond == "competing" else []
            try:
                times = {b: [] for b in BACKENDS}
                for r in range(args.rounds):
                    for b in BACKENDS: times[b].append(run(args, b, os.path.join(tmp, f"{b}-{r}")))
                med = {b: statistics.median(v) for b, v in times.items()}
                print(f"{cond:>10}: " + ", ".join(f"{b} {med[b]:.1f} s" for b in BACKENDS)
                      + f"; torch/onnx {med['torch'] / med['onnx']:.2f}x, torch/int8 {med['torch'] / med['int8']:.2f}x"
                      + f"  runs {dict((b, [round(x, 1) for x in v]) for b, v in times.items())}  load {loadavg()}", flush=True)
            finally:
                for p in procs: p.kill(); p.wait()
    finally: shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
