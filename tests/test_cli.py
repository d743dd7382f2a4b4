"""The `kelly` console command end to end, in real subprocesses."""
import os
import shutil
import subprocess
from pathlib import Path

import music21
import miditoolkit

from conftest import ROOT, tool

TEST_PRIMITIVES = Path(music21.__file__).parent/"midi"/"testPrimitive"


def kelly(*args, home, timeout=600):
    env = {**os.environ, "KELLY_HOME": str(home)}
    return subprocess.run([tool("kelly"), *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def test_tokenize_check_names_corrupt_files(tmp_path):
    folder = tmp_path/"mixed"; folder.mkdir()
    for p in sorted(TEST_PRIMITIVES.glob("*.mid")): shutil.copy(p, folder/p.name)
    midi = miditoolkit.MidiFile(ticks_per_beat=480)
    midi.instruments.append(miditoolkit.Instrument(program=0, name="piano"))
    midi.instruments[0].notes.append(miditoolkit.Note(velocity=100, pitch=60, start=0, end=480))
    midi.dump(str(tmp_path/"one.mid"))
    good = (tmp_path/"one.mid").read_bytes()
    assert good.count(bytes([0x90, 60, 100])) == 1
    (folder/"flipped.mid").write_bytes(good.replace(bytes([0x90, 60, 100]), bytes([0x90, 60, 0xC8])))  # velocity byte > 127
    (folder/"cut.mid").write_bytes(good[: len(good) // 2])
    (folder/"readme.mid").write_text("this is text")
    r = kelly("tokenize", "--check", folder, home=tmp_path/"home")
    assert r.returncode == 1, r.stderr          # three files failed: not a success
    lines = r.stdout.splitlines()
    assert lines[0].startswith("roundtrip: ") and "notes (100.00%)" in lines[0] and lines[0].endswith("; 3 failed, 0 skipped"), lines[0]
    for name in ("flipped.mid", "cut.mid", "readme.mid"):
        assert sum(name in l for l in lines[1:]) == 1, f"{name} not reported once:\n{r.stdout}"
    assert "Traceback" not in r.stderr


def test_tokenize_builds_cache_and_reports(tmp_path):
    folder = tmp_path/"m"; folder.mkdir()
    for p in sorted(TEST_PRIMITIVES.glob("*.mid"))[:4]: shutil.copy(p, folder/p.name)
    (folder/"bad.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01")
    r = kelly("tokenize", folder, "--cache", tmp_path/"cache", home=tmp_path/"home")
    assert r.returncode == 0, r.stderr
    assert "in 4 files" in r.stdout and "skipped 1 file(s)" in r.stdout
    assert "bad.mid" in (tmp_path/"cache"/"report.json").read_text()


def test_errors_are_one_line(tmp_path):
    r = kelly("tokenize", tmp_path/"missing", home=tmp_path/"home")
    assert r.returncode == 1 and "missing" in r.stderr and "Traceback" not in r.stderr
    r = kelly("tokenize", tmp_path, "--velocity_bins", "lots", home=tmp_path/"home")
    assert r.returncode == 1 and "velocity_bins" in r.stderr and "Traceback" not in r.stderr


TINY_TRAIN = ["--corpus_limit", "8", "--model.n_layers", "1", "--model.width", "32", "--model.n_heads", "2",
              "--data.seq_len", "64", "--data.bs", "8", "--data.windows_per_epoch", "64", "--optim.epochs", "1",
              "--reliability.sample_every", "4", "--reliability.min_validity", "0", "--quiet"]


def test_train_then_generate_on_the_default_corpus(tmp_path, kelly_home):
    r = kelly("train", "--name", "cli-e2e", *TINY_TRAIN, "--samples", "1", "--sample_tokens", "64", home=kelly_home)
    assert r.returncode == 0, r.stderr[-4000:]
    run = kelly_home/"runs"/"cli-e2e"
    assert (run/"bundle"/"manifest.json").is_file() and (run/"samples"/"piece-000.mid").is_file()
    assert "bundle: " in r.stdout and "perplexity" in r.stdout
    # generate without --model picks the newest bundle, which is this run's
    r = kelly("generate", "-n", "2", "--out", tmp_path/"gen", "--max_new_tokens", "64", "--seed", "3", home=kelly_home)
    assert r.returncode == 0, r.stderr[-4000:]
    assert str(run/"bundle") in r.stdout
    assert sorted(p.name for p in (tmp_path/"gen").iterdir()) == ["piece-000.mid", "piece-000.png", "piece-001.mid", "piece-001.png"]
    r = kelly("info", run/"bundle", home=kelly_home)
    assert r.returncode == 0 and '"run": "cli-e2e"' in r.stdout
    # the ONNX Runtime backend decodes greedily to the same pieces as torch; INT8 writes pieces too
    for backend in ("torch", "onnx", "int8"):
        r = kelly("generate", "--model", run, "-n", "1", "--out", tmp_path/backend, "--max_new_tokens", "96", "--temperature", "0",
                  "--backend", backend, "--no_piano_roll", home=kelly_home)
        assert r.returncode == 0, r.stderr[-4000:]
        assert (tmp_path/backend/"piece-000.mid").is_file()
    assert (tmp_path/"onnx"/"piece-000.mid").read_bytes() == (tmp_path/"torch"/"piece-000.mid").read_bytes()
    r = kelly("generate", "--model", run, "--out", tmp_path/"x", "--backend", "tensorrt", home=kelly_home)
    assert r.returncode == 1 and "'backend'" in r.stderr and "Traceback" not in r.stderr


LONG_TRAIN = ["--corpus_limit", "8", "--model.n_layers", "2", "--model.width", "64", "--model.n_heads", "4", "--data.seq_len", "64",
              "--data.bs", "8", "--data.windows_per_epoch", "128", "--optim.epochs", "3", "--optim.lr", "3e-3", "--quiet", "--samples", "0"]
LONG_BARS = 64  # 64 bars of a model trained on 64-token windows: about 7,000 tokens, 100x the window


def test_generate_bars_writes_a_long_piece_that_opens_everywhere(tmp_path, kelly_home):
    """A tiny model trained for a minute on 64-token windows writes a 64-bar piece through the sliding KV cache;
    the file opens in miditoolkit, mido and pretty_midi and spans at least 64 bars."""
    import mido
    import pretty_midi
    r = kelly("train", "--name", "cli-long", *LONG_TRAIN, home=kelly_home)
    assert r.returncode == 0, r.stderr[-4000:]
    r = kelly("generate", "--model", kelly_home/"runs"/"cli-long", "-n", "1", "--bars", LONG_BARS, "--seed", "0", "--out", tmp_path/"long",
              "--no_piano_roll", home=kelly_home)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"bars: {LONG_BARS} (asked for {LONG_BARS})" in r.stdout and "ran out" not in r.stdout, r.stdout
    path = tmp_path/"long"/"piece-000.mid"
    tk = miditoolkit.MidiFile(str(path))
    assert sum(len(i.notes) for i in tk.instruments) > LONG_BARS
    assert mido.MidiFile(str(path)).length > 0
    pm = pretty_midi.PrettyMIDI(str(path))
    downbeats = pm.get_downbeats()
    assert len(downbeats) >= LONG_BARS and pm.get_end_time() > downbeats[LONG_BARS - 1], (len(downbeats), pm.get_end_time())


def test_train_distributed_under_torchrun(kelly_home):
    env = {**os.environ, "KELLY_HOME": str(kelly_home)}
    r = subprocess.run([tool("torchrun"), "--standalone", "--nproc_per_node=2", "-m", "kelly.cli", "train", "--distributed",
                        "--name", "cli-ddp", *TINY_TRAIN, "--samples", "0"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    run = kelly_home/"runs"/"cli-ddp"
    assert (run/"bundle"/"manifest.json").is_file()
    assert '"world_size": 2' in (run/"metrics.json").read_text()
    assert r.stdout.count("bundle: ") == 1          # only rank 0 reports and writes


def test_distributed_without_launcher_is_an_error(kelly_home):
    r = kelly("train", "--distributed", *TINY_TRAIN, home=kelly_home)
    assert r.returncode == 1 and "torchrun" in r.stderr and "Traceback" not in r.stderr


EVAL_CHORALES = 40  # chorales split into two halves for `kelly evaluate --generated A --reference B`


def test_evaluate_two_folders_prints_oa_kl_and_writes_json_and_png(tmp_path, kelly_home):
    "Two halves of the built-in chorales: one distribution, so they overlap; a piece of B copied into A is flagged, named."
    import json
    from kelly.datasets import bach_chorales
    files = sorted(bach_chorales(EVAL_CHORALES, folder=kelly_home/"corpora"/f"bach_chorales-first{EVAL_CHORALES}", progress=False).glob("*.mid"))
    a, b = tmp_path/"a", tmp_path/"b"
    a.mkdir(); b.mkdir()
    for i, f in enumerate(files): shutil.copy(f, (a if i % 2 else b)/f.name)
    shutil.copy(b/files[0].name, a/"copied.mid")
    out = tmp_path/"report"
    r = kelly("evaluate", "--generated", a, "--reference", b, "--out", out, home=kelly_home)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    lines = r.stdout.splitlines()
    for name in ("pitch_class_entropy", "scale_consistency", "polyphony", "groove_consistency"):
        assert any(l.startswith(name) and " OA " in l and " KL " in l for l in lines), name
    rep = json.loads((out/"corpus.json").read_text())
    assert rep["mean_oa"] > 0.6, rep["mean_oa"]
    assert rep["memorisation"]["flagged"] == ["copied.mid"] and rep["memorisation"]["pieces"]["copied.mid"]["source"] == files[0].name
    assert "copied.mid" in r.stdout and files[0].name in r.stdout
    assert (out/"corpus.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_names_what_it_cannot_read(tmp_path):
    (tmp_path/"empty").mkdir(); (tmp_path/"ref").mkdir()
    shutil.copy(sorted(TEST_PRIMITIVES.glob("*.mid"))[0], tmp_path/"ref"/"one.mid")
    r = kelly("evaluate", "--generated", tmp_path/"empty", "--reference", tmp_path/"ref", home=tmp_path/"home")
    assert r.returncode == 1 and "empty" in r.stderr and "no MIDI files" in r.stderr and "Traceback" not in r.stderr
    (tmp_path/"empty"/"broken.mid").write_text("not MIDI")
    r = kelly("evaluate", "--generated", tmp_path/"empty", "--reference", tmp_path/"ref", home=tmp_path/"home")
    assert r.returncode == 1 and "broken.mid" in r.stderr and "Traceback" not in r.stderr
    r = kelly("evaluate", "--generated", tmp_path/"ref", home=tmp_path/"home")
    assert r.returncode == 1 and "--reference" in r.stderr


def _codec_run(runs, name, seed):
    "A run folder holding a small codec bundle, trained one step so its codebooks exist (real training is `kelly audio train`)."
    import numpy as np, torch
    from kelly.audio import load_audio
    from kelly.codec import Codec, CodecConfig
    from kelly.exporters import save_bundle
    from kelly.quantizer import QuantizerConfig
    y, _ = load_audio(TEST_AUDIO, sr=16000)
    torch.manual_seed(seed)
    codec = Codec(CodecConfig(width=32, n_layers=1, quantizer=QuantizerConfig(n_codebooks=4, codebook_size=64)))
    codec(torch.from_numpy(np.stack([y[16000 * i:16000 * (i + 1)] for i in range(4)])))
    save_bundle(runs/name/"bundle", codec.eval(), metadata={"corpus": "music21 test_audio.wav", "steps": 1})
    return runs/name


TEST_AUDIO = Path(music21.__file__).parent/"audioSearch"/"test_audio.wav"


def test_audio_encode_decode_info(tmp_path):
    import json
    import numpy as np
    import soundfile as sf
    from kelly.audio import load_audio
    home = tmp_path/"home"
    run = _codec_run(home/"runs", "codec-a", seed=0)
    src = tmp_path/"song.wav"; shutil.copy(TEST_AUDIO, src)
    r = kelly("audio", "encode", src, "--model", run, "--out", tmp_path/"song.npz", home=home)
    assert r.returncode == 0, r.stderr
    z = np.load(tmp_path/"song.npz")
    assert z["codes"].shape == (4, 1000) and z["codes"].dtype == np.int16 and int(z["sample_rate"]) == 16000
    assert str(z["source"]) == "song.wav" and len(str(z["model_hash"])) == 64 and int(z["length"]) == len(load_audio(TEST_AUDIO, sr=16000)[0])
    r = kelly("audio", "decode", tmp_path/"song.npz", "--model", run/"bundle", "--out", tmp_path/"back.wav", home=home)
    assert r.returncode == 0, r.stderr
    a, b = sf.info(str(src)), sf.info(str(tmp_path/"back.wav"))
    assert (b.samplerate, b.frames) == (a.samplerate, a.frames) and a.samplerate == 44100     # the input's rate and length
    # without --model: encode takes the newest codec bundle, decode the one its codes name
    r = kelly("audio", "encode", src, "--codebooks", "2", home=home)
    assert r.returncode == 0 and str(run/"bundle") in r.stdout and np.load(tmp_path/"song.codes.npz")["codes"].shape == (2, 1000)
    other = _codec_run(home/"runs", "codec-b", seed=1)        # now the newest codec, but not the one the codes name
    r = kelly("audio", "decode", tmp_path/"song.codes.npz", home=home)
    assert r.returncode == 0 and str(run/"bundle") in r.stdout and sf.info(str(tmp_path/"song.codes.wav")).frames == a.frames
    # codes from another codec are refused, in one line
    r = kelly("audio", "decode", tmp_path/"song.npz", "--model", other, "--out", tmp_path/"x.wav", home=home)
    assert r.returncode == 1 and "made by the codec with model hash" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path/"x.wav").exists()
    # kelly info shows the codec
    r = kelly("info", run/"bundle", home=home)
    info = json.loads(r.stdout)
    assert info["kind"] == "codec" and info["codec"]["sample_rate"] == 16000 and info["codec"]["frame_rate"] == 50.0
    assert info["codec"]["n_codebooks"] == 4 and info["codec"]["bitrate"] == 1200.0
    assert info["training_data"] == {"corpus": "music21 test_audio.wav"}


def test_audio_encode_refuses_what_it_cannot_use(tmp_path):
    home = tmp_path/"home"
    run = _codec_run(home/"runs", "codec", seed=0)
    (tmp_path/"notes.wav").write_text("not audio at all")
    r = kelly("audio", "encode", tmp_path/"notes.wav", "--model", run, home=home)
    assert r.returncode == 1 and "kelly audio encode: error:" in r.stderr and "notes.wav" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path/"notes.codes.npz").exists()
    (tmp_path/"junk.npz").write_bytes(b"not a zip")
    r = kelly("audio", "decode", tmp_path/"junk.npz", "--model", run, home=home)
    assert r.returncode == 1 and "junk.npz" in r.stderr and "Traceback" not in r.stderr
    r = kelly("audio", "encode", TEST_AUDIO, "--model", tmp_path, home=home)
    assert r.returncode == 1 and "neither a model bundle nor a run folder" in r.stderr
    r = kelly("audio", "encode", TEST_AUDIO, home=tmp_path/"empty-home")
    assert r.returncode == 1 and "no codec bundle" in r.stderr and "kelly audio train" in r.stderr
