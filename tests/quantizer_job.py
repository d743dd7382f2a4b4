"""Train a `ResidualVQ` for a few steps on log-mel frames, in one process or under torchrun, and save what it learned.

The global batch of step i is the same whatever the number of processes: `--items` crops of `--frames` frames from
the recording music21 ships (64 log-mel bands, standardised, projected to `--dim` dimensions by a fixed random
matrix). Under torchrun rank r takes the r-th consecutive share of the items. Every rank writes `rank{r}.pt` (the
quantizer's state_dict) and `rank{r}.json` (its health after every step) into `--out`.

`--no-sync` makes kelly's quantizer believe it runs alone (no sum over ranks, no shared draws: a quantizer written
without torch.distributed in mind), for the test that shows the check can fail. Only removing the sum would also work,
but then the ranks disagree on which collectives to call and hang or crash instead of finishing.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import kelly.quantizer as kq  # noqa: E402
from kelly.audio import load_audio, log_mel  # noqa: E402


def frames(dim: int) -> torch.Tensor:
    "Standardised 64-band log-mel frames of music21's recording, projected to `dim` dimensions: [dim, n_frames]."
    import music21
    y, sr = load_audio(Path(music21.__file__).parent/"audioSearch"/"test_audio.wav", sr=16000)
    m = log_mel(y, sr=sr, n_fft=1024, hop_length=256, n_mels=64).float()
    m = (m - m.mean(1, keepdim=True)) / m.std(1, keepdim=True)
    proj = torch.randn(dim, 64, generator=torch.Generator().manual_seed(1234)) / 8
    return proj @ m


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--items", type=int, default=8, help="items in the global batch (divisible by the world size)")
    ap.add_argument("--frames", type=int, default=20, help="frames per item")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--codebooks", type=int, default=3)
    ap.add_argument("--codebook-size", type=int, default=64)
    ap.add_argument("--dead-share", type=float, default=0.5)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--no-sync", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ: dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if args.no_sync: kq._world = lambda: (0, 1)
    data = frames(args.dim)
    torch.manual_seed(0)                     # the same seed on every rank, and in the single process
    cfg = kq.QuantizerConfig(dim=args.dim, n_codebooks=args.codebooks, codebook_size=args.codebook_size,
                             dead_share=args.dead_share, quantizer_dropout=args.dropout)
    rvq = kq.ResidualVQ(cfg).train()
    share = args.items // world
    health = []
    for i in range(args.steps):
        starts = [((i * args.items + j) * args.frames) % (data.shape[1] - args.frames) for j in range(args.items)]
        batch = torch.stack([data[:, s:s + args.frames] for s in starts])
        rvq(batch[rank * share:(rank + 1) * share])
        health.append(rvq.health())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(rvq.state_dict(), out/f"rank{rank}.pt")
    (out/f"rank{rank}.json").write_text(json.dumps({"world_size": world, "health": health}))
    if world > 1: dist.destroy_process_group()


if __name__ == "__main__":
    main()
