"""Faults a user meets: every CLI command against a table of bad environments, and concurrent writers.

Each case asserts the CLI's rule: a non-zero exit, one line `kelly <cmd>: error: ...` on stderr naming the path, no
traceback, nothing that existed before changed and no partial output left. The environment table runs `kelly.cli.main`
in this process (the function the console script calls), so the table costs the commands' own work, not a Python
start per case; concurrency needs real processes and gets them.

Permission bits are tested for real too: the rows of PERMISSION_ROWS run as an unprivileged user (`nobody`, via
setpriv, when this runs as root). Hostile inputs to the audio commands (files that are not what their names say,
codes of another codec, the wrong kind of bundle) are the rows of HOSTILE_AUDIO_ROWS.

Bad environments, made for real (this runs as root, where permission bits do not stop writes, so "unwritable" is a
read-only tmpfs mount): a file where a folder should be, a folder under a file, a read-only file system, a full file
system (a small tmpfs, filled), special files (a FIFO where a file is read). Mounting needs root and a kernel that
allows it; without, those rows are skipped with the reason.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import music21
import numpy as np
import pytest

from conftest import ROOT, tool

TEST_PRIMITIVES = Path(music21.__file__).parent/"midi"/"testPrimitive"
TEST_AUDIO = Path(music21.__file__).parent/"audioSearch"/"test_audio.wav"
TINY_MODEL = ["--model.n_layers", "1", "--model.width", "32", "--model.n_heads", "2", "--data.seq_len", "64", "--data.bs", "8"]
TINY_TRAIN = ["--corpus_limit", "3", *TINY_MODEL, "--data.windows_per_epoch", "32", "--optim.epochs", "1",
              "--reliability.sample_every", "0", "--reliability.min_validity", "0", "--quiet", "--samples", "0"]
FULL_DISK_BYTES = 64 * 1024  # size of the tmpfs that is filled to make a full disk
SMALL_DISK_BYTES = 1200 * 1024  # a disk with room for a run folder's first files but not its checkpoints


def _mount_tmpfs(where: Path, *options: str) -> str | None:
    "Mount a tmpfs at `where`; None when done, else why not (the caller skips)."
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root and a kernel that allows it"


def _umount(where: Path):
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    "The bad places, made once per module: name -> a folder path that cannot take output; `_why`: places this machine cannot make."
    base = tmp_path_factory.mktemp("faults")
    (base/"a-file").write_text("I am a file")
    out = {"file": base/"a-file", "under_file": base/"a-file"/"sub", "_base": base, "_why": {}}
    mounts = []
    try:   # unmounted whatever happens, also when making a place fails half-way
        why = _mount_tmpfs(base/"ro", "ro", "size=64k")
        if why is None: out["read_only"] = base/"ro"/"out"; mounts.append(base/"ro")
        else: out["_why"]["read_only"] = why
        why = _mount_tmpfs(base/"full", f"size={FULL_DISK_BYTES}")
        if why is None:
            mounts.append(base/"full")
            fd = os.open(base/"full"/"filler", os.O_WRONLY | os.O_CREAT)   # fill it: every byte of data written from now on fails
            try:
                while os.write(fd, b"\0" * 4096): pass
            except OSError: pass
            finally: os.close(fd)
            out["full"] = base/"full"/"out"
        else: out["_why"]["full"] = why
        yield out
    finally:
        for m in mounts: _umount(m)


def _snapshot(root: Path) -> dict:
    "Every entry under `root` with its size and modification time (what must not change)."
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath)/n
            try: st = p.lstat(); snap[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
            except OSError: pass
    return snap


@pytest.fixture(scope="module")
def home(kelly_home):
    return kelly_home


@pytest.fixture(scope="module")
def lm_bundle(tmp_path_factory):
    "A small language-model bundle (untrained weights: the faults below are about files, not music)."
    from kelly.exporters import save_bundle
    from kelly.models import MusicTransformer, TransformerConfig
    from kelly.tokenizer import Tokenizer
    tok = Tokenizer()
    model = MusicTransformer(TransformerConfig.for_tokenizer(tok, n_layers=1, width=32, n_heads=2, max_len=64))
    return save_bundle(tmp_path_factory.mktemp("lm")/"bundle", model.eval(), tokenizer=tok, metadata={"corpus": "none"})


@pytest.fixture(scope="module")
def codec_bundle(tmp_path_factory):
    "A small codec bundle whose codebooks were initialised by one forward pass; and a codes file it wrote."
    import torch
    from kelly.audio import load_audio
    from kelly.codec import Codec, CodecConfig
    from kelly.exporters import encode_audio, load_bundle, save_bundle
    from kelly.quantizer import QuantizerConfig
    y, _ = load_audio(TEST_AUDIO, sr=16000)
    torch.manual_seed(0)
    codec = Codec(CodecConfig(width=32, n_layers=1, quantizer=QuantizerConfig(n_codebooks=4, codebook_size=64)))
    codec(torch.from_numpy(np.stack([y[16000 * i:16000 * (i + 1)] for i in range(4)])))
    folder = tmp_path_factory.mktemp("codec")
    bundle = save_bundle(folder/"bundle", codec.eval(), metadata={"corpus": "music21 test_audio.wav"})
    codes = encode_audio(load_bundle(bundle, kind="codec"), TEST_AUDIO).save(folder/"song.npz")
    return bundle, codes


@pytest.fixture(scope="module")
def prior_run(codec_bundle):
    "A run folder holding a small (untrained) code prior bound to the codec above, with that codec beside it."
    from kelly.exporters import PRIOR_CODEC_DIR, load_bundle, save_bundle
    from kelly.prior import CodePrior, PriorConfig
    cb = load_bundle(codec_bundle[0], kind="codec")
    run = Path(codec_bundle[0]).parent/"prior-run"
    save_bundle(run/"bundle", CodePrior(PriorConfig.for_codec(cb.model, cb.model_hash, n_layers=1, width=32, n_heads=2, max_frames=25)))
    shutil.copytree(cb.path, run/PRIOR_CODEC_DIR)
    return run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    "Readable inputs: a folder of MIDI files, a WAV file, and a FIFO (a special file that blocks whoever reads it)."
    d = tmp_path_factory.mktemp("inputs")
    (d/"midi").mkdir()
    for p in sorted(TEST_PRIMITIVES.glob("*.mid"))[:3]: shutil.copy(p, d/"midi"/p.name)
    shutil.copy(TEST_AUDIO, d/"song.wav")
    os.mkfifo(d/"fifo.mid")
    return d


def _cli(capsys, *argv, home: Path):
    "Run `kelly.cli.main` here with KELLY_HOME set; returns (status, stdout, stderr)."
    from kelly.cli import main
    old = os.environ.get("KELLY_HOME")
    os.environ["KELLY_HOME"] = str(home)
    try: status = main([str(a) for a in argv])
    finally:
        if old is None: del os.environ["KELLY_HOME"]
        else: os.environ["KELLY_HOME"] = old
    out, err = capsys.readouterr()
    return status, out, err


# command name -> (argv builder taking the bad folder, and the fixtures it needs)
def _commands(lm, codec, codes, inp, prior=None):
    midi = sorted((inp/"midi").iterdir())[0]
    return {
        "generate": lambda bad: ["generate", "--model", lm, "-n", "2", "--max_new_tokens", "16", "--out", bad],
        "evaluate": lambda bad: ["evaluate", "--generated", inp/"midi", "--reference", inp/"midi", "--no_memorisation", "--out", bad],
        "tokenize": lambda bad: ["tokenize", inp/"midi", "--cache", bad, "--workers", "1", "--quiet"],
        "train": lambda bad: ["train", "--runs_dir", bad, *TINY_TRAIN],
        "audio render": lambda bad: ["audio", "render", midi, "--synth", "sine", "--out", bad],
        "audio pitch": lambda bad: ["audio", "pitch", inp/"song.wav", "--csv", Path(bad)/"f0.csv", "--png", Path(bad)/"f0.png"],
        "audio train": lambda bad: ["audio", "train", "--runs_dir", bad, "--quiet"],
        "audio encode": lambda bad: ["audio", "encode", inp/"song.wav", "--model", codec, "--out", Path(bad)/"x.npz"],
        "audio decode": lambda bad: ["audio", "decode", codes, "--model", codec, "--out", Path(bad)/"x.wav"],
        "audio train-prior": lambda bad: ["audio", "train-prior", "--runs_dir", bad, "--codec", codec, "--quiet"],
        "audio generate": lambda bad: ["audio", "generate", "--model", prior, "--seconds", "0.5", "-n", "1", "--out", bad],
    }

COMMANDS = ["generate", "evaluate", "tokenize", "train", "audio render", "audio pitch", "audio train", "audio encode", "audio decode",
            "audio train-prior", "audio generate"]
PLACES = ["file", "under_file", "read_only", "full"]
SKIP = {}   # (command, place) -> why the row cannot run here


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_output(command, place, places, lm_bundle, codec_bundle, prior_run, inputs, home, capsys):
    if (command, place) in SKIP: pytest.skip(SKIP[command, place])
    if place in places["_why"]: pytest.skip(places["_why"][place])
    bad = places[place]
    argv = _commands(lm_bundle, *codec_bundle, inputs, prior_run)[command](bad)
    before = _snapshot(places["_base"])
    status, out, err = _cli(capsys, *argv, home=home)
    assert status == 1, (status, out, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"kelly {command}: error: "), err
    assert any(str(p) in lines[-1] for p in (bad, *Path(bad).parents)), lines[-1]     # it names the path at fault
    assert _snapshot(places["_base"]) == before, "something changed or was left behind"


@pytest.mark.parametrize("command", ["generate --prompt", "audio pitch", "audio encode", "audio decode", "tokenize --check"])
def test_special_files_are_refused_not_read(command, lm_bundle, codec_bundle, inputs, home, tmp_path, capsys):
    "A FIFO where a file is read blocks a naive reader forever: each command refuses it in one line (or lists it as skipped)."
    fifo = inputs/"fifo.mid"
    codec, _ = codec_bundle
    argv = {"generate --prompt": ["generate", "--model", lm_bundle, "--prompt", fifo, "--out", tmp_path/"g"],
            "audio pitch": ["audio", "pitch", fifo, "--csv", tmp_path/"f.csv", "--png", tmp_path/"f.png"],
            "audio encode": ["audio", "encode", fifo, "--model", codec, "--out", tmp_path/"x.npz"],
            "audio decode": ["audio", "decode", fifo, "--model", codec, "--out", tmp_path/"x.wav"],
            "tokenize --check": ["tokenize", "--check", inputs, "--workers", "1"]}[command]
    status, out, err = _cli(capsys, *argv, home=home)
    assert status == 1 and "Traceback" not in err, (status, out, err)
    assert str(fifo) in err + out and ("regular file" in err + out or "FIFO" in err + out), (out, err)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_training_is_one_line_and_leaves_no_temp_files(places, home, capsys, tmp_path):
    "The run folder's first files fit, the first checkpoint does not: one line naming the disk, no temp file left."
    if "full" in places["_why"]: pytest.skip(places["_why"]["full"])
    where = tmp_path/"small"
    why = _mount_tmpfs(where, f"size={SMALL_DISK_BYTES}")   # passes the free-space check; the first checkpoints of width 64 do not fit
    if why: pytest.skip(why)
    try:
        status, out, err = _cli(capsys, "train", "--runs_dir", where, "--name", "r", *TINY_TRAIN, "--model.width", "64", home=home)
        assert status == 1 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("kelly train: error: ") and "disk is full" in err and "[No space left on device]" in err, err
        assert (where/"r"/"config.yaml").is_file()    # it failed while training (checkpoint or bundle), not at the free-space check
        left = [p for p in (where/"r").rglob("*") if p.name.endswith(".tmp")]
        assert left == [], left
    finally: _umount(where)


def test_absurd_values_are_refused_before_work(lm_bundle, home, tmp_path, capsys):
    for argv, words in ((["--max_new_tokens", "1000000000000", "--window", "0"], "more than the"),
                        (["--temperature", "nan"], "not a finite number"), (["--top_p", "inf"], "not a finite number"),
                        (["--prompt_tokens", "0", "--prompt", lm_bundle/"manifest.json"], "--prompt_tokens"), (["-n", "0"], "-n must be")):
        status, out, err = _cli(capsys, "generate", "--model", lm_bundle, "--out", tmp_path/"g", *argv, home=home)
        assert status == 1 and words in err and "Traceback" not in err, (argv, err)
    status, out, err = _cli(capsys, "train", "--optim.lr", "nan", home=home)
    assert status == 1 and "optim.lr" in err and "not a finite number" in err, err
    status, out, err = _cli(capsys, "train", "--model.n_layers", "0", home=home)
    assert status == 1 and "'model.n_layers'" in err, err
    for flag, value in (("--model.n_layers", "1000000"), ("--model.width", "1000000"), ("--seed", "99999999999999999999999")):
        status, out, err = _cli(capsys, "train", flag, value, "--corpus_limit", "3", "--data.bs", "4", "--runs_dir", tmp_path/"runs", home=home)
        assert status == 1 and "Traceback" not in err and ("choose a smaller model" in err or "does not fit a 64-bit integer" in err), (flag, err)
    assert not (tmp_path/"runs").exists()   # refused before a run folder was made (or removed with the claim)
    assert not (tmp_path/"g").exists()


def test_absurd_audio_generation_values_are_refused_before_work(prior_run, home, tmp_path, capsys):
    for argv, words in ((["--temperature", "nan"], "not a finite number"), (["--seconds", "1e9"], "the limit is"),
                        (["--seconds", "-1"], "'seconds'"), (["-n", "0"], "n must be at least 1")):
        status, out, err = _cli(capsys, "audio", "generate", "--model", prior_run, "--out", tmp_path/"g", *argv, home=home)
        assert status == 1 and words in err and "Traceback" not in err, (argv, err)
        assert not (tmp_path/"g").exists() or not any((tmp_path/"g").iterdir()), argv


def test_audio_generation_backends(prior_run, home, tmp_path, capsys):
    "kelly audio generate --backend: ONNX Runtime's greedy codes give torch's audio; INT8 writes audio too; an unknown backend is refused."
    import soundfile
    wavs = {}
    for backend in ("torch", "onnx", "int8"):
        status, out, err = _cli(capsys, "audio", "generate", "--model", prior_run, "--seconds", "1", "-n", "1", "--temperature", "0",
                                "--backend", backend, "--out", tmp_path/backend, home=home)
        assert status == 0, (backend, err)
        assert ("exported the decoding step to ONNX" in err) == (backend != "torch"), (backend, err)   # the backend asked for is the one used
        wav, = sorted((tmp_path/backend).glob("*.wav"))
        wavs[backend], _ = soundfile.read(wav)
    np.testing.assert_array_equal(wavs["onnx"], wavs["torch"])
    assert wavs["int8"].shape == wavs["torch"].shape and np.isfinite(wavs["int8"]).all()
    status, out, err = _cli(capsys, "audio", "generate", "--model", prior_run, "--backend", "tensorrt", "--out", tmp_path/"x", home=home)
    assert status == 1 and "'backend'" in err and "Traceback" not in err, err
    assert not (tmp_path/"x").exists()


def test_tokenize_check_is_honest(tmp_path, inputs, home, capsys):
    (tmp_path/"empty").mkdir(); (tmp_path/"text").mkdir(); (tmp_path/"text"/"a.txt").write_text("x")
    (tmp_path/"bad").mkdir(); (tmp_path/"bad"/"a.mid").write_text("not MIDI")
    for folder, words in (("empty", "in 0 of 0 file(s)"), ("text", "in 0 of 0 file(s)"), ("bad", "in 0 of 1 file(s); 1 failed")):
        status, out, err = _cli(capsys, "tokenize", "--check", tmp_path/folder, "--workers", "1", home=home)
        assert status == 1 and words in out, (folder, out, err)
    loops = tmp_path/"loops"; shutil.copytree(inputs/"midi", loops)
    os.symlink("b.mid", loops/"a.mid"); os.symlink("a.mid", loops/"b.mid"); os.symlink(".", loops/"up")
    status, out, err = _cli(capsys, "tokenize", "--check", loops, "--workers", "1", home=home)
    assert status == 1 and "in 3 of 6 file(s); 0 failed, 3 skipped" in out and out.count("symlink loop") == 2 and "cycle" in out, out
    for w in ("0", "-2"):
        status, out, err = _cli(capsys, "tokenize", "--check", loops, "--workers", w, home=home)
        assert status == 1 and "--workers" in err, err
    status, out, err = _cli(capsys, "tokenize", loops, "--cache", tmp_path/"cache", "--workers", "1", "--quiet", home=home)
    assert status == 0 and "skipped 3 file(s)" in out, (out, err)   # the two loops and the cycle, listed in report.json


def _kelly(*args, home, wait=True):
    env = {**os.environ, "KELLY_HOME": str(home)}
    p = subprocess.Popen([tool("kelly"), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    return p


def test_two_runs_started_together_get_two_folders(tmp_path, home):
    runs = tmp_path/"runs"
    procs = [_kelly("train", "--runs_dir", runs, *TINY_TRAIN, home=home) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    for status, out, err in results: assert status == 0, err[-3000:]
    folders = sorted(p.name for p in runs.iterdir())
    assert len(folders) == 2, folders
    for f in folders: assert (runs/f/"bundle"/"manifest.json").is_file() and not list((runs/f).glob(".*.tmp"))


HOLD_LOCK = ("import sys, time; from kelly.trainers import RunLock\n"
             "with RunLock(sys.argv[1], wait=sys.argv[2] == 'wait'):\n"
             "    print(time.time(), flush=True); time.sleep(float(sys.argv[3]))\n")


def test_a_second_writer_of_a_named_run_is_refused(tmp_path, home):
    "While a process writes run `shared` (holds its lock), `kelly train --name shared` is refused in one line and changes nothing."
    runs = tmp_path/"runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, runs/"shared", "hold", "600"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        holder.stdout.readline()          # it holds the lock now
        (runs/"shared"/"history.csv").write_text("epoch,train_loss\n0,1.0\n")
        before = _snapshot(runs)
        second = _kelly("train", "--runs_dir", runs, "--name", "shared", *TINY_TRAIN, home=home)
        status, out, err = second.wait(timeout=600), *second.communicate()
        assert status == 1 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("kelly train: error: run folder") and f"is in use by process {holder.pid}" in err and "--wait" in err, err
        assert _snapshot(runs) == before
    finally: holder.kill(); holder.wait()


def test_wait_queues_behind_the_holder(tmp_path):
    "`RunLock(wait=True)` in a second process blocks until the first releases the folder."
    code = HOLD_LOCK
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", code, tmp_path/"run", "hold", "3"], stdout=subprocess.PIPE, text=True, env=env)
    started = float(holder.stdout.readline())
    waiter = subprocess.run([sys.executable, "-c", code, tmp_path/"run", "wait", "0"], capture_output=True, text=True, env=env, timeout=300)
    holder.wait(timeout=60)
    assert waiter.returncode == 0, waiter.stderr
    assert float(waiter.stdout) >= started + 3, (started, waiter.stdout)


def test_bundle_clean_up_spares_a_live_writer(tmp_path, lm_bundle):
    "A save's clean-up removes temp folders of dead writers only: another live process's in-progress bundle stays."
    from kelly.exporters import load_bundle, save_bundle
    b = load_bundle(lm_bundle)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
        live_tmp = tmp_path/f".bundle.{sleeper.pid}.abcd.tmp"; live_tmp.mkdir(); (live_tmp/"weights.safetensors").write_bytes(b"x")
        dead_tmp = tmp_path/f".bundle.{dead}.efgh.tmp"; dead_tmp.mkdir()
        save_bundle(tmp_path/"bundle", b.model, tokenizer=b.tokenizer)
        assert live_tmp.is_dir() and (live_tmp/"weights.safetensors").is_file() and not dead_tmp.exists()
        umask = os.umask(0); os.umask(umask)
        assert (tmp_path/"bundle").stat().st_mode & 0o777 == 0o777 & ~umask
        assert (tmp_path/"bundle"/"weights.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    finally: sleeper.kill(); sleeper.wait()


# --- Permission denied, for real: the commands run as an unprivileged user -----------------------------------------
# As root, permission bits stop nothing, so these rows run kelly as `nobody` (uid 65534) with `setpriv`: one process
# runs every row through `kelly.cli.main` (a Python start per row would cost seconds each) and writes what each row
# printed and returned. The inputs and bundles are copied into a folder every user can search; root owns the places
# that must refuse: a folder with one file in it as `--out`, a KELLY_HOME, a MIDI file (0600) and a folder (0700) in
# a corpus, a WAV, a codes file, a bundle's weights and a whole bundle folder. `nobody` owns its HOME and an output
# folder. setpriv executes the interpreter itself: an exec through `env` or `nice` as `nobody` would be refused where
# the venv's base interpreter lies under a folder nobody may search (root's home, 0700, on the development machine).
UNPRIVILEGED = 65534   # nobody
AS_USER_JOB = r'''
import contextlib, io, json, os, sys, time, traceback
from kelly.cli import main
cases, results = json.loads(open(sys.argv[1]).read()), {}
for name, case in cases.items():
    os.environ["KELLY_HOME"] = case["home"]
    out, err, t0 = io.StringIO(), io.StringIO(), time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: status = main(case["argv"])
        except SystemExit as e: status = e.code
        except BaseException: status = "raised"; traceback.print_exc(file=err)
    results[name] = {"status": status, "out": out.getvalue(), "err": err.getvalue(), "euid": os.geteuid(), "s": round(time.monotonic() - t0, 2)}
open(sys.argv[2], "w").write(json.dumps(results))
'''


def _user_prefix() -> tuple[list[str], str | None]:
    "How to run a process as an unprivileged user here: (command prefix, None) or ([], why not)."
    if os.geteuid() != 0: return [], None      # permission bits already apply to this user
    if shutil.which("setpriv") is None: return [], "no setpriv (util-linux) to run a process as an unprivileged user"
    return ["setpriv", f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups"], None


@pytest.fixture(scope="module")
def as_user(lm_bundle, codec_bundle, inputs, tmp_path_factory):
    "Build the places, run every PERMISSION_ROWS row as the unprivileged user in one process; yields (results, places)."
    import tempfile
    prefix, why = _user_prefix()
    if why: pytest.skip(why)
    base = Path(tempfile.mkdtemp(prefix="kelly-perm-"))   # under /tmp, not pytest's 0700 folder: the user must reach it
    try:
        base.chmod(0o755)
        codec, codes = codec_bundle
        for src, dst in ((lm_bundle, "lm"), (lm_bundle, "lm-weights-0600"), (lm_bundle, "lm-folder-0700"), (codec, "codec")): shutil.copytree(src, base/dst)
        shutil.copy(codes, base/"song.npz"); shutil.copy(codes, base/"secret.npz"); shutil.copy(inputs/"song.wav", base/"secret.wav")
        shutil.copy(inputs/"song.wav", base/"song.wav")
        shutil.copytree(inputs/"midi", base/"corpus"); shutil.copytree(inputs/"midi", base/"corpus"/"hidden")
        shutil.copy(base/"corpus"/"hidden"/sorted(os.listdir(base/"corpus"/"hidden"))[0], base/"corpus"/"secret.mid")
        (base/"all-secret").mkdir(); shutil.copy(base/"corpus"/"secret.mid", base/"all-secret"/"a.mid")
        (base/"locked").mkdir(); (base/"locked"/"existing.txt").write_text("keep me")
        (base/"home-ro").mkdir()
        for p in ("lm-weights-0600/weights.safetensors", "secret.npz", "secret.wav", "corpus/secret.mid", "all-secret/a.mid"): (base/p).chmod(0o600)
        for p in ("lm-folder-0700", "corpus/hidden"): (base/p).chmod(0o700)
        for p in ("home", "out"):
            (base/p).mkdir()
            if prefix: os.chown(base/p, UNPRIVILEGED, UNPRIVILEGED)
        if not prefix:   # not root: the owner's own permission bits must deny, as they do for anyone else
            for p in ("locked", "home-ro"): (base/p).chmod(0o555)
        user_home = str(base/"home"/"kelly")
        cases = {name: {"argv": [str(a).replace("{B}", str(base)) for a in argv], "home": str(base/"home-ro") if ro_home else user_home}
                 for name, (argv, ro_home, _) in PERMISSION_ROWS.items()}
        (base/"cases.json").write_text(__import__("json").dumps(cases)); (base/"cases.json").chmod(0o644)
        roots = ("locked", "home-ro", "corpus", "all-secret", "lm", "lm-weights-0600", "lm-folder-0700", "codec", "song.npz", "secret.npz", "secret.wav")
        before = {r: _snapshot(base/r) if (base/r).is_dir() else (base/r).stat().st_mtime_ns for r in roots}
        env = {**os.environ, "HOME": str(base/"home"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        r = subprocess.run([*prefix, sys.executable, "-c", AS_USER_JOB, str(base/"cases.json"), str(base/"out"/"results.json")],
                           cwd=base, env=env, capture_output=True, text=True, timeout=600)
        if not (base/"out"/"results.json").is_file():
            if "import" in r.stderr and r.returncode and prefix:
                pytest.skip(f"the unprivileged user cannot run this Python: {r.stderr.strip().splitlines()[-1:]}")
            pytest.fail(f"the unprivileged job failed ({r.returncode}): {r.stderr[-3000:]}")
        results = __import__("json").loads((base/"out"/"results.json").read_text())
        after = {r: _snapshot(base/r) if (base/r).is_dir() else (base/r).stat().st_mtime_ns for r in roots}
        yield results, base, before, after
    finally:
        for p in (base/"lm-folder-0700", base/"corpus"/"hidden", base/"locked", base/"home-ro"):
            if p.exists(): p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


# row -> (argv with {B} for the folder, whether KELLY_HOME is the folder the user cannot write, words the outcome holds)
PERMISSION_ROWS = {
    "tokenize: unreadable file and folder in the corpus": (["tokenize", "{B}/corpus", "--cache", "{B}/out/cache", "--workers", "1", "--quiet"], False, "skipped 2 file(s)"),
    "tokenize --check: unreadable file and folder": (["tokenize", "--check", "{B}/corpus", "--workers", "1"], False, "2 skipped"),
    "tokenize: nothing readable": (["tokenize", "{B}/all-secret", "--cache", "{B}/out/cache2", "--workers", "1", "--quiet"], False, "no readable MIDI files"),
    "tokenize: KELLY_HOME not writable": (["tokenize", "{B}/corpus", "--workers", "1", "--quiet"], True, "{B}/home-ro"),
    "train: KELLY_HOME not writable": (["train", *TINY_TRAIN], True, "{B}/home-ro"),
    "audio train: KELLY_HOME not writable": (["audio", "train", "--quiet"], True, "{B}/home-ro"),
    "generate: --out without permission": (["generate", "--model", "{B}/lm", "-n", "1", "--max_new_tokens", "8", "--out", "{B}/locked/gen"], False, "{B}/locked"),
    "generate: --out is a folder without permission": (["generate", "--model", "{B}/lm", "-n", "1", "--max_new_tokens", "8", "--out", "{B}/locked"], False, "{B}/locked"),
    "audio encode: --out without permission": (["audio", "encode", "{B}/song.wav", "--model", "{B}/codec", "--out", "{B}/locked/x.npz"], False, "{B}/locked"),
    "audio decode: --out without permission": (["audio", "decode", "{B}/song.npz", "--model", "{B}/codec", "--out", "{B}/locked/x.wav"], False, "{B}/locked"),
    "audio encode: unreadable WAV": (["audio", "encode", "{B}/secret.wav", "--model", "{B}/codec", "--out", "{B}/out/x.npz"], False, "{B}/secret.wav"),
    "audio decode: unreadable codes": (["audio", "decode", "{B}/secret.npz", "--model", "{B}/codec", "--out", "{B}/out/x.wav"], False, "{B}/secret.npz"),
    "generate: unreadable weights": (["generate", "--model", "{B}/lm-weights-0600", "-n", "1", "--max_new_tokens", "8", "--out", "{B}/out/g"], False, "{B}/lm-weights-0600"),
    "info: unreadable bundle folder": (["info", "{B}/lm-folder-0700"], False, "{B}/lm-folder-0700"),
    "--log-file without permission": (["--log-file", "{B}/locked/log.txt", "info", "{B}/lm"], False, "{B}/locked"),
}


@pytest.mark.parametrize("row", list(PERMISSION_ROWS))
def test_permission_denied_as_an_unprivileged_user(row, as_user):
    results, base, before, after = as_user
    res, words = results[row], PERMISSION_ROWS[row][2].replace("{B}", str(base))
    assert res["euid"] != 0, "the job ran as root: permissions were not tested"
    assert "Traceback" not in res["err"] and res["status"] != "raised", res["err"]
    assert before == after, "a file or folder the user may not write changed"
    argv = PERMISSION_ROWS[row][0]
    if row.startswith("tokenize: unreadable"):   # the walk goes on: both listed in the cache's report, with the reason
        assert res["status"] == 0 and words in res["out"], res
        report = (base/"out"/"cache"/"report.json").read_text()
        assert "secret.mid" in report and "hidden" in report and report.count("permission denied") == 2, report
        return
    assert res["status"] == 1, res
    if row.startswith("tokenize --check"):
        assert words in res["out"] and res["out"].count("permission denied") == 2 and "secret.mid" in res["out"] and "hidden" in res["out"], res["out"]
        return
    command = " ".join(a for a in argv[:2] if not a.startswith("-") and a in ("tokenize", "train", "audio", "generate", "info", "encode", "decode"))
    if argv[0] == "--log-file": command = "info"
    lines = res["err"].strip().splitlines()
    assert lines and lines[-1].startswith(f"kelly {command}: error: ") and words in lines[-1], res["err"]
    assert "permission denied" in lines[-1].lower(), lines[-1]   # the reason, not only the path
    assert sorted(os.listdir(base/"locked")) == ["existing.txt"]


@pytest.fixture(scope="module")
def audio_corpus(tmp_path_factory):
    "A folder of four 1.5-second WAVs cut from music21's test recording: enough for a split, trained on in seconds."
    from kelly.audio import load_audio, save_audio
    d = tmp_path_factory.mktemp("audio_corpus")
    y, sr = load_audio(TEST_AUDIO, sr=16000)
    for i in range(4): save_audio(d/f"piece{i}.wav", y[24000 * i:24000 * (i + 1)], sr)
    return d


TINY_CODEC = ["--device", "cpu", "--data.sample_rate", "16000", "--data.length", "8000", "--data.bs", "4", "--data.valid_frac", "0.25",
              "--data.crops_per_epoch", "8", "--model.width", "64", "--model.n_layers", "1", "--model.quantizer.n_codebooks", "2",
              "--model.quantizer.codebook_size", "32", "--optim.epochs", "1", "--eval_batches", "1", "--n_reconstructions", "0",
              "--health_warmup", "1000", "--quiet"]
TINY_PRIOR = ["--device", "cpu", "--data.bs", "4", "--data.valid_frac", "0.25", "--data.windows_per_epoch", "8", "--model.n_layers", "1", "--model.width", "128",
              "--model.n_heads", "2", "--optim.epochs", "1", "--reliability.sample_every", "0", "--quiet"]


@pytest.mark.parametrize("command", ["audio train", "audio train-prior"])
def test_full_disk_during_audio_training_is_one_line_and_leaves_no_temp_files(command, places, codec_bundle, audio_corpus, home, capsys, tmp_path):
    "As `train`'s row: the run folder's first files fit, a checkpoint (or the prior's codec copy) does not."
    if "full" in places["_why"]: pytest.skip(places["_why"]["full"])
    where = tmp_path/"small"
    why = _mount_tmpfs(where, f"size={SMALL_DISK_BYTES}")
    if why: pytest.skip(why)
    argv = (["audio", "train", "--runs_dir", where, "--name", "r", "--corpus", audio_corpus, *TINY_CODEC] if command == "audio train" else
            ["audio", "train-prior", "--runs_dir", where, "--name", "r", "--corpus", audio_corpus, "--codec", codec_bundle[0], *TINY_PRIOR])
    try:
        status, out, err = _cli(capsys, *argv, home=home)
        assert status == 1 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"kelly {command}: error: ") and "disk is full" in last and "[No space left on device]" in last, err
        assert (where/"r"/"config.yaml").is_file()    # it failed while training or bundling, not at the free-space check
        left = [p for p in (where/"r").rglob("*") if p.name.endswith(".tmp")]
        assert left == [], left
    finally: _umount(where)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    "Inputs a hostile user hands the audio commands: files that are not what their names say, and a second codec."
    import wave
    import torch
    from kelly.codec import Codec, CodecConfig
    from kelly.exporters import save_bundle
    from kelly.quantizer import QuantizerConfig
    d = tmp_path_factory.mktemp("bad_inputs")
    (d/"empty.wav").write_bytes(b""); (d/"text.wav").write_text("not audio at all"); (d/"empty.npz").write_bytes(b"")
    (d/"folder.wav").mkdir(); (d/"out-folder").mkdir(); (d/"a-file").write_text("x")
    with wave.open(str(d/"zero.wav"), "wb") as w: w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000); w.writeframes(b"")
    torch.manual_seed(1)
    other = Codec(CodecConfig(width=32, n_layers=1, quantizer=QuantizerConfig(n_codebooks=4, codebook_size=64)))
    other(0.1 * torch.randn(4, 16000))   # the first forward initialises the codebooks
    save_bundle(d/"other-codec", other.eval())
    return d


# row -> (argv builder taking (bad inputs folder, codec bundle, codes file, prior run, lm bundle, MIDI folder, output folder), words of the error line)
HOSTILE_AUDIO_ROWS = {
    "audio encode: a folder named .wav": (lambda b, c, k, p, lm, m, o: ["audio", "encode", b/"folder.wav", "--model", c, "--out", o/"x.npz"], "is a folder"),
    "audio encode: an empty WAV": (lambda b, c, k, p, lm, m, o: ["audio", "encode", b/"empty.wav", "--model", c, "--out", o/"x.npz"], "file is empty"),
    "audio encode: text renamed .wav": (lambda b, c, k, p, lm, m, o: ["audio", "encode", b/"text.wav", "--model", c, "--out", o/"x.npz"], "not audio"),
    "audio encode: a WAV without samples": (lambda b, c, k, p, lm, m, o: ["audio", "encode", b/"zero.wav", "--model", c, "--out", o/"x.npz"], "no samples"),
    "audio encode: --out is a folder": (lambda b, c, k, p, lm, m, o: ["audio", "encode", TEST_AUDIO, "--model", c, "--out", b/"out-folder"], "is a folder"),
    "audio encode: --model is a prior": (lambda b, c, k, p, lm, m, o: ["audio", "encode", TEST_AUDIO, "--model", p, "--out", o/"x.npz"], "not the codec model"),
    "audio decode: a WAV given as codes": (lambda b, c, k, p, lm, m, o: ["audio", "decode", TEST_AUDIO, "--model", c, "--out", o/"x.wav"], "not a codes file"),
    "audio decode: an empty .npz": (lambda b, c, k, p, lm, m, o: ["audio", "decode", b/"empty.npz", "--model", c, "--out", o/"x.wav"], "it is empty"),
    "audio decode: codes of another codec": (lambda b, c, k, p, lm, m, o: ["audio", "decode", k, "--model", b/"other-codec", "--out", o/"x.wav"], "made by the codec with model hash"),
    "audio decode: --out is a folder": (lambda b, c, k, p, lm, m, o: ["audio", "decode", k, "--model", c, "--out", b/"out-folder"], "is a folder"),
    "audio generate: --seconds inf": (lambda b, c, k, p, lm, m, o: ["audio", "generate", "--model", p, "--seconds", "inf", "--out", o/"g"], "not a finite number"),
    "audio generate: --top_k -3": (lambda b, c, k, p, lm, m, o: ["audio", "generate", "--model", p, "--top_k", "-3", "--out", o/"g"], "'top_k'"),
    "audio generate: a codes file as --prompt": (lambda b, c, k, p, lm, m, o: ["audio", "generate", "--model", p, "--seconds", "0.5", "-n", "1", "--prompt", k, "--out", o/"g"], "not audio"),
    "audio generate: --model is a codec": (lambda b, c, k, p, lm, m, o: ["audio", "generate", "--model", c, "--out", o/"g"], "not the prior model"),
    "audio train: --corpus without audio": (lambda b, c, k, p, lm, m, o: ["audio", "train", "--corpus", b/"out-folder", "--runs_dir", o/"runs", "--quiet"], "holds no audio files"),
    "audio train: --corpus is a file": (lambda b, c, k, p, lm, m, o: ["audio", "train", "--corpus", b/"a-file", "--runs_dir", o/"runs", "--quiet"], "not a folder"),
    "audio train: a named run on a corpus without audio": (lambda b, c, k, p, lm, m, o: ["audio", "train", "--corpus", b/"out-folder", "--runs_dir", o/"runs", "--name", "x", "--quiet"], "holds no audio files"),
    "train: a named run on a corpus without MIDI": (lambda b, c, k, p, lm, m, o: ["train", "--corpus", b/"out-folder", "--runs_dir", o/"runs", "--name", "x", "--quiet"], "holds no MIDI files"),
    "generate: an empty prompt, into new folders": (lambda b, c, k, p, lm, m, o: ["generate", "--model", lm, "--prompt", b/"empty.npz", "--out", o/"new"/"g"], "not a MIDI file"),
    "audio render: a good and a bad file, into new folders": (lambda b, c, k, p, lm, m, o: ["audio", "render", sorted(m.glob("*.mid"))[0], b/"empty.wav", "--out", o/"new"/"r"], "not a MIDI file"),
    "audio train-prior: --codec is a language model": (lambda b, c, k, p, lm, m, o: ["audio", "train-prior", "--codec", lm, "--runs_dir", o/"runs", "--quiet"], "not the codec model"),
    "info: a codes file": (lambda b, c, k, p, lm, m, o: ["info", k], "not a bundle"),
    "info: an empty folder": (lambda b, c, k, p, lm, m, o: ["info", b/"out-folder"], "not a kelly bundle"),
    "evaluate: --generated is a file": (lambda b, c, k, p, lm, m, o: ["evaluate", "--generated", b/"a-file", "--reference", m, "--no_memorisation", "--out", o/"e"], "not a folder"),
    "evaluate: --generated holds audio, not MIDI": (lambda b, c, k, p, lm, m, o: ["evaluate", "--generated", b/"folder.wav", "--reference", m, "--no_memorisation", "--out", o/"e"], "holds no MIDI files"),
}


@pytest.mark.parametrize("row", list(HOSTILE_AUDIO_ROWS))
def test_hostile_inputs_to_the_audio_commands(row, bad_inputs, codec_bundle, prior_run, lm_bundle, inputs, home, tmp_path, capsys):
    "One line naming the problem, exit 1, no traceback, nothing written."
    build, words = HOSTILE_AUDIO_ROWS[row]
    before = _snapshot(bad_inputs)
    argv = build(bad_inputs, *codec_bundle, prior_run, lm_bundle, inputs/"midi", tmp_path/"o")
    status, out, err = _cli(capsys, *argv, home=home)
    command = " ".join(argv[:2]) if argv[0] == "audio" else argv[0]
    assert status == 1 and "Traceback" not in err, (status, out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"kelly {command}: error: ") and words in last, err
    # nothing written, not even an empty folder: a training row's runs_dir, a generation's --out and its parents
    assert not (tmp_path/"o").exists(), sorted((tmp_path/"o").rglob("*"))
    assert _snapshot(bad_inputs) == before


def test_failed_audio_generation_leaves_no_new_folder(prior_run, home, tmp_path, capsys):
    "A generation that fails after starting (a length of no frames at all, refused by the sampler) removes the folders it created, parents too."
    status, out, err = _cli(capsys, "audio", "generate", "--model", prior_run, "--seconds", "1e-9", "-n", "1", "--out", tmp_path/"new"/"g", home=home)
    assert status == 1 and "Traceback" not in err and "shorter than one code frame" in err, err
    assert not (tmp_path/"new").exists()


def test_paths_in_messages_are_quoted(tmp_path, lm_bundle, codec_bundle, inputs, home, capsys):
    "A name with a trailing space is visible in every message: paths are quoted (`'take 1 .mid'`), in errors and in skip lists."
    corpus = tmp_path/"corpus "; shutil.copytree(inputs/"midi", corpus); (corpus/"take 1 .mid").write_bytes(b"MThd broken")
    status, out, err = _cli(capsys, "tokenize", "--check", corpus, "--workers", "1", home=home)
    assert status == 1 and repr(str(corpus/"take 1 .mid")) in out + err, (out, err)
    for argv, path in ((["generate", "--model", f"{lm_bundle} ", "--out", tmp_path/"g"], f"{lm_bundle} "),
                       (["info", tmp_path/"missing "], tmp_path/"missing "),
                       (["train", "--corpus", tmp_path/"none ", "--runs_dir", tmp_path/"runs", "--quiet"], tmp_path/"none "),
                       (["train", "--corpus", "null", "--runs_dir", tmp_path/"runs", "--quiet"], "null"),   # a path, not YAML's null (the default corpus)
                       (["generate", "--model", lm_bundle, "--prompt", corpus/"take 1 .mid", "--out", tmp_path/"g"], corpus/"take 1 .mid"),
                       (["audio", "encode", corpus/"take 1 .mid", "--model", codec_bundle[0], "--out", tmp_path/"x.npz"], corpus/"take 1 .mid")):
        status, out, err = _cli(capsys, *argv, home=home)
        assert status == 1 and repr(str(path)) in err.strip().splitlines()[-1], (argv, err)
    assert not (tmp_path/"g").exists() and not (tmp_path/"runs").exists()


def test_info_reads_a_run_folder_as_the_other_commands_do(prior_run, home, capsys):
    status, out, err = _cli(capsys, "info", prior_run, home=home)
    assert status == 0 and '"kind": "prior"' in out, (out, err)
