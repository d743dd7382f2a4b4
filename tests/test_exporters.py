"""kelly.exporters beyond the notebook: more real music through three MIDI readers, sampler output to files,
every byte of a bundle flipped, trained weights round-tripped, and SIGKILL during a bundle overwrite.

The notebook (09_exporters) tests each piece once on small data; these tests repeat the claims on more pieces,
more tokenizer settings and every byte position.
"""
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import miditoolkit
import mido
import music21
import numpy as np
import pretty_midi
import pytest
import torch
from PIL import Image

from conftest import ROOT
from kelly.core import quoted
from kelly.exporters import (BUNDLE_FILES, MANIFEST_FILE, MIDI_TPQ, BundleError, bundle_info, draw_piano_roll,
                             export_pieces, ids_to_midi, load_bundle, save_bundle, save_piano_roll, write_midi)
from kelly.midi import Music, Track, from_miditoolkit, load_midi
from kelly.test_utils import synthetic_pop_midi
from kelly.models import MusicTransformer, TransformerConfig
from kelly.samplers import generate
from kelly.tokenizer import Tokenizer, TokenizerConfig

N_CHORALES = 6
TOKENIZERS = {"default": {}, "specials-at-end": dict(special_tokens_at_end=True), "tpq-960": dict(tpq=960),
              "tpq-96-grid-4-3": dict(tpq=96, grid=(4, 3)), "no-tempos-no-metre": dict(use_tempos=False, use_time_signatures=False)}


# ---------------------------------------------------------------- three readers

def _seconds(music, ticks):
    "Seconds at `ticks` from the music's tempo map, in the whole microseconds per quarter MIDI stores."
    tempos = music.tempos
    us = np.round(60e6 / tempos["qpm"])
    seg = np.searchsorted(tempos["tick"], ticks, side="right") - 1
    at = np.concatenate([[0.0], np.cumsum(np.diff(tempos["tick"]) * us[:-1] / 1e6 / music.tpq)])
    return at[seg] + (np.asarray(ticks) - tempos["tick"][seg]) * us[seg] / 1e6 / music.tpq


def check_three_readers(e):
    "miditoolkit, mido and pretty_midi read back exactly the music `e` says was written."
    m, p = e.music, str(e.path)
    assert m.tpq == MIDI_TPQ and m.tempos["tick"][0] == 0 and m.time_signatures["tick"][0] == 0
    assert from_miditoolkit(miditoolkit.MidiFile(p)) == m
    assert load_midi(p) == m
    mf = mido.MidiFile(p)
    assert mf.ticks_per_beat == MIDI_TPQ
    msgs = [(int(t), x) for track in mf.tracks for t, x in zip(np.cumsum([x.time for x in track]), track)]
    assert [(t, x.tempo) for t, x in msgs if x.type == "set_tempo"] == [(t, round(60e6 / q)) for t, q in m.tempos.tolist()]
    assert [(t, x.numerator, x.denominator) for t, x in msgs if x.type == "time_signature"] == m.time_signatures.tolist()
    assert sorted((x.channel == 9, x.program) for _, x in msgs if x.type == "program_change") == sorted((t.is_drum, t.program) for t in m.tracks)
    ons = [(t, x.channel, x.note) for t, x in msgs if x.type == "note_on" and x.velocity > 0]
    assert len(ons) == m.n_notes
    drum_ons = sorted((t, n) for t, ch, n in ons if ch == 9)
    assert drum_ons == sorted((int(s), int(p)) for tr in m.tracks if tr.is_drum for s, p in zip(tr.start, tr.pitch))
    pm = pretty_midi.PrettyMIDI(p)
    assert sorted((i.program, i.is_drum, len(i.notes)) for i in pm.instruments) == sorted((t.program, t.is_drum, t.n_notes) for t in m.tracks)
    if m.n_notes:
        ours = sorted(zip(np.concatenate([_seconds(m, t.start) for t in m.tracks]).round(6), np.concatenate([t.pitch for t in m.tracks])))
        theirs = sorted((round(n.start, 6), n.pitch) for i in pm.instruments for n in i.notes)
        assert [p for _, p in theirs] == [p for _, p in ours]
        np.testing.assert_allclose([t for t, _ in theirs], [t for t, _ in ours], atol=2e-6)
        last = max(m.end_tick, m.tempos["tick"].max(), m.time_signatures["tick"].max())   # pretty_midi counts meta events
        assert abs(pm.get_end_time() - _seconds(m, [last])[0]) < 1e-6
        qpm = 60e6 / np.round(60e6 / m.tempos["qpm"])
        np.testing.assert_allclose(pm.get_tempo_changes()[1], qpm, rtol=1e-9)


