"""Code prior speed and the delay pattern against flattening, side by side in one run (load printed).

1. Decoding speed of the default-size prior (`PriorConfig()`: 4 layers, width 256; speed does not depend on the
   weights), delay pattern: frames per second at batch 1 and 8, with the KV cache and without (recomputing the
   window each step, on a shorter clip), and the flattened pattern with the cache at the same model size.
   Decoding steps per second of audio are printed for both patterns (delay: frame_rate + (Q - 1) per window; flat:
   Q × frame_rate).
2. End to end: `--seconds` of audio (default 60) from a prior bundle (`--model PRIOR_RUN`, with its codec) or, without
   one, the default-size untrained prior and the newest codec bundle: sampling + chunked decoding, seconds of audio per
   second of wall time.
3. `--compare-patterns STEPS`: trains a delay and a flattened prior of the same size for STEPS steps each on the
   codec's code cache (same windows of `--frames` frames) and prints both validation losses (nats per code).

Usage: python bench/bench_prior.py [--model PRIOR_RUN] [--codec CODEC_RUN] [--seconds 60] [--threads 2] [--compare-patterns 150]
"""
import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kelly.prior import CodePrior, PriorConfig  # noqa: E402
from kelly.code_sampler import decode_long, sample_codes  # noqa: E402
from kelly.exporters import load_bundle, load_prior  # noqa: E402


def load() -> str: return " ".join(f"{x:.1f}" for x in os.getloadavg())


def frames_per_second(prior, n: int, seconds: float, use_cache: bool) -> float:
    sample_codes(prior, n=n, seconds=0.2, seed=0, use_cache=use_cache)  # warm-up
    t0 = time.perf_counter()
    gen = sample_codes(prior, n=n, seconds=seconds, seed=0, use_cache=use_cache)
    return (gen.codes.shape[-1]) / (time.perf_counter() - t0)


def decoding_speed(args):
    print(f"== decoding speed, default-size prior (load {load()})")
    delay = CodePrior(PriorConfig()).eval()
    flat = CodePrior(PriorConfig(pattern="flat", max_frames=PriorConfig().max_frames)).eval()
    fr, Q = delay.config.frame_rate, delay.config.n_codebooks
    for name, p in (("delay", delay), ("flat", flat)):
        steps = p.pattern.n_steps(int(60 * fr)) / 60
        print(f"{name:5s}: {steps:7.1f} decoding steps per second of audio ({p.n_params() / 1e6:.2f} M parameters)")
    rows = []
    for n in (1, 8):
        cached = frames_per_second(delay, n, args.clip, True)
        plain = frames_per_second(delay, n, args.clip / 5, False)
        flat_cached = frames_per_second(flat, n, args.clip / 5, True)
        rows.append((n, cached, plain, flat_cached))
        print(f"batch {n}: delay + cache {cached:7.1f} frames/s ({cached / fr:5.2f}x realtime per clip, {n * cached / fr:5.2f}x for the batch); "
              f"delay, no cache {plain:6.1f} frames/s (cache {cached / plain:.1f}x faster); flat + cache {flat_cached:6.1f} frames/s "
              f"(delay {cached / flat_cached:.1f}x faster)   [load {load()}]")
    return rows


def end_to_end(args):
    print(f"== end to end, {args.seconds:g} s (load {load()})")
    if args.model:
        pair = load_prior(Path(args.model)/"bundle" if (Path(args.model)/"bundle").is_dir() else args.model)
        prior, codec = pair.prior.model, pair.codec.model
    else:
        from kelly.cli import newest_bundle
        codec_path = Path(args.codec)/"bundle" if args.codec else newest_bundle(kind="codec")
        codec = load_bundle(codec_path, kind="codec").model
        prior = CodePrior(PriorConfig.for_codec(codec, "untrained")).eval()
    for n in (1, 2):
        t0 = time.perf_counter()
        gen = sample_codes(prior, n=n, seconds=args.seconds, seed=0)
        t1 = time.perf_counter()
        audio = decode_long(codec, gen.codes)
        t2 = time.perf_counter()
        print(f"n={n}: sampling {t1 - t0:.1f} s + chunked decoding {t2 - t1:.1f} s = {t2 - t0:.1f} s for {n} x {args.seconds:g} s: "
              f"{args.seconds / (t2 - t0):.2f}x realtime per clip, {n * args.seconds / (t2 - t0):.2f}x for the batch "
              f"({gen.steps} decoding steps)   [load {load()}]")


def compare_patterns(args):
    from kelly.prior_trainer import PriorDataConfig, PriorTrainConfig, train_prior
    from kelly.reliability import ReliabilityConfig
    print(f"== delay vs flat, {args.compare_patterns} steps each, windows of {args.frames} frames (load {load()})")
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))/f"kelly-bench-prior-{os.getpid()}"
    from kelly.cli import newest_bundle
    codec = Path(args.codec) if args.codec else newest_bundle(kind="codec")
    for pattern in ("delay", "flat"):
        cfg = PriorTrainConfig(name=f"bench-{pattern}", runs_dir=tmp, codec=codec, device="cpu",
                               data=PriorDataConfig(bs=8, windows_per_epoch=8 * args.compare_patterns),
                               model=PriorConfig(pattern=pattern, max_frames=args.frames),
                               reliability=ReliabilityConfig(checkpoint_every=0, sample_every=0))
        t0 = time.perf_counter()
        r = train_prior(cfg, progress=False)
        print(f"{pattern:5s}: valid loss {r.metrics['valid_loss']:.4f} nats per code after {r.metrics['steps']} steps, "
              f"{time.perf_counter() - t0:.0f} s   [load {load()}]")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a prior run folder or bundle (with its codec beside it)")
    ap.add_argument("--codec", default=None, help="a codec run folder (default: the newest codec bundle)")
    ap.add_argument("--seconds", type=float, default=60.0, help="end-to-end clip length")
    ap.add_argument("--clip", type=float, default=10.0, help="seconds per decoding-speed measurement (cached)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare-patterns", type=int, default=0, metavar="STEPS", help="also train delay and flat priors this many steps each")
    ap.add_argument("--frames", type=int, default=64, help="window frames for --compare-patterns")
    ap.add_argument("--skip-speed", action="store_true", help="only the end-to-end run (and --compare-patterns)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} intra-op thread(s), cpus {len(os.sched_getaffinity(0))}")
    if not args.skip_speed: decoding_speed(args)
    end_to_end(args)
    if args.compare_patterns: compare_patterns(args)


if __name__ == "__main__":
    main()
