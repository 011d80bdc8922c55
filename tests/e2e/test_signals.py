"""SIGINT (Ctrl-C) and SIGTERM during long commands (issue 24.1): one line, exit 130 / 143, no
traceback (DataLoader workers included), nothing half-written kept; then a plain rerun (eval,
predict) or `--resume` (train-teacher) completes. Acceptance: SIGTERM during training + `--resume`
gives the same final weights as an unbroken run (sha256).

The signals are real and sent at a chosen point: the command runs in a subprocess that sends it
(to itself, or as a terminal's Ctrl-C to its whole process group, DataLoader workers included) on
the k-th call of a function of the work loop (`tests.helpers.hooked`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from slsd_cli.cli import main

from tests.helpers.hooked import env, hooked_argv

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["data.image_size=64", "model.image_size=64", "train.batch_per_process=1", "train.micro_batch=1",
        "train.log_every=1", "train.warmup_iters=2", "train.lr=0.001"]
ITERATIONS = 4

# as a terminal's Ctrl-C reaches the whole process group (DataLoader workers included), or SIGTERM to it alone
SIGNAL = """
if param == "int":
    os.killpg(os.getpgid(0), signal.SIGINT)
else:
    os.kill(os.getpid(), signal.SIGTERM)
"""

FORWARD = "slsd_cli.engine.trainer:_forward_backward"   # one call per iteration (one micro-batch)
PREDICT = "slsd_cli.inference.predictor:Predictor.predict"  # one call per image batch


def _signalled(target: str, at: int, how: str, args: list[str]) -> subprocess.CompletedProcess:
    """`slsd <args>` in a subprocess (its own session) that gets the signal on the `at`-th call of `target`."""
    return subprocess.run(hooked_argv(SIGNAL, target, at, how, args), env=env(), capture_output=True, text=True,
                          timeout=300, start_new_session=True)


def _sigterm_here(target: str, at: int, args: list[str], monkeypatch, capsys) -> subprocess.CompletedProcess:
    """`slsd <args>` in this process (cheaper: no interpreter to start) sending itself a real SIGTERM on
    the `at`-th call of `target` (the handlers main() installs act on it; pytest's are back after)."""
    import importlib
    import os
    import signal

    module_name, _, attribute = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real, calls = getattr(owner, name), [0]

    def wrapper(*a, **k):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(owner, name, wrapper)
    capsys.readouterr()
    code = main(args)
    monkeypatch.setattr(owner, name, real)
    return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)


def _stop(target: str, at: int, how: str, args: list[str], monkeypatch, capsys) -> subprocess.CompletedProcess:
    """SIGTERM in this process; a terminal's Ctrl-C (the whole process group, workers included) in a subprocess."""
    if how == "term":
        return _sigterm_here(target, at, args, monkeypatch, capsys)
    return _signalled(target, at, how, args)


def _stopped(proc: subprocess.CompletedProcess, how: str, *words: str) -> str:
    """The one error line of a command stopped by the signal, with its exit code."""
    assert proc.returncode == (130 if how == "int" else 143), proc.stderr
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert f"interrupted by {'SIGINT' if how == 'int' else 'SIGTERM'}" in lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train(world, run: Path, *extra: str) -> list[str]:
    return ["train-teacher", "synthetic_tiny", *TINY, "--train-json", str(world["val"]), "--out-dir", str(run),
            "--iterations", str(ITERATIONS), *extra]


@pytest.fixture(scope="module")
def world(tiny_synth, tmp_path_factory, one_thread) -> dict:
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.model import build_detector, save_detector, tiny_eva_config

    root = tmp_path_factory.mktemp("signals")
    val = tiny_synth / "val.json"
    world = {"root": root, "val": val, "images": tiny_synth / "images"}
    reference = root / "reference"  # the unbroken run
    assert main(_train(world, reference, "data.num_workers=0")) == 0
    categories = load_annotations(val).categories
    torch.manual_seed(0)
    cfg = tiny_eva_config(image_size=64, test_score_threshold=0.0, max_detections=20, rpn_post_nms_topk_test=32)
    save_detector(build_detector(cfg, categories), root / "model", categories, cfg)
    return {**world, "reference": reference, "model": root / "model"}


# ------------------------------------------------------------------ train-teacher, then --resume


