"""kelly's ResidualVQ vs vector-quantize-pytorch's ResidualVQ with EnCodec's settings, side by side in one run.

Both quantizers: 8 codebooks x 1024 codes, EMA decay 0.99, k-means init (10 iterations) on the first batch, dead-code
reset at 2 hits per step (vector-quantize-pytorch: `threshold_ema_dead_code=2`, rotation trick on; kelly: the same
threshold written as a share of the expected hits, `dead_share = 2 * 1024 / vectors per step`), commitment weight 1,
no quantizer dropout. Data: `--batch` crops of `--frames` frames of standardised log-mel features (64 bands, hop 64),
projected to `--dim` dimensions by a fixed random matrix: a `[16, 300, 128]` batch by default, a new random set of
crops at every step, the same for both. Two sources (`--data`, both by default):
- `clip`: the one recording music21 ships (about 50 s). Crops of one short clip overlap, so a batch repeats frames
  exactly (27% of the vectors of a batch are copies); a codebook that fits its centroids exactly then leaves exact-zero
  residuals for the next codebook.
- `chorales`: the first `--pieces` Bach chorales of kelly's rendered corpus, the codec's own training data (rendered
  with FluidSynth on first use, about 2.5 minutes for the whole corpus).

A training step is forward + backward of `mean(quantized^2) + commitment loss` with respect to the input. The two
libraries alternate step by step (so a change in machine load hits both), the first step (k-means) is reported
apart, and the other steps' median is compared. After the same steps on the same data, codebook usage (share of
codes used per codebook) and the relative quantization error are measured on one held-out batch in eval mode.

vector-quantize-pytorch is a benchmark-only dependency, not in kelly's extras (it brings einx, einops and loguru):
`pip install vector-quantize-pytorch==1.32.0` (the version measured).

Usage: python bench/bench_quantizer.py [--data both|clip|chorales] [--pieces 40] [--steps 20] [--threads 2] [--batch 16]
       [--frames 300] [--dim 128] [--seed 0]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kelly.audio import load_audio, log_mel  # noqa: E402
from kelly.quantizer import QuantizerConfig, ResidualVQ  # noqa: E402

N_CODEBOOKS, CODEBOOK_SIZE, DECAY, KMEANS_ITERS, DEAD_HITS = 8, 1024, 0.99, 10, 2.0   # EnCodec's settings


SAMPLE_RATE, N_FFT, HOP, N_MELS = 16000, 1024, 64, 64   # the log-mel features quantized


def recordings(data: str, pieces: int) -> list[Path]:
    "The audio files of one data source: music21's recording (`clip`) or the first `pieces` rendered chorales."
    if data == "clip":
        import music21
        return [Path(music21.__file__).parent/"audioSearch"/"test_audio.wav"]
    from kelly.audio_datasets import bach_chorales_audio
    return sorted(p for p in Path(bach_chorales_audio(progress=False)).iterdir() if p.suffix == ".flac")[:pieces]


def features(dim: int, files: list[Path]) -> torch.Tensor:
    "Standardised 64-band log-mel frames (hop 64 at 16 kHz) of `files`, end to end, projected to `dim`: [n_frames, dim]."
    mels = []
    for f in files:
        y, sr = load_audio(f, sr=SAMPLE_RATE)
        mels.append(log_mel(y, sr=sr, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS).float())
    m = torch.cat(mels, 1)
    m = (m - m.mean(1, keepdim=True)) / m.std(1, keepdim=True)
    proj = torch.randn(dim, N_MELS, generator=torch.Generator().manual_seed(1234)) / 8
    return (proj @ m).t().contiguous()


def crops(feats, n, t, gen):
    "`n` random crops of `t` frames: [n, t, dim] (channels last)."
    starts = torch.randint(0, len(feats) - t, (n,), generator=gen)
    return torch.stack([feats[s:s + t] for s in starts.tolist()])


def usage(codes):
    "Share of the codes used by each codebook, from codes [B, Q, T]."
    return [len(torch.unique(codes[:, k])) / CODEBOOK_SIZE for k in range(codes.shape[1])]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("both", "clip", "chorales"), default="both", help="feature source(s), see above")
    ap.add_argument("--pieces", type=int, default=40, help="chorales: how many rendered chorales")
    ap.add_argument("--steps", type=int, default=20, help="training steps of each quantizer (the first one runs k-means)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="seeds the crops and both quantizers' draws")
    args = ap.parse_args()
    try:
        from vector_quantize_pytorch import ResidualVQ as LucidRVQ
    except ImportError:
        sys.exit("bench_quantizer.py compares against vector-quantize-pytorch, which is not installed: "
                 "pip install vector-quantize-pytorch==1.32.0")
    torch.set_num_threads(args.threads)
    for data in (("clip", "chorales") if args.data == "both" else (args.data,)):
        compare(args, data, LucidRVQ)


def compare(args, data: str, LucidRVQ):
    "Train both quantizers side by side on one data source and print their speed, usage and error."
    from importlib.metadata import version
    files = recordings(data, args.pieces)
    feats = features(args.dim, files)
    n_vectors = args.batch * args.frames
    torch.manual_seed(args.seed)
    kelly = ResidualVQ(QuantizerConfig(dim=args.dim, n_codebooks=N_CODEBOOKS, codebook_size=CODEBOOK_SIZE, decay=DECAY,
                                       kmeans_iters=KMEANS_ITERS, dead_share=DEAD_HITS * CODEBOOK_SIZE / n_vectors,
                                       commitment=1.0, quantizer_dropout=0.0)).train()
    lucid = LucidRVQ(dim=args.dim, num_quantizers=N_CODEBOOKS, codebook_size=CODEBOOK_SIZE, decay=DECAY, kmeans_init=True,
                     kmeans_iters=KMEANS_ITERS, threshold_ema_dead_code=DEAD_HITS, rotation_trick=True,
                     commitment_weight=1.0).train()

    def kelly_step(x):
        x = x.transpose(1, 2).clone().requires_grad_()         # kelly is channels first: [B, D, T]
        out = kelly(x)
        (out.quantized.pow(2).mean() + out.commit_loss).backward()

    def lucid_step(x):
        x = x.clone().requires_grad_()
        quantized, _, commit = lucid(x)
        (quantized.pow(2).mean() + commit.sum()).backward()

    gen = torch.Generator().manual_seed(args.seed)
    times = {"kelly": [], "vector-quantize-pytorch": []}
    for _ in range(args.steps):
        x = crops(feats, args.batch, args.frames, gen)
        for name, step in (("kelly", kelly_step), ("vector-quantize-pytorch", lucid_step)):
            t0 = time.perf_counter()
            step(x)
            times[name].append(time.perf_counter() - t0)

    held_out = crops(feats, args.batch, args.frames, torch.Generator().manual_seed(12345))
    kelly.eval(); lucid.eval()
    with torch.no_grad():
        k_out = kelly(held_out.transpose(1, 2))
        k_codes, k_rec = k_out.codes, k_out.quantized.transpose(1, 2)
        l_rec, l_codes, _ = lucid(held_out)
        l_codes = l_codes.transpose(1, 2)                       # [B, T, Q] -> [B, Q, T]
    energy = float(held_out.pow(2).sum())
    res = {"kelly": (usage(k_codes), float((k_rec - held_out).pow(2).sum()) / energy),
           "vector-quantize-pytorch": (usage(l_codes), float((l_rec - held_out).pow(2).sum()) / energy)}

    print(f"\n{data}: {len(files)} recording(s), {len(feats)} frames; "
          f"batch [{args.batch}, {args.frames}, {args.dim}] ({n_vectors} vectors), {N_CODEBOOKS} codebooks x {CODEBOOK_SIZE}, "
          f"decay {DECAY}, k-means {KMEANS_ITERS} iters, dead-code threshold {DEAD_HITS:g} hits/step; "
          f"{args.steps} steps, torch {torch.__version__}, {args.threads} threads, "
          f"vector-quantize-pytorch {version('vector-quantize-pytorch')}")
    print(f"{'':<26}{'first step s':>13}{'median step s':>15}{'mean usage':>12}{'min usage':>11}{'rel. error':>12}")
    for name, ts in times.items():
        u, err = res[name]
        print(f"{name:<26}{ts[0]:>13.3f}{statistics.median(ts[1:]):>15.3f}{sum(u) / len(u):>12.3f}{min(u):>11.3f}{err:>12.4f}")
    ratio = statistics.median(times["vector-quantize-pytorch"][1:]) / statistics.median(times["kelly"][1:])
    print(f"kelly is {ratio:.1f}x faster per training step (median after the first; target >= 1.5x)")
    print("usage per codebook  kelly: " + " ".join(f"{u:.3f}" for u in res["kelly"][0]))
    print("usage per codebook  vqp:   " + " ".join(f"{u:.3f}" for u in res["vector-quantize-pytorch"][0]))
    print(f"kelly's usage {'>=' if min(a - b for a, b in zip(res['kelly'][0], res['vector-quantize-pytorch'][0])) >= 0 else 'NOT >='} "
          f"vector-quantize-pytorch's in every codebook")


if __name__ == "__main__":
    main()
