"""Faults around outputs (issue 12 classes 2, 5, 7, 8; issue 13.5):

- SIGKILL between the files of each multi-file output (synth, split, eval, retrieve), simulated
  deterministically: a subprocess whose `os.rename` kills the process right after the k-th output
  was renamed into place. The folder then holds part of the new set; a plain rerun (no --force)
  rolls it back and completes, and a killed `--force` run gives the previous outputs back.
- Disk full on a small tmpfs (root only, skipped otherwise) for synth, eval and train-teacher: one
  line, exit 2, no temporary left.
- A malicious pickle as RUN/ckpt/last.pt and as a --weights file never runs (its marker file never
  appears) and is refused in one line.
- Leftovers of killed runs (temporaries, per-rank shards) inside the output's own folder are removed
  by the next start.
- Output files get the umask's permissions, and two identical runs write byte-identical
  model.safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from slsd_cli.cli import main
from slsd_cli.data.synthetic import generate
from slsd_cli.io import FileSet, atomic_write_json, check_output, save_safetensors_atomic

from tests.helpers.paths import REPO
from tests.helpers.tiny_data import results_from_ground_truth

TINY = ["data.image_size=64", "model.image_size=64", "train.batch_per_process=1", "train.micro_batch=1",
        "data.num_workers=0"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones included) -> sha256."""
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("faults")
    synth = root / "synth"
    generate(synth, classes=6, train_images=255, val_images=6, pool_images=6, image_size=64, seed=0)
    dets = root / "dets.json"
    dets.write_text(json.dumps(results_from_ground_truth(synth / "val.json")))
    # two identical runs, as a user starts them (two processes, side by side): byte-identical weights
    runs = [root / "run_a", root / "run_b"]
    procs = [subprocess.Popen([sys.executable, "-m", "slsd_cli", "train-teacher", "synthetic_tiny", *TINY,
                               "--train-json", str(synth / "val.json"), "--out-dir", str(run), "--iterations", "1"],
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for run in runs]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()
    yield {"root": root, "synth": synth, "val": synth / "val.json", "images": synth / "images", "dets": dets,
           "run": runs[0], "runs": runs}
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ SIGKILL inside a multi-file output

KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    names, after = set(sys.argv[1].split(",")), int(sys.argv[2])
    real, done = os.rename, [0]
    def rename(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if Path(dst).name in names and ".set.tmp" not in str(dst):  # an output renamed into place
            done[0] += 1
            if done[0] == after:
                os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
    from slsd_cli.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def _killed(names: list[str], after: int, args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLER, ",".join(names), str(after), *args], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _split_args(world, out: Path, *extra: str) -> list[str]:
    return ["split", str(world["val"]), "--out-dir", str(out), "--fraction", "0.5", *extra]


def _eval_args(world, out: Path, *extra: str) -> list[str]:
    """eval of a checkpoint: detections.json and metrics.json (one set)."""
    return ["eval", "--annotations", str(world["val"]), "--checkpoint", str(world["run"]), "--images",
            str(world["images"]), "--out-dir", str(out), *extra]


def _retrieve_args(world, out: Path, *extra: str) -> list[str]:
    return ["retrieve", "--annotations", str(world["val"]), "--images", str(world["images"]), "--pool",
            str(world["synth"] / "pool.json"), "--pool-images", str(world["images"]), "--embedder", "colorhist",
            "--workers", "0", "--k", "2", "--cache-dir", str(out.parent / "cache"), "--out",
            str(out / "unlabeled.json"), *extra]


def _synth_args(world, out: Path, *extra: str) -> list[str]:
    return ["synth", str(out), "--classes", "6", "--train-images", "255", "--val-images", "6", "--pool-images", "6",
            "--image-size", "32", *extra]


SETS = {  # command -> (argument builder, its outputs in commit order, files whose bytes are reproducible)
    "synth": (_synth_args, ["images", "train.json", "val.json", "pool.json", "pool_gt.json", "classes.json",
                            "calib.json"], ["train.json", "pool_gt.json", "classes.json", "calib.json"]),
    "split": (_split_args, ["train.json", "holdout.json", "train_frac0.5.json"],
              ["train.json", "holdout.json", "train_frac0.5.json"]),
    "eval": (_eval_args, ["detections.json", "metrics.json"], ["detections.json"]),
    "retrieve": (_retrieve_args, ["unlabeled.json", "retrieval.jsonl", "retrieval_summary.json"],
                 ["unlabeled.json", "retrieval.jsonl"]),
}


@pytest.mark.parametrize("command", sorted(SETS))
def test_sigkill_between_outputs_then_plain_rerun(world, tmp_path, command):
    build, names, reproducible = SETS[command]
    reference = tmp_path / "reference"
    assert main(build(world, reference)) == 0
    assert sorted(p.name for p in reference.iterdir()) == sorted(names)
    for after in sorted({1, len(names) - 1}):  # after the first output, and before the last
        out = tmp_path / f"killed{after}"
        _killed(names, after, build(world, out))
        present = {p.name for p in out.iterdir() if not p.name.startswith(".")}
        assert present == set(names[:after])  # the moment of the kill: part of the new set
        # a plain rerun rolls the half-committed set back and completes without --force
        assert main(build(world, out)) == 0
        assert sorted(p.name for p in out.iterdir()) == sorted(names), "a staging folder was left behind"
        for name in reproducible:
            assert _sha(out / name) == _sha(reference / name), name


@pytest.mark.parametrize("command", sorted(SETS))
def test_sigkill_in_forced_run_restores_previous_outputs(world, tmp_path, command):
    build, names, _ = SETS[command]
    out = tmp_path / "out"
    out.mkdir()
    for name in names:
        (out / name).write_text(f"previous {name}\n")
    _killed(names, 1, build(world, out, "--force"))
    assert (out / names[0]).is_dir() or (out / names[0]).read_text() != f"previous {names[0]}\n"  # new one in
    check_output(out / names[0], force=True)  # what every start does first: roll the set back
    assert {p.name: p.read_text() for p in out.iterdir()} == {name: f"previous {name}\n" for name in names}


def test_file_set_discards_staging_on_error(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(RuntimeError), FileSet([out / "a.json", out / "b.json"], force=False) as files:
        atomic_write_json(files.stage(out / "a.json"), 1)
        raise RuntimeError("failure between the files")
    assert list(out.iterdir()) == []


def test_recovery_is_claimed_once_and_spares_live_writers(tmp_path):
    """Rolling back twice (two torchrun ranks at start) restores the previous output once and keeps it;
    the staging folder of a live writer is left alone."""
    out = tmp_path / "o"
    out.mkdir()
    staging = out / ".a.json.set.tmp"
    (staging / "0").mkdir(parents=True)
    (out / "a.json").write_text("new, renamed into place before the kill\n")
    (staging / "0.old").write_text("previous\n")
    (staging / "journal.json").write_text(json.dumps({"targets": ["a.json"]}))
    check_output(out / "a.json", force=True)
    check_output(out / "a.json", force=True)
    assert [p.name for p in out.iterdir()] == ["a.json"] and (out / "a.json").read_text() == "previous\n"
    live = tmp_path / "p" / ".b.json.set.tmp"
    live.mkdir(parents=True)
    (live / "owner.json").write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    check_output(tmp_path / "p" / "b.json", force=False)
    assert live.is_dir()
    dead = tmp_path / "q" / ".c.json.set.tmp"
    dead.mkdir(parents=True)
    (dead / "owner.json").write_text(json.dumps({"pid": 2 ** 22 + 1, "host": os.uname().nodename}))
    check_output(tmp_path / "q" / "c.json", force=False)
    assert not dead.exists()


def test_sigkill_while_staging_leaves_no_visible_output(world, tmp_path):
    """Killed before the commit (while the files are written): nothing is visible, a rerun works."""
    out = tmp_path / "out"
    script = KILLER.replace('".set.tmp" not in str(dst)', '".set.tmp" in str(dst)').replace("os.rename", "os.replace")
    proc = subprocess.run([sys.executable, "-c", script, "train.json", "1", *_split_args(world, out)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p for p in out.iterdir() if not p.name.startswith(".")] == []
    assert main(_split_args(world, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(SETS["split"][1])


# ------------------------------------------------------------------ disk full


@contextlib.contextmanager
def small_fs(where: Path, size: str, fill: bool = False):
    """A tmpfs of `size` mounted at `where` (root only); `fill` leaves (almost) no space."""
    if not IS_ROOT:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        if fill:
            with contextlib.suppress(OSError), open(where / "filler", "wb", buffering=0) as handle:
                while True:
                    handle.write(b"\0" * 4096)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _no_temporaries(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".rank" in p.name]
    assert not left, left


def test_disk_full_synth(tmp_path, capsys):
    with small_fs(tmp_path / "fs", "256k") as fs:
        code = main(["synth", str(fs / "synth"), "--classes", "6", "--image-size", "64"])
        _one_line(capsys.readouterr().err, str(fs / "synth"), "no space left")
        assert code == 2
        _no_temporaries(fs)
        assert [p for p in (fs / "synth").rglob("*") if p.is_file()] == []


def test_disk_full_eval(world, tmp_path, capsys):
    with small_fs(tmp_path / "fs", "64k", fill=True) as fs:
        code = main(_eval_args(world, fs / "eval"))
        _one_line(capsys.readouterr().err, str(fs / "eval"), "no space left")
        assert code == 2
        _no_temporaries(fs)
        assert not (fs / "eval").exists() or list((fs / "eval").iterdir()) == []


def test_disk_full_train_teacher(world, tmp_path, capsys):
    with small_fs(tmp_path / "fs", "8m") as fs:  # the weights (55 MB) do not fit
        code = main(["train-teacher", "synthetic_tiny", *TINY, "--train-json", str(world["val"]), "--out-dir",
                     str(fs / "run"), "--iterations", "1"])
        _one_line(capsys.readouterr().err, str(fs / "run"), "no space left")
        assert code == 2
        _no_temporaries(fs)
        assert not (fs / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("writer", ["torch_save_atomic", "save_safetensors_atomic", "atomic_write_json"])
def test_disk_full_writers_one_line(tmp_path, writer):
    """Each writer of slsd_cli.io: the one-line error (for torch.save, not its 'enforce fail') and no temporary."""
    from slsd_cli import io
    from slsd_cli.errors import InputError

    with small_fs(tmp_path / "fs", "64k") as fs:
        target = fs / "out" / "file"
        big = torch.zeros(1 << 16)  # 256 KB
        with pytest.raises(InputError) as info:
            if writer == "atomic_write_json":
                io.atomic_write_json(target, {"x": "y" * (1 << 18)})
            elif writer == "torch_save_atomic":
                io.torch_save_atomic({"x": big}, target)
            else:
                io.save_safetensors_atomic({"x": big}, target)
        message = info.value.format()
        assert message.startswith(str(target)) and "no space left" in message and "enforce" not in message
        assert list((fs / "out").iterdir()) == []


# ------------------------------------------------------------------ malicious pickles


def _pickle_that_touches(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"model": Payload()}, protocol=2))


def test_malicious_last_pt_never_runs(world, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(world["run"]), str(run)], check=True)
    marker = tmp_path / "RAN"
    _pickle_that_touches(run / "ckpt" / "last.pt", marker)
    before = _files(run)
    proc = subprocess.run([sys.executable, "-m", "slsd_cli", "train-teacher", "synthetic_tiny", *TINY, "--train-json",
                           str(world["val"]), "--out-dir", str(run), "--iterations", "2", "--resume"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    _one_line(proc.stderr, str(run / "ckpt" / "last.pt"), "other than tensors", "not loaded")
    assert "weights_only=False" not in proc.stderr and "weights_only` set to `False" not in proc.stderr
    assert not marker.exists()
    assert _files(run) == before  # a refused --resume never modifies the run


def test_malicious_weights_file_never_runs(world, tmp_path, capsys):
    marker = tmp_path / "RAN"
    weights = tmp_path / "backbone.pth"
    _pickle_that_touches(weights, marker)
    out = tmp_path / "prototypes.safetensors"
    code = main(["prototypes", "--annotations", str(world["val"]), "--images", str(world["images"]), "--backbone",
                 "resnet18", "--weights", str(weights), "--image-size", "64", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    _one_line(err, str(weights), "other than tensors", "not loaded")
    assert "weights_only" not in err
    assert not marker.exists() and not out.exists()


# ------------------------------------------------------------------ leftovers of killed runs


def test_killed_atomic_write_leftover_removed_on_next_start(world, tmp_path):
    out = tmp_path / "split"
    out.mkdir()
    stale = out / ".train.json.k1ll3d_x.tmp"  # what a SIGKILL inside atomic_path leaves
    stale.write_text("half a file")
    other = out / ".notes.tmp"  # not ours: kept
    other.write_text("x")
    assert main(_split_args(world, out)) == 0
    assert not stale.exists() and other.exists()


def test_killed_atomic_write_in_subprocess(world, tmp_path):
    """A real SIGKILL while a temporary is being written, then the next start removes it."""
    out = tmp_path / "calibration"
    args = ["calibrate", "--annotations", str(world["val"]), "--detections", str(world["dets"]), "--out",
            str(out / "calibration.json")]
    script = textwrap.dedent("""
        import os, signal, sys
        def fsync(fd):
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync = fsync  # every writer of slsd_cli.io calls os.fsync before its rename
        from slsd_cli.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, *args], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = {p.name for p in out.iterdir()}  # the killed run's lock file and temporary (random name)
    temporaries = {name for name in left if name.startswith(".calibration.json.") and name.endswith(".tmp")}
    assert len(left) == 2 and ".calibration.json.lock" in left and len(temporaries) == 1, left
    assert main(args) == 0  # a plain rerun: the leftovers are no output; the lock is taken over, both removed
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json"]


def test_stale_rank_shards_removed_by_next_inference(world, tmp_path):
    """A killed `eval --checkpoint` leaves its per-rank shards in the set's staging folder inside the
    output folder; the next start removes them."""
    out = tmp_path / "eval"
    staged = out / ".detections.json.set.tmp" / "0"
    staged.mkdir(parents=True)
    for stale in ("detections.json.rank3.jsonl", ".detections.json.rank0.jsonl.abcd1234.tmp"):
        (staged / stale).write_text('{"image_id": 1}\n')
    assert main(["eval", "--annotations", str(world["val"]), "--checkpoint", str(world["run"]), "--images",
                 str(world["images"]), "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "metrics.json"]


def test_calibrate_checkpoint_keeps_temporaries_beside_its_output(world, tmp_path, monkeypatch):
    """calibrate --checkpoint: the detections it writes on the way live in a scratch folder beside
    calibration.json (never the system temp folder); a killed run's scratch folder is removed."""
    import tempfile

    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    out = tmp_path / "cal"
    (out / ".calibration.json.scratch.tmp").mkdir(parents=True)
    (out / ".calibration.json.scratch.tmp" / "detections.json.rank1.jsonl").write_text("{}\n")  # killed run
    assert main(["calibrate", "--annotations", str(world["val"]), "--checkpoint", str(world["run"]), "--images",
                 str(world["images"]), "--out", str(out / "calibration.json")]) == 0
    assert [p.name for p in out.iterdir()] == ["calibration.json"]
    assert list(system_tmp.iterdir()) == []


# ------------------------------------------------------------------ modes and identical bytes (issue 13.5)


def test_safetensors_bytes_do_not_depend_on_dict_order(tmp_path):
    tensors = {"b": torch.zeros(2, 3), "a": torch.arange(5).to(torch.bfloat16), "c": torch.tensor(7),
               "mask": torch.ones(3, dtype=torch.bool)}
    metadata = {"z": "1", "format": "slsd", "category_ids": "[1, 2]"}
    save_safetensors_atomic(tensors, tmp_path / "one.safetensors", metadata=metadata)
    save_safetensors_atomic(dict(reversed(list(tensors.items()))), tmp_path / "two.safetensors",
                            metadata=dict(reversed(list(metadata.items()))))
    assert _sha(tmp_path / "one.safetensors") == _sha(tmp_path / "two.safetensors")
    from safetensors.torch import load_file

    loaded = load_file(str(tmp_path / "one.safetensors"))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_umask_permissions(tmp_path, umask):
    from slsd_cli.io import atomic_write_json, torch_save_atomic

    before = os.umask(umask)
    try:
        save_safetensors_atomic({"a": torch.zeros(1)}, tmp_path / "m.safetensors")
        atomic_write_json(tmp_path / "m.json", {})
        torch_save_atomic({"a": torch.zeros(1)}, tmp_path / "c.pt")
    finally:
        os.umask(before)
    for name in ("m.safetensors", "m.json", "c.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_identical_runs_write_identical_weights(world):
    run_a, run_b = world["runs"]
    assert _sha(run_a / "model.safetensors") == _sha(run_b / "model.safetensors")
    mode = (run_a / "model.safetensors").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