@pytest.fixture(scope="module")
def chorale_files(tmp_path_factory):
    "The first N_CHORALES Bach works of music21's corpus that convert to MIDI, as files."
    out = tmp_path_factory.mktemp("chorales")
    files = []
    for path in music21.corpus.getComposer("bach"):
        if len(files) == N_CHORALES: break
        f = out/(path.stem + ".mid")
        music21.corpus.parse(path).write("midi", fp=str(f))
        files.append(f)
    return files


@pytest.mark.parametrize("setting", list(TOKENIZERS))
def test_chorales_and_pop_reopen_in_three_readers(setting, chorale_files, tmp_path):
    tok = Tokenizer(TokenizerConfig(**TOKENIZERS[setting]))
    pops = []
    for seed in range(3):
        synthetic_pop_midi(seed=seed).dump(str(tmp_path/f"pop{seed}.mid"))
        pops.append(tmp_path/f"pop{seed}.mid")
    for f in [*chorale_files, *pops]:
        ids = tok.encode_file(f)
        e = ids_to_midi(tok, ids, path=tmp_path/"out"/f.name)
        assert e.decode.n_skipped == 0 and e.ticks_rounded == 0, str(e)
        assert e.music.n_notes == tok.decode(ids).n_notes - e.repair.duplicates_dropped - e.repair.zero_length_dropped
        check_three_readers(e)
    # the pop fixture keeps its drums, its programs and (when the tokenizer has them) its tempo and metre changes
    e = ids_to_midi(tok, tok.encode_file(pops[0]), path=tmp_path/"pop.mid")
    assert any(t.is_drum for t in e.music.tracks) and {33, 4, 81} <= {t.program for t in e.music.tracks if not t.is_drum}
    if tok.config.use_tempos: assert len(e.music.tempos) == 3
    if tok.config.use_time_signatures: assert len(e.music.time_signatures) == 3


