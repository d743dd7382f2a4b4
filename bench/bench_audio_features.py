"""kelly's torch features vs librosa on a batch of real clips: time side by side, and the largest difference.

Clips: `--clips` crops of `--seconds` s from music21's bundled recording (audioSearch/test_audio.wav), resampled to
16 kHz. librosa is timed clip by clip and on the whole batch (librosa accepts `[B, T]` arrays); kelly on the batch.

Usage: python bench/bench_audio_features.py [--clips 16] [--seconds 10] [--threads 1] [--repeat 3]
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kelly.audio import chroma, load_audio, log_mel, mel_spectrogram, spectrogram  # noqa: E402

SR = 16000


def best_time(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import librosa
    import music21
    y, _ = load_audio(Path(music21.__file__).parent/"audioSearch"/"test_audio.wav", sr=SR)
    n = int(args.seconds * SR)
    starts = np.linspace(0, len(y) - n, args.clips).astype(int)
    batch = np.stack([y[s:s + n] for s in starts])
    xb = torch.from_numpy(batch)
    cases = {
        "stft |S|": (lambda b: np.abs(librosa.stft(b)), lambda x: spectrogram(x)),
        "mel": (lambda b: librosa.feature.melspectrogram(y=b, sr=SR), lambda x: mel_spectrogram(x, sr=SR)),
        "log-mel": (lambda b: np.stack([librosa.power_to_db(librosa.feature.melspectrogram(y=c, sr=SR)) for c in b]) if b.ndim == 2
                    else librosa.power_to_db(librosa.feature.melspectrogram(y=b, sr=SR)), lambda x: log_mel(x, sr=SR)),
        "chroma": (lambda b: librosa.feature.chroma_stft(y=b, sr=SR, tuning=0.0), lambda x: chroma(x, sr=SR)),
    }
    print(f"{args.clips} clips x {args.seconds:.0f} s at {SR} Hz (n_fft 2048, hop 512); torch threads {args.threads}; best of {args.repeat}")
    print(f"{'feature':<10}{'librosa 1-by-1 s':>18}{'librosa batch s':>17}{'kelly batch s':>15}{'vs 1-by-1':>11}{'vs batch':>10}{'max |diff| / max':>18}")
    for name, (ref_fn, k_fn) in cases.items():
        t_one, _ = best_time(lambda: [ref_fn(c) for c in batch], args.repeat)
        t_lb, ref = best_time(lambda: ref_fn(batch), args.repeat)
        t_k, out = best_time(lambda: k_fn(xb), args.repeat)
        diff = np.abs(out.numpy() - ref).max() / np.abs(ref).max()
        print(f"{name:<10}{t_one:>18.3f}{t_lb:>17.3f}{t_k:>15.3f}{t_one / t_k:>10.1f}x{t_lb / t_k:>9.1f}x{diff:>18.2e}")


if __name__ == "__main__":
    main()