@pytest.mark.parametrize("how,workers", [("term", 0), ("int", 1)], ids=["sigterm", "ctrl-c-with-worker"])
def test_training_stops_with_a_checkpoint_and_resume_equals_an_unbroken_run(world, tmp_path, monkeypatch, capsys,
                                                                            how, workers):
    run = tmp_path / "run"
    args = _train(world, run, f"data.num_workers={workers}")
    proc = _stop(FORWARD, 2, how, args, monkeypatch, capsys)  # in the 2nd iteration: it completes, the run stops
    _stopped(proc, how, "after iteration 2/4", str(run / "ckpt" / "last.pt"), "--resume")
    state = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    assert state["iteration"] == 2 and not (run / "model.safetensors").exists()
    assert not list(run.parent.glob(".*.lock")), "the run's lock was left behind"
    assert main(args + ["--resume"]) == 0
    # acceptance: the same final weights as the unbroken run, byte for byte
    assert _sha(run / "model.safetensors") == _sha(world["reference"] / "model.safetensors")
    iterations = [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert iterations == list(range(1, ITERATIONS + 1))


# ------------------------------------------------------------------ eval and predict, then a plain rerun


def _eval(world, out: Path) -> list[str]:
    return ["eval", "--annotations", str(world["val"]), "--checkpoint", str(world["model"]), "--images",
            str(world["images"]), "--out-dir", str(out), "--workers", "1"]


def _predict(world, out: Path) -> list[str]:
    return ["predict", "--checkpoint", str(world["model"]), str(world["images"] / "val_*.png"), "--out",
            str(out / "results.json"), "--workers", "1"]


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("how", ["term", "int"], ids=["sigterm", "ctrl-c"])
def test_inference_rolls_back_and_a_plain_rerun_completes(world, tmp_path, monkeypatch, capsys, command, how):
    out = tmp_path / "out"
    build = _eval if command == "eval" else _predict
    _stopped(_stop(PREDICT, 2, how, build(world, out), monkeypatch, capsys), how)
    left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert left == [], f"left behind: {left}"
    assert main(build(world, out)) == 0, capsys.readouterr().err  # no --force needed
    expected = ["detections.json", "metrics.json"] if command == "eval" else ["results.images.json", "results.json"]
    assert sorted(p.name for p in out.iterdir()) == expected


# ------------------------------------------------------------------ symlinks a resumed run must not follow


@pytest.mark.parametrize("name", ["log.txt", "metrics.jsonl", "eval.jsonl"])
def test_resume_refuses_a_log_symlinked_out_of_the_run(world, tmp_path, capsys, name):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["reference"], run)
    outside = tmp_path / "outside.txt"
    outside.write_text("not slsd's\n")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(outside)
    before = sorted(p.name for p in run.iterdir())
    assert main(_train(world, run, "data.num_workers=0", "--iterations", "5", "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and str(run / name) in err and "symbolic link" in err, err
    assert outside.read_text() == "not slsd's\n" and sorted(p.name for p in run.iterdir()) == before


def test_force_removes_a_symlinked_run_folder_without_following_it(world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["reference"], run)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "keep").mkdir(parents=True)
    (elsewhere / "keep" / "data.txt").write_text("kept\n")
    shutil.rmtree(run / "ckpt")
    (run / "ckpt").symlink_to(elsewhere / "keep", target_is_directory=True)
    assert main(_train(world, run, "data.num_workers=0", "--iterations", "1", "--force")) == 0
    assert (elsewhere / "keep" / "data.txt").read_text() == "kept\n"
    assert (run / "ckpt").is_dir() and not (run / "ckpt").is_symlink()


# ------------------------------------------------------------------ the demo and its child processes

DEMO_SIZE = "DemoSize(classes=3, train_images=255, val_images=15, pool_images=4, image_size=32, " \
            "prototype_image_size=32, teacher_iterations=5, distill_iterations=1, retrieve_k=1, bootstrap=0)"

# param "how|out_dir|since": once the demo's child training has (re)written its recipe.yaml after
# `since` (unix time) and runs its loop, the signal goes to the demo process (SIGTERM) or to its
# process group (a terminal's Ctrl-C: the child is in it too)
SIGNAL_DURING_CHILD_TRAINING = """
import glob, threading
how, out, since = param.split("|")
def fire():
    while not [p for p in glob.glob(out + "/runs/*/recipe.yaml") if os.stat(p).st_mtime > float(since)]:
        time.sleep(0.05)
    time.sleep(0.3)  # set-up done: in the training loop
    if how == "int":
        os.killpg(os.getpgid(0), signal.SIGINT)
    else:
        os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=fire, daemon=True).start()
"""


def _demo(out: Path, how: str, hook: str = "slsd_cli.demo.runner:Runner._start") -> subprocess.CompletedProcess:
    """`slsd demo --jobs 2` at a micro size (the teacher trains in a child process), signalled."""
    argv = hooked_argv(SIGNAL_DURING_CHILD_TRAINING, hook, 1, f"{how}|{out}|{time.time()}",
                       ["demo", "--out-dir", str(out), "--jobs", "2"])
    script = argv[2].replace("from slsd_cli.cli import main", "from slsd_cli.demo import settings\n"
                             f"settings.QUICK = settings.{DEMO_SIZE}\nfrom slsd_cli.cli import main")
    return subprocess.run([*argv[:2], script, *argv[3:]], env=env(), capture_output=True, text=True, timeout=600,
                          start_new_session=True)


def _live_processes_writing(out: Path) -> list[str]:
    """Command lines of live processes that name `out` (the demo's children)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(out) in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


def _checkpoint_iteration(out: Path) -> int:
    (checkpoint,) = out.glob("runs/*/ckpt/last.pt")
    return int(torch.load(checkpoint, weights_only=True)["iteration"])


def test_demo_stops_its_children_and_a_plain_rerun_resumes_them(tmp_path):
    out = tmp_path / "demo"
    # SIGTERM to the demo while its child trains the teacher: the child stops with a checkpoint too
    _stopped(_demo(out, "term"), "term", "rerun the demo")
    assert _live_processes_writing(out) == []
    first = _checkpoint_iteration(out)
    # Ctrl-C in the terminal (the demo and its child both get SIGINT) during the resumed training
    _stopped(_demo(out, "int"), "int")
    assert _live_processes_writing(out) == []
    second = _checkpoint_iteration(out)
    assert 1 <= first < second < 5
    # a plain rerun: the data steps are skipped, the teacher resumes and finishes (the test stops the demo
    # as it goes on to calibrate the teacher: the rest is test_demo's)
    _stopped(_demo(out, "term", hook="slsd_cli.demo.pipeline:Demo.calibrate_teacher"), "term")
    (metrics,) = out.glob("runs/*/metrics.jsonl")
    assert [json.loads(line)["iter"] for line in metrics.read_text().splitlines()] == [5]  # no orphan wrote
    assert _checkpoint_iteration(out) == 5 and len(list(out.glob("runs/*/model.safetensors"))) == 1
