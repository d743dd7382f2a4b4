"""Codec speed: kelly's CPU frame codec vs EnCodec's architecture (untrained, 24 kHz, 6 kbit/s = 8 codebooks) on the same clip.

Encode + decode of one clip, timed side by side in one run (median of `--repeats`), reported as "x realtime" (audio
seconds per wall second) and as kelly's ratio over EnCodec. The clip is music21's bundled recording (20 s), resampled
to each codec's rate. Speed does not depend on the weights, so an untrained EnCodec (its weights cannot be fetched
offline) is a fair anchor; kelly's codec is the bundle given with `--model` (a codec bundle or run folder) or, without
one, a default `CodecConfig` codec whose codebooks one training step initialised.

Usage: python bench/bench_codec.py [--model BUNDLE|RUN] [--threads 2] [--repeats 3] [--griffin_lim N]
EnCodec is a benchmark-only dependency: pip install --no-deps encodec==0.1.1 (it needs einops, which kelly's dev tools bring).
"""
import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kelly.audio import load_audio  # noqa: E402
from kelly.codec import Codec, CodecConfig  # noqa: E402
from kelly.exporters import load_bundle  # noqa: E402

ENCODEC_SR, ENCODEC_KBPS = 24000, 6.0


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kelly_codec(model: str | None, griffin_lim: int | None, clip: torch.Tensor) -> Codec:
    if model:
        path = Path(model)
        codec = load_bundle(path/"bundle" if (path/"bundle").is_dir() else path, kind="codec").model
    else:
        codec = Codec(CodecConfig())
        codec.train(); codec(clip[:, :16000 * 4])  # one training forward: k-means initialises the codebooks
    if griffin_lim is not None: codec.config.griffin_lim = griffin_lim
    return codec.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a codec bundle or a run folder holding one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--griffin_lim", type=int, default=None, help="override the codec's Griffin-Lim iterations")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import music21
    wav = Path(music21.__file__).parent/"audioSearch"/"test_audio.wav"
    y16, _ = load_audio(wav, sr=16000)
    seconds = len(y16) / 16000
    x16 = torch.from_numpy(y16)[None]
    codec = kelly_codec(args.model, args.griffin_lim, x16)
    with torch.no_grad():
        t_kelly = median_time(lambda: codec.decode(codec.encode(x16), x16.shape[-1]), args.repeats)
    print(f"clip: {wav.name}, {seconds:.1f} s; torch threads {torch.get_num_threads()}")
    print(f"kelly {codec.config.arch} codec: {codec.n_params() / 1e6:.2f} M parameters, {codec.config.bitrate / 1000:g} kbit/s, "
          f"Griffin-Lim {codec.config.griffin_lim}: encode+decode {t_kelly:.3f} s = {seconds / t_kelly:.1f}x realtime")
    try:
        import encodec
    except ImportError:
        print("EnCodec is not installed (pip install --no-deps encodec==0.1.1): no side-by-side figure"); return
    y24, _ = load_audio(wav, sr=ENCODEC_SR)
    x24 = torch.from_numpy(y24)[None, None]
    model = encodec.EncodecModel.encodec_model_24khz(pretrained=False).eval()
    model.set_target_bandwidth(ENCODEC_KBPS)
    with torch.no_grad():
        t_enc = median_time(lambda: model.decode(model.encode(x24)), args.repeats)
    print(f"EnCodec 24 kHz (untrained architecture): {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"{ENCODEC_KBPS:g} kbit/s: encode+decode {t_enc:.3f} s = {seconds / t_enc:.1f}x realtime")
    print(f"kelly / EnCodec speed: {t_enc / t_kelly:.1f}x")


if __name__ == "__main__":
    main()