def test_rounded_ticks_are_reported_and_logged(tmp_path, caplog):
    "A grid of 64ths at 960 ticks per quarter cannot be held at 480: rounded, counted, warned about, still readable."
    tok = Tokenizer(TokenizerConfig(tpq=960, grid=(64,)))
    synthetic_pop_midi(seed=1).dump(str(tmp_path/"pop.mid"))
    music = load_midi(tmp_path/"pop.mid")
    shifted = Music(music.tpq, [Track(t.program, t.is_drum, t.name, t.pitch, t.start + music.tpq // 16, t.duration, t.velocity)
                                for t in music.tracks], music.tempos, music.time_signatures)   # onsets on odd 64ths
    with caplog.at_level(logging.INFO, logger="kelly.exporters"):
        e = ids_to_midi(tok, tok.encode(shifted), path=tmp_path/"r.mid")
    assert e.ticks_rounded > 0
    assert any(r.levelno == logging.WARNING and "rounded" in r.getMessage() for r in caplog.records)
    check_three_readers(e)


def test_write_midi_from_music_and_explicit_defaults(tmp_path):
    m = Music(tpq=96, tracks=[Track(program=40, pitch=[60, 64], start=[0, 48], duration=[48, 48], velocity=[70, 90]),
                              Track(is_drum=True, pitch=[36], start=[96], duration=[24], velocity=[100])],
              tempos=[(192, 80.0)], time_signatures=[(384, 3, 4)])
    e = write_midi(m, tmp_path/"m.mid")
    assert e.decode is None and e.n_skipped == 0 and e.ticks_rounded == 0
    assert e.music.tempos.tolist() == [(0, 120.0), (960, 80.0)]
    assert e.music.time_signatures.tolist() == [(0, 4, 4), (1920, 3, 4)]
    assert [t.start.tolist() for t in e.music.tracks] == [[0, 240], [480]]
    check_three_readers(e)


# ---------------------------------------------------------------- sampler output, piano rolls

@pytest.mark.parametrize("constrained", [True, False])
def test_sampler_output_to_files(constrained, tmp_path, caplog):
    "What `kelly generate` does: an (untrained) model's samples become MIDI files and PNGs that reopen."
    tok = Tokenizer()
    torch.manual_seed(0)
    model = MusicTransformer(TransformerConfig.for_tokenizer(tok, n_layers=2, width=64, n_heads=4, max_len=64)).eval()
    gen = generate(model, tok, n=4, max_new_tokens=300, seed=0, constrained=constrained)
    with caplog.at_level(logging.INFO, logger="kelly.exporters"):
        out = export_pieces(tok, gen, out_dir=tmp_path/"gen")
    assert sorted(p.name for p in (tmp_path/"gen").iterdir()) == sorted(f"piece-{i:03d}.{x}" for i in range(4) for x in ("mid", "png"))
    for e, seq in zip(out, gen.sequences()):
        assert e.decode == tok.decode_with_report(seq)[1]           # the decoder's own report, passed on
        check_three_readers(e)
        with Image.open(e.piano_roll) as img: img.verify()
    wrote = [r for r in caplog.records if r.name == "kelly.exporters"]   # (the sampler may log its thread choice too)
    assert [r.getMessage().split(":")[0] for r in wrote] == [f"wrote {quoted(e.path)}" for e in out]   # the published names, not the staging folder's
    if constrained: assert all(e.n_skipped == 0 for e in out)
    else: assert any(e.n_skipped > 0 for e in out) and any(r.levelno == logging.WARNING for r in wrote)


def _ink(path):
    with Image.open(path) as img:
        a = np.asarray(img.convert("RGB"))
    return float((a.min(-1) < 250).mean()), (a.shape[1], a.shape[0])


@pytest.mark.parametrize("size,dpi", [((12, 4), 100), ((6, 3), 80), ((20, 5), 60)])
def test_piano_roll_png(size, dpi, chorale_files, tmp_path):
    tok = Tokenizer()
    music = tok.decode(tok.encode_file(chorale_files[0]))
    p = save_piano_roll(music, tmp_path/"roll.png", title="chorale", size=size, dpi=dpi)
    blank = save_piano_roll(Music(), tmp_path/"blank.png", size=size, dpi=dpi)
    (ink, px), (blank_ink, blank_px) = _ink(p), _ink(blank)
    assert px == blank_px == (round(size[0] * dpi), round(size[1] * dpi))
    assert ink > 0.05 and ink > 3 * blank_ink, (ink, blank_ink)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == []   # no temp files left


def test_draw_piano_roll_into_callers_axes():
    from matplotlib.figure import Figure
    m = from_miditoolkit(synthetic_pop_midi(seed=0))
    fig = Figure()
    ax = draw_piano_roll(m, fig.add_subplot(), title="pop")
    assert ax.get_title() == "pop" and len(ax.collections) == len(m.tracks) + 1     # tracks + bar lines
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["drums", "bass (program 33)", "keys (program 4)", "lead (program 81)"]


# ---------------------------------------------------------------- bundles

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A small model trained 30 steps on a chorale's ids (so weights are not the init), and its bundle."
    tok = Tokenizer(TokenizerConfig(special_tokens_at_end=True))
    f = tmp_path_factory.mktemp("src")/"c.mid"
    music21.corpus.parse("bach/bwv66.6").write("midi", fp=str(f))
    ids = torch.as_tensor(tok.encode_file(f), dtype=torch.long)
    torch.manual_seed(0)
    model = MusicTransformer(TransformerConfig.for_tokenizer(tok, n_layers=2, width=64, n_heads=4, max_len=128, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(30):
        i = step * 7 % (len(ids) - 129)
        x, y = ids[i:i + 128][None], ids[i + 1:i + 129][None]
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=tok.pad_id)
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    path = save_bundle(tmp_path_factory.mktemp("runs")/"bundle", model, tokenizer=tok,
                       metadata={"steps": 30, "metrics": {"train_loss": loss.detach()}, "corpus": "bwv66.6"})
    return model, tok, ids, path


def test_round_trip_trained_weights_logits_and_samples(trained):
    model, tok, ids, path = trained
    b = load_bundle(path, tokenizer=tok)
    sd, sd2 = model.state_dict(), b.model.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.inference_mode(): assert torch.equal(b.model(ids[None, :200]), model(ids[None, :200]))
    kw = dict(n=2, max_new_tokens=64, seed=3, top_k=20)
    assert torch.equal(generate(b.model, b.tokenizer, **kw).ids, generate(model, tok, **kw).ids)
    assert b.tokenizer.pad_id == tok.pad_id != 0
    assert b.metadata["steps"] == 30 and isinstance(b.metadata["metrics"]["train_loss"], float)


def test_bundle_info_plain_json(trained):
    model, tok, _, path = trained
    info = bundle_info(path)
    assert json.loads(json.dumps(info)) == info
    assert info["n_params"] == model.n_params() and info["tokenizer"]["pad_id"] == tok.pad_id
    assert set(info["files"]) == set(BUNDLE_FILES)


def _flip(f, at, mask):
    data = bytearray(f.read_bytes()); data[at] ^= mask; f.write_bytes(bytes(data))


def test_every_manifest_byte_flip_refused(trained, tmp_path):
    "Every byte of the manifest, flipped by one bit and by all eight: refused, naming manifest.json."
    c = shutil.copytree(trained[3], tmp_path/"b")
    f = c/MANIFEST_FILE
    for at in range(f.stat().st_size):
        for mask in (0x01, 0xFF):
            _flip(f, at, mask)
            with pytest.raises(BundleError, match=str(f)): load_bundle(c)
            _flip(f, at, mask)
    load_bundle(c)   # and flipped back, it loads


@pytest.mark.parametrize("name", BUNDLE_FILES)
def test_byte_flips_in_each_file_refused(trained, tmp_path, name):
    c = shutil.copytree(trained[3], tmp_path/"b")
    f = c/name
    n = f.stat().st_size
    positions = sorted({0, n - 1, *random.Random(name).sample(range(n), min(n, 48))})
    for at in positions:
        for mask in (0x01, 0x80):
            _flip(f, at, mask)
            with pytest.raises(BundleError, match=str(f)): load_bundle(c)
            _flip(f, at, mask)
    with open(f, "ab") as h: h.write(b"\0")
    with pytest.raises(BundleError, match=re.escape(f"{quoted(f)}: {n + 1} bytes")): load_bundle(c)
    f.write_bytes(f.read_bytes()[:n // 2])
    with pytest.raises(BundleError, match=str(f)): load_bundle(c)
    f.unlink()
    with pytest.raises(BundleError, match=re.escape(f"{quoted(f)}: missing")): load_bundle(c)


def test_file_names_outside_the_bundle_refused(trained, tmp_path):
    from kelly.exporters import _manifest_text
    c = shutil.copytree(trained[3], tmp_path/"b")
    m = json.loads((c/MANIFEST_FILE).read_text())
    m["files"]["../escape.json"] = m["files"]["metadata.json"]
    (c/MANIFEST_FILE).write_text(_manifest_text(m))
    with pytest.raises(BundleError, match="not a plain file name"): load_bundle(c)


def test_compiled_model_is_unwrapped(trained, tmp_path):
    model, tok, ids, _ = trained
    p = save_bundle(tmp_path/"b", torch.compile(model), tokenizer=tok)
    assert "_orig_mod" not in "".join(load_bundle(p).model.state_dict())


def test_bfloat16_weights_keep_their_dtype(trained, tmp_path):
    model, tok, ids, _ = trained
    half = MusicTransformer(model.config).to(torch.bfloat16).eval()
    half.load_state_dict(model.state_dict())
    b = load_bundle(save_bundle(tmp_path/"b", half, tokenizer=tok))
    assert b.model.embed.weight.dtype == torch.bfloat16 and b.manifest["model"]["dtype"] == "bfloat16"
    sd, sd2 = half.state_dict(), b.model.state_dict()
    assert all(sd2[k].dtype == torch.bfloat16 and torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.inference_mode(): assert torch.equal(b.model(ids[None, :64]), half(ids[None, :64]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_save_and_load(trained, tmp_path):
    model, tok, ids, _ = trained
    gpu = MusicTransformer(model.config).cuda().eval(); gpu.load_state_dict(model.state_dict())
    b = load_bundle(save_bundle(tmp_path/"b", gpu, tokenizer=tok), device="cuda")
    assert b.model.embed.weight.is_cuda
    with torch.inference_mode(): torch.testing.assert_close(b.model(ids[None, :64].cuda()).cpu(), model(ids[None, :64]))


# ---------------------------------------------------------------- killed while overwriting

CHILD = r"""
import sys, torch
from kelly.exporters import save_bundle
from kelly.models import MusicTransformer, TransformerConfig
from kelly.tokenizer import Tokenizer
tok = Tokenizer()
cfg = TransformerConfig.for_tokenizer(tok, n_layers=4, width=512, n_heads=8)
models = []
for seed in (1, 2):
    torch.manual_seed(seed); models.append(MusicTransformer(cfg))
i = 0
while True:
    save_bundle(sys.argv[1], models[i % 2], tokenizer=tok, metadata={"seed": 1 + i % 2}, overwrite=True)
    if i == 0: print("saved", flush=True)
    i += 1
"""


def test_sigkill_during_overwrite_never_loses_the_bundle(tmp_path):
    "A process overwriting a 13M-parameter bundle in a loop is SIGKILLed at random times: a complete bundle always survives."
    path = tmp_path/"runs"/"bundle"
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    seen, mid_write = set(), 0
    for kill in range(5):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "saved", "child did not save"
            time.sleep(rng.uniform(0.0, 1.0))
        finally:
            proc.send_signal(signal.SIGKILL); proc.wait()
        mid_write += any(path.parent.glob(".bundle.*.tmp"))
        if path.exists():
            b = load_bundle(path)
        else:   # killed between the two renames: the old bundle waits beside it
            old = list(path.parent.glob(".bundle.*.old"))
            assert len(old) == 1, list(path.parent.iterdir())
            b = load_bundle(old[0]); os.replace(old[0], path)
        seen.add(b.metadata["seed"])
        torch.manual_seed(b.metadata["seed"])
        ref = MusicTransformer(b.config)
        assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in ref.state_dict().items())
    assert seen <= {1, 2}
    assert mid_write >= 1   # at least one kill landed while files were being written (the loop does little else)
    # the next save cleans what the killed ones left
    save_bundle(path, b.model, tokenizer=b.tokenizer, overwrite=True)
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


# ---------------------------------------------------------------- ONNX

def test_onnx_export_of_trained_bundle_model(trained, tmp_path):
    "The loaded bundle's model in ONNX: onnxruntime's logits match PyTorch's at 4 x 256 (twice max_len)."
    import onnxruntime
    from kelly.exporters import export_onnx
    _, tok, ids, path = trained
    b = load_bundle(path)
    p = export_onnx(b.model, tmp_path/"m.onnx", tokenizer=b.tokenizer)
    x = torch.stack([ids[i:i + 256] for i in (0, 50, 100, 150)])
    got = onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"ids": x.numpy()})[0]
    with torch.inference_mode(): want = b.model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert not b.model.training


def test_onnx_check_failure_keeps_existing_file(trained, tmp_path):
    from kelly.exporters import ExportError, export_onnx
    model, tok, _, _ = trained
    p = tmp_path/"m.onnx"; p.write_bytes(b"previous export")
    with pytest.raises(ExportError, match=re.escape(f"{quoted(p)}: onnxruntime's logits differ")):
        export_onnx(model, p, tokenizer=tok, atol=0.0)    # fp32 kernels differ in the last bits, so nothing passes 0
    assert p.read_bytes() == b"previous export" and [q.name for q in tmp_path.iterdir()] == ["m.onnx"]


def _rewrite(c, name, data):
    "Replace a bundle file and re-checksum the manifest: a consistent edit, which only the semantic checks can catch."
    from kelly.exporters import _manifest_text
    from kelly.core import sha256_file
    (c/name).write_text(json.dumps(data))
    m = json.loads((c/MANIFEST_FILE).read_text())
    m["files"][name] = {"bytes": (c/name).stat().st_size, "sha256": sha256_file(c/name)}
    (c/MANIFEST_FILE).write_text(_manifest_text(m))


def test_consistent_edits_of_config_refused(trained, tmp_path):
    _, tok, _, path = trained
    cfg = json.loads((path/"config.json").read_text())
    c = shutil.copytree(path, tmp_path/"vocab")
    _rewrite(c, "config.json", {**cfg, "vocab_size": tok.vocab_size + 1})
    with pytest.raises(BundleError, match=f"{re.escape(quoted(c/'config.json'))}: the model has {tok.vocab_size + 1} token ids but the tokenizer {tok.vocab_size}"):
        load_bundle(c)
    c = shutil.copytree(path, tmp_path/"width")
    _rewrite(c, "config.json", {**cfg, "width": 32})
    with pytest.raises(BundleError, match=re.escape(f"{quoted(c/'weights.safetensors')}: the weights do not fit")): load_bundle(c)
    c = shutil.copytree(path, tmp_path/"key")
    _rewrite(c, "config.json", {**cfg, "n_layer": 2})
    with pytest.raises(BundleError, match="config.json.*n_layers"): load_bundle(c)


# ---------------------------------------------------------------- kinds and formats

FIXTURES = ROOT/"tests"/"fixtures"


def test_format_1_bundle_from_an_earlier_kelly_loads(tmp_path):
    "tests/fixtures/lm-bundle-v1 was written by kelly's save_bundle before format 2 (commit 2c3bf3e): it still loads, as an lm."
    from kelly.exporters import bundle_kind, model_hash
    src = FIXTURES/"lm-bundle-v1"
    assert json.loads((src/MANIFEST_FILE).read_text())["format_version"] == 1
    b = load_bundle(src, tokenizer=Tokenizer(), kind="lm")
    assert (b.kind, b.manifest["format_version"], bundle_kind(src)) == ("lm", 1, "lm")
    assert b.model_hash == model_hash(b.model) and len(b.model_hash) == 64
    info = bundle_info(src)
    assert info["kind"] == "lm" and info["training_data"] == {"corpus": "bach_chorales"} and set(info["files"]) == set(BUNDLE_FILES)
    ids = torch.arange(1, 30)[None]
    with torch.inference_mode(): logits = b.model(ids)
    # saved again, it is a format-2 bundle of the same model
    b2 = load_bundle(save_bundle(tmp_path/"again", b.model, tokenizer=b.tokenizer, metadata=b.metadata))
    assert b2.manifest["format_version"] == 2 and b2.manifest["kind"] == "lm" and b2.model_hash == b.model_hash
    with torch.inference_mode(): assert torch.equal(b2.model(ids), logits)
    with pytest.raises(BundleError, match="holds a lm model"): load_bundle(src, kind="codec")


@pytest.mark.parametrize("arch", ["frame", "wave"])
def test_codec_bundle_round_trip_and_refusals(arch, tmp_path):
    "Both codec architectures: bundle, load through the same load_bundle, identical codes; a raised version and a flipped byte refused."
    from kelly.codec import Codec, CodecConfig
    from kelly.quantizer import QuantizerConfig
    from kelly.exporters import _manifest_text, model_hash
    torch.manual_seed(0)
    codec = Codec(CodecConfig(arch=arch, channels=8, width=32, n_layers=1, quantizer=QuantizerConfig(n_codebooks=3, codebook_size=32)))
    x = 0.1 * torch.randn(4, 8000)
    codec(x); codec.eval()
    path = save_bundle(tmp_path/"runs"/"c"/"bundle", codec, metadata={"corpus": "noise", "steps": 1})
    b = load_bundle(path)
    assert b.kind == "codec" and b.tokenizer is None and b.model_hash == model_hash(codec)
    assert torch.equal(b.model.encode(x), codec.encode(x))
    assert torch.equal(b.model.decode(codec.encode(x), 8000), codec.decode(codec.encode(x), 8000))
    info = bundle_info(path)
    assert info["codec"]["arch"] == arch and info["codec"]["n_codebooks"] == 3 and info["codec"]["bitrate"] == 50 * 3 * 5
    assert info["training_data"] == {"corpus": "noise"} and "tokenizer" not in info
    c = shutil.copytree(path, tmp_path/"newer")
    m = json.loads((c/MANIFEST_FILE).read_text()); m["format_version"] += 1
    (c/MANIFEST_FILE).write_text(_manifest_text(m))
    with pytest.raises(BundleError, match=f"{re.escape(quoted(c/MANIFEST_FILE))}: bundle format version {m['format_version']} is newer"): load_bundle(c)
    for name in ("weights.safetensors", "config.json", "metadata.json", MANIFEST_FILE):
        c = shutil.rmtree(tmp_path/"flip", ignore_errors=True) or shutil.copytree(path, tmp_path/"flip")
        data = bytearray((c/name).read_bytes()); data[len(data) // 3] ^= 0x01; (c/name).write_bytes(bytes(data))
        with pytest.raises(BundleError, match=str(c/name)): load_bundle(c)
