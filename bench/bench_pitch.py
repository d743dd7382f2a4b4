"""Pitch tracking on rendered Bach chorale voices whose true f0 is known: kelly vs librosa.pyin, librosa.yin, torchcrepe tiny.

Single voices of Bach chorales (music21's corpus, via `kelly.datasets.bach_chorales`) are rendered with FluidSynth and
FluidR3 (soprano as flute and as piano, bass as cello and as bassoon), cut to the first `--seconds` seconds at 16 kHz,
and tracked with a 10 ms hop. The reference f0 comes from the MIDI notes (`kelly.audio.midi_f0`).

Scores, on frames where the reference sounds a note:
- RPA (raw pitch accuracy): the tracker says voiced and its f0 is within 50 cents of the reference;
- RCA (raw chroma accuracy): the same, octave errors forgiven;
- VR (voicing recall): the tracker says voiced. librosa.yin and torchcrepe give an f0 on every frame (always "voiced").
Speed is audio seconds per wall second ("x realtime"), for one clip at a time and for the whole batch in one call
(kelly and torchcrepe take batches; librosa's pyin/yin are run clip by clip, their only mode), and kelly's ratio over
librosa.pyin on the same clips is printed for both.

Usage: python bench/bench_pitch.py [--chorales 4] [--seconds 30] [--methods kelly,pyin,yin,crepe] [--voices all]
                                   [--wav FILE ...]  (also track these real recordings and print a summary)
Every tracker gets the same fmin/fmax (C2-C7 by default), frame 1024 and hop 160 samples.
"""
import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kelly.audio import (PITCH_FMAX, PITCH_FMIN, load_audio, midi_f0, render_music, track_pitch)  # noqa: E402
from kelly.core import kelly_path  # noqa: E402
from kelly.datasets import bach_chorales  # noqa: E402
from kelly.midi import Music, load_midi  # noqa: E402

SR, HOP, FRAME = 16000, 160, 1024
CENTS_TOL = 50.0
VOICES = {  # name -> (track name in the chorale, GM program)
    "soprano-flute": ("Soprano", 73), "soprano-piano": ("Soprano", 0),
    "bass-cello": ("Bass", 42), "bass-bassoon": ("Bass", 70),
}


def voice_music(music: Music, track_name: str, program: int) -> Music | None:
    "The chorale with only the named voice, played by `program`."
    tracks = [t for t in music.tracks if t.name.strip().lower() == track_name.lower()]
    if not tracks: return None
    t = tracks[0].copy()
    t.program = program
    return Music(music.tpq, [t], music.tempos.copy(), music.time_signatures.copy())


def build_clips(n_chorales: int, seconds: float, voices: list[str]):
    "Render (cached under $KELLY_HOME/bench_pitch) and load the clips with their reference f0."
    folder = bach_chorales(limit=max(8, 3 * n_chorales), progress=False)
    cache = kelly_path("bench_pitch")
    clips = []
    n_used = 0
    for mid in sorted(folder.glob("*.mid")):
        if n_used == n_chorales: break
        music = load_midi(mid)
        parts = {v: voice_music(music, *VOICES[v]) for v in voices}
        if any(p is None for p in parts.values()): continue
        found = []
        for v, m in parts.items():
            wav = cache/f"{mid.stem}-{v}.wav"
            if not wav.exists(): render_music(m, wav, sample_rate=SR)
            y, _ = load_audio(wav, sr=SR, duration=seconds)
            n = 1 + len(y) // HOP
            f0, voiced = midi_f0(m, np.arange(n) * HOP / SR)
            found.append(dict(name=f"{mid.stem}/{v}", voice=v, y=y, ref=f0, ref_voiced=voiced))
        if any(len(c["y"]) < int(seconds * SR) for c in found): continue  # shorter than a clip: skip the chorale
        clips += found
        n_used += 1
    if n_used < n_chorales: print(f"only {n_used} chorales have all voices asked for", file=sys.stderr)
    return clips


