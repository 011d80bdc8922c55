"""Exclusive outputs (issue 24.2): a run directory and every output is locked for the whole run.
Two launches into one output: the second fails at once with one line naming the first's pid and
host, and the first completes with outputs of its own alone (train-teacher, split, predict). A
lock left by a dead process is taken over; releasing leaves nothing behind; a planted symlink in
place of the lock file is never followed.

The first launch runs in a subprocess paused at a chosen point (on the k-th call of a function it
waits for a file to appear: `tests.helpers.hooked`), so the two runs overlap for sure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from slsd_cli.cli import main
from slsd_cli.io import locks

from tests.helpers.hooked import env, hooked_argv

pytestmark = pytest.mark.usefixtures("one_thread")

# the first launch pauses until the test creates the file `param` (it announces the pause first)
PAUSE = """
open(param + ".waiting", "w").close()
while not os.path.exists(param):
    time.sleep(0.05)
"""


class Holder:
    """A command in a subprocess, paused on the k-th call of `target` until `release()`."""

    def __init__(self, tmp: Path, target: str, at: int, args: list[str]):
        self.gate = tmp / "release"
        self.proc = subprocess.Popen(hooked_argv(PAUSE, target, at, str(self.gate), args), env=env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not Path(str(self.gate) + ".waiting").exists():
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "the first launch never reached its pause"
            time.sleep(0.05)

    def release(self) -> int:
        self.gate.touch()
        code = self.proc.wait(timeout=300)
        assert code == 0, self.proc.stderr.read()
        return code


def _second_fails(args: list[str], capsys, holder: Holder, output: Path) -> None:
    started = time.monotonic()
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(output) in lines[0] and f"pid {holder.proc.pid} on host {os.uname().nodename}" in lines[0], lines[0]
    assert time.monotonic() - started < 30  # at once: before any heavy work


@pytest.fixture(scope="module")
def world(tiny_synth, tmp_path_factory, one_thread) -> dict:
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.model import build_detector, save_detector, tiny_eva_config

    root = tmp_path_factory.mktemp("locks")
    val = tiny_synth / "val.json"
    categories = load_annotations(val).categories
    torch.manual_seed(0)
    cfg = tiny_eva_config(image_size=64, test_score_threshold=0.0, max_detections=20, rpn_post_nms_topk_test=32)
    save_detector(build_detector(cfg, categories), root / "model", categories, cfg)
    return {"root": root, "val": val, "images": tiny_synth / "images", "model": root / "model"}


def test_two_train_teacher_into_one_run(world, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train-teacher", "synthetic_tiny", "data.image_size=64", "model.image_size=64", "train.batch_per_process=1",
            "train.micro_batch=1", "train.log_every=1", "data.num_workers=0", "--train-json", str(world["val"]),
            "--out-dir", str(run), "--iterations", "3"]
    holder = Holder(tmp_path, "slsd_cli.engine.trainer:_forward_backward", 2, args)
    _second_fails(args, capsys, holder, run)
    _second_fails([*args, "--force"], capsys, holder, run)  # --force does not override a live run
    holder.release()
    iterations = [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [1, 2, 3]  # one writer: nothing interleaved
    assert len((run / "log.txt").read_text().splitlines()) == 3
    assert not (tmp_path / ".run.lock").exists()


def test_two_splits_with_different_seeds_into_one_folder(world, tmp_path, capsys):
    out = tmp_path / "split"
    first = ["split", str(world["val"]), "--out-dir", str(out), "--seed", "1"]
    holder = Holder(tmp_path, "slsd_cli.data.split:atomic_write_json", 2, first)  # between train.json and holdout.json
    _second_fails(["split", str(world["val"]), "--out-dir", str(out), "--seed", "2", "--force"], capsys, holder,
                  out / "train.json")
    holder.release()
    seeds = {json.loads((out / name).read_text())["info"]["slsd_split"]["seed"] for name in ("train.json", "holdout.json")}
    assert seeds == {1}
    assert sorted(p.name for p in out.iterdir()) == ["holdout.json", "train.json"]


def test_two_predicts_on_one_output(world, tmp_path, capsys):
    out = tmp_path / "pred" / "results.json"
    args = ["predict", "--checkpoint", str(world["model"]), str(world["images"] / "val_*.png"), "--out", str(out)]
    holder = Holder(tmp_path, "slsd_cli.inference.predictor:Predictor.predict", 2, args)
    _second_fails([*args, "--force"], capsys, holder, out)
    holder.release()
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.images.json", "results.json"]


# ------------------------------------------------------------------ the lock itself


LOCK_AND_WAIT = textwrap.dedent("""
    import sys, time
    from slsd_cli.io import locks
    with locks.scope():
        locks.acquire(sys.argv[1])
        print("locked", flush=True)
        sys.stdin.readline()
""")


def test_lock_held_by_another_process_names_it_and_is_free_after_it_dies(tmp_path, capsys):
    out = tmp_path / "o" / "calibration.json"
    other = subprocess.Popen([sys.executable, "-c", LOCK_AND_WAIT, str(out)], env=env(), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "locked"
    holder = json.loads(locks.lock_path(out).read_text())
    assert holder["pid"] == other.pid and holder["host"] == os.uname().nodename
    from slsd_cli.errors import InputError

    with locks.scope(), pytest.raises(InputError, match=f"pid {other.pid} on host"):
        locks.acquire(out)
    other.kill()  # dies holding it: the kernel drops the flock, the stale file stays
    other.wait()
    assert locks.lock_path(out).exists()
    with locks.scope():
        locks.acquire(out)  # taken over
        assert json.loads(locks.lock_path(out).read_text())["pid"] == os.getpid()
        locks.acquire(out)  # re-entrant in one process
    assert not locks.lock_path(out).exists()  # released: nothing left behind


def test_stale_lock_file_of_a_dead_run_does_not_block_a_command(world, tmp_path, capsys):
    out = tmp_path / "split"
    out.mkdir()
    (out / ".train.json.lock").write_text(json.dumps({"pid": 2 ** 22 + 7, "host": os.uname().nodename}))
    assert main(["split", str(world["val"]), "--out-dir", str(out)]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["holdout.json", "train.json"]


def test_lock_file_symlink_is_never_followed(world, tmp_path, capsys):
    out = tmp_path / "split"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / ".train.json.lock").symlink_to(victim)
    assert main(["split", str(world["val"]), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "symbolic link" in err, err
    assert victim.read_text() == "precious\n"


def test_no_lock_on_other_torchrun_ranks_and_none_outside_a_scope(tmp_path, monkeypatch):
    out = tmp_path / "x.json"
    locks.acquire(out)  # no scope: library use, nothing locked
    assert not locks.lock_path(out).exists()
    monkeypatch.setenv("RANK", "1")
    with locks.scope():
        locks.acquire(out)
        assert not locks.lock_path(out).exists()