def score(est_f0: np.ndarray, est_voiced: np.ndarray, ref: np.ndarray, ref_voiced: np.ndarray) -> dict:
    n = min(len(est_f0), len(ref))
    est_f0, est_voiced, ref, ref_voiced = est_f0[:n], est_voiced[:n], ref[:n], ref_voiced[:n]
    ok = ref_voiced & est_voiced & np.isfinite(est_f0) & (est_f0 > 0)
    cents = np.full(n, np.inf)
    cents[ok] = 1200 * np.log2(est_f0[ok] / ref[ok])
    chroma_cents = np.abs(cents - 1200 * np.round(cents / 1200))
    nv = max(1, ref_voiced.sum())
    return dict(rpa=(np.abs(cents[ref_voiced]) < CENTS_TOL).sum() / nv, rca=(chroma_cents[ref_voiced] < CENTS_TOL).sum() / nv,
                vr=(est_voiced & ref_voiced).sum() / nv, frames=int(ref_voiced.sum()))


def run_kelly(ys, fmin, fmax):
    tr = track_pitch(torch.from_numpy(np.stack(ys)), sr=SR, fmin=fmin, fmax=fmax, frame_length=FRAME, hop_length=HOP)
    return [(f, v) for f, v in zip(tr.f0.numpy(), tr.voiced.numpy())]


def run_pyin(ys, fmin, fmax):
    import librosa
    out = []
    for y in ys:
        f0, vf, _ = librosa.pyin(y, sr=SR, fmin=fmin, fmax=fmax, frame_length=FRAME, hop_length=HOP)
        out.append((f0, vf))
    return out


def run_yin(ys, fmin, fmax):
    import librosa
    return [(f, np.ones(len(f), bool)) for f in (librosa.yin(y, sr=SR, fmin=fmin, fmax=fmax, frame_length=FRAME, hop_length=HOP) for y in ys)]


def run_crepe(ys, fmin, fmax):
    import torchcrepe
    x = torch.from_numpy(np.stack(ys))
    out = []
    for row in x:  # torchcrepe.predict takes one clip; it batches frames internally
        f0 = torchcrepe.predict(row[None], SR, hop_length=HOP, fmin=fmin, fmax=fmax, model="tiny", batch_size=2048,
                                device="cpu", pad=True)[0].numpy()
        out.append((f0, np.ones(len(f0), bool)))
    return out


RUNNERS = {"kelly": run_kelly, "pyin": run_pyin, "yin": run_yin, "crepe": run_crepe}
BATCHED = {"kelly"}  # trackers that take the whole batch in one call


def timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chorales", type=int, default=4, help="chorales per voice (4 chorales x 4 voices = a batch of 16)")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--methods", default="kelly,pyin,yin,crepe")
    ap.add_argument("--voices", default="all", help=f"comma list of {', '.join(VOICES)}")
    ap.add_argument("--fmin", type=float, default=PITCH_FMIN)
    ap.add_argument("--fmax", type=float, default=PITCH_FMAX)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (librosa's pyin/yin run on one core)")
    ap.add_argument("--wav", nargs="*", default=[], help="real recordings to track as a smoke test")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    voices = list(VOICES) if args.voices == "all" else args.voices.split(",")
    methods = args.methods.split(",")
    clips = build_clips(args.chorales, args.seconds, voices)
    ys = [c["y"] for c in clips]
    audio_s = sum(len(y) for y in ys) / SR
    print(f"{len(clips)} clips, {audio_s:.0f} s of audio at {SR} Hz; frame {FRAME}, hop {HOP}; fmin {args.fmin:.1f} Hz, "
          f"fmax {args.fmax:.1f} Hz; torch threads {torch.get_num_threads()}")
    results, speed = {}, {}
    for m in methods:
        fn = RUNNERS[m]
        fn(ys[:1], args.fmin, args.fmax)  # warm-up (imports, numba compilation, filter caches)
        _, t_single = timed(fn, ys[:1], args.fmin, args.fmax)
        if m in BATCHED:
            out, t_batch = timed(fn, ys, args.fmin, args.fmax)
        else:
            out, t_batch = timed(fn, ys, args.fmin, args.fmax)
        results[m] = out
        speed[m] = (len(ys[0]) / SR / t_single, audio_s / t_batch, t_single, t_batch)
    # per-voice table
    print(f"\n{'voice':<15}{'frames':>8}" + "".join(f"{m + ' RPA':>12}{m + ' RCA':>12}{m + ' VR':>10}" for m in methods))
    rpa_of = {}
    for v in voices:
        idx = [i for i, c in enumerate(clips) if c["voice"] == v]
        row = ""
        for m in methods:
            s = [score(*results[m][i], clips[i]["ref"], clips[i]["ref_voiced"]) for i in idx]
            w = np.array([x["frames"] for x in s], float)
            agg = {k: float(np.average([x[k] for x in s], weights=w)) for k in ("rpa", "rca", "vr")}
            rpa_of[v, m] = (agg["rpa"], int(w.sum()))
            row += f"{agg['rpa']:>12.4f}{agg['rca']:>12.4f}{agg['vr']:>10.3f}"
        print(f"{v:<15}{int(w.sum()):>8}" + row)
    if {"kelly", "pyin"} <= set(methods):  # the target: kelly's RPA at least pyin's on every voice, in frames
        gaps = {v: round((rpa_of[v, "kelly"][0] - rpa_of[v, "pyin"][0]) * rpa_of[v, "kelly"][1]) for v in voices}
        print("kelly - pyin, voiced frames within 50 cents: " + ", ".join(f"{v} {g:+d}" for v, g in gaps.items())
              + ("  (kelly >= pyin on every voice)" if all(g >= 0 for g in gaps.values()) else "  (kelly below pyin on some voice)"))
    print(f"\n{'method':<8}{'1 clip s':>10}{'1 clip xRT':>12}{f'{len(ys)} clips s':>14}{'batch xRT':>11}{'vs pyin (1)':>13}{'vs pyin (batch)':>17}")
    for m in methods:
        x1, xb, t1, tb = speed[m]
        r1 = f"{speed['pyin'][2] / t1:.1f}x" if "pyin" in speed else "-"
        rb = f"{speed['pyin'][3] / tb:.1f}x" if "pyin" in speed else "-"
        print(f"{m:<8}{t1:>10.3f}{x1:>12.1f}{tb:>14.2f}{xb:>11.1f}{r1:>13}{rb:>17}")
    for w in args.wav:
        y, _ = load_audio(w, sr=SR)
        (tr, t) = timed(lambda: track_pitch(y, sr=SR, fmin=args.fmin, fmax=args.fmax, frame_length=FRAME, hop_length=HOP))
        f0 = tr.f0.numpy()
        print(f"\n{w}: {len(y) / SR:.1f} s tracked in {t:.2f} s; {tr.voiced.float().mean():.0%} of frames voiced; "
              f"median f0 {np.nanmedian(f0) if np.isfinite(f0).any() else float('nan'):.1f} Hz")
        if "pyin" in methods:
            import librosa
            pf0, pv, _ = librosa.pyin(y, sr=SR, fmin=args.fmin, fmax=args.fmax, frame_length=FRAME, hop_length=HOP)
            both = pv & tr.voiced.numpy()
            agree = np.abs(1200 * np.log2(f0[both] / pf0[both])) < CENTS_TOL
            print(f"  vs librosa.pyin: voicing agrees on {(pv == tr.voiced.numpy()).mean():.0%} of frames; "
                  f"f0 within 50 cents on {agree.mean():.0%} of frames both call voiced")


if __name__ == "__main__":
    main()
