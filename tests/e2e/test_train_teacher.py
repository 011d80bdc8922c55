"""`slsd train-teacher` end to end on the embedded benchmark (64-pixel synth images, the tiny recipe):
exact resume, a SIGKILL during a checkpoint write, non-finite losses, similarity targets reaching
the loss, DDP equivalence under torchrun, and the CLI's refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from slsd_cli.cli import main
from slsd_cli.engine import checkpoint as ckpt
from slsd_cli.engine.teacher import TeacherPhase
from slsd_cli.io import load_safetensors
from tests.helpers.cli import read_metrics
from tests.helpers.paths import REPO
from tests.helpers.synth import first_annotated, linked_copy

# 64-pixel images, 2 images per iteration (one per micro-batch), no warm-up to speak of
TINY = ["data.image_size=64", "model.image_size=64", "train.batch_per_process=2", "train.micro_batch=1",
        "train.log_every=1", "train.warmup_iters=2", "train.lr=0.001", "data.num_workers=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(synth_data, tmp_path_factory) -> Path:
    """The synth benchmark at 64 px (4 classes), a 16-image training subset `train16.json` and a
    4-image evaluation subset `val4.json`."""
    shared = synth_data(classes=4, train_images=255, val_images=20, pool_images=1, image_size=64, seed=0)
    root = linked_copy(shared, tmp_path_factory.mktemp("synth"))
    first_annotated(shared / "train.json", root / "train16.json", 16)
    first_annotated(shared / "val.json", root / "val4.json", 4)
    (root / "val.json").symlink_to(shared / "val.json")
    return root


def _args(synth: Path, run: Path, *extra: str, iterations: int = 10) -> list[str]:
    return ["train-teacher", "synthetic_tiny", *TINY, "--train-json", str(synth / "train16.json"),
            "--out-dir", str(run), "--iterations", str(iterations), *extra]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(run / "model.safetensors")[0]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def straight(synth, tmp_path_factory) -> Path:
    """10 iterations in one go (checkpoint every 5)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    torch.set_num_threads(1)
    assert main(_args(synth, run, "train.checkpoint_every=5")) == 0
    return run


def test_run_dir_layout_and_metrics(straight: Path):
    assert {p.name for p in straight.iterdir()} >= {"model.safetensors", "model.json", "metrics.jsonl",
                                                     "recipe.yaml", "ckpt"}
    meta = json.loads((straight / "model.json").read_text())
    assert meta["num_classes"] == 4 and meta["extra"]["phase"] == "teacher"
    assert meta["extra"]["recipe"]["train"]["iterations"] == 10
    lines = read_metrics(straight)
    assert [x["iter"] for x in lines] == list(range(1, 11))
    for x in lines:
        assert set(x["losses"]) >= {"rpn_cls", "rpn_box", "cls_stage0", "box_stage2", "mask"}
        assert x["images_per_s"] > 0 and 0 <= x["data_time_share"] < 1 and x["lr"] > 0
    state = ckpt.load(straight / "ckpt" / "last.pt")
    assert state["iteration"] == 10 and set(state["modules"]) == {"model"}
    assert "recipe.yaml" in {p.name for p in straight.iterdir()}


def test_resume_is_bit_exact(synth, straight, tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = TeacherPhase.after_step

    def interrupt_at_6(self, iteration):
        original(self, iteration)
        if iteration == 5:  # the 6th iteration; the checkpoint of iteration 5 is on disk
            raise KeyboardInterrupt

    monkeypatch.setattr(TeacherPhase, "after_step", interrupt_at_6)
    assert main(_args(synth, run, "train.checkpoint_every=5")) == 130
    monkeypatch.setattr(TeacherPhase, "after_step", original)
    assert ckpt.load(run / "ckpt" / "last.pt")["iteration"] == 5
    assert not (run / "model.safetensors").exists()
    assert main(_args(synth, run, "train.checkpoint_every=5")) == 2  # an existing run needs --resume
    assert main(_args(synth, run, "train.checkpoint_every=5", "--resume")) == 0
    a, b = _weights(straight), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [x["iter"] for x in read_metrics(run)] == list(range(1, 11))
    assert [x["loss"] for x in read_metrics(run)] == [x["loss"] for x in read_metrics(straight)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _evals(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]


def test_periodic_eval_writes_eval_jsonl_and_best_and_resume_equals_an_unbroken_run(synth, tmp_path, monkeypatch):
    """eval.every=2 over 4 iterations: evaluations at 2 and 4 through the sharded inference and
    evaluator of `slsd eval`, RUN/best/ holding the best model. Interrupted during iteration 3
    (checkpoint and evaluation of 2 on disk) and resumed, the run writes the same evaluations and a
    byte-identical best/model.safetensors; train.keep_last=1 keeps one periodic checkpoint."""
    extra = ["train.checkpoint_every=2", "train.keep_last=1", "eval.every=2",
             f"eval.annotations={synth / 'val4.json'}", "eval.metric=segm/AR@20", "eval.max_dets=20"]
    unbroken = tmp_path / "unbroken"
    assert main(_args(synth, unbroken, *extra, iterations=4)) == 0
    evals = _evals(unbroken)
    assert [e["iter"] for e in evals] == [2, 4]
    for e in evals:
        assert e["metric"] == "segm/AR@20" and e["value"] == e["segm"]["AR@20"]
        assert {"AP", "APr", "AP50"} <= set(e["bbox"]) and "per_class" not in e["segm"]
        assert e["time"] > 0 and e["elapsed"] >= 0
    best = max(evals, key=lambda e: (e["value"], -e["iter"]))
    assert (evals[-1]["best"], evals[-1]["best_iter"]) == (best["value"], best["iter"])
    assert (unbroken / "best" / "model.safetensors").is_file() and (unbroken / "best" / "model.json").is_file()
    assert sorted(p.name for p in (unbroken / "ckpt").iterdir()) == ["iter_0000004.pt", "last.pt"]
    assert not list(unbroken.glob(".eval_detections*"))

    run = tmp_path / "resumed"
    original = TeacherPhase.after_step

    def interrupt(self, iteration):
        original(self, iteration)
        if iteration == 2:  # the 3rd iteration: checkpoint and evaluation of iteration 2 are on disk
            raise KeyboardInterrupt

    monkeypatch.setattr(TeacherPhase, "after_step", interrupt)
    assert main(_args(synth, run, *extra, iterations=4)) == 130
    monkeypatch.setattr(TeacherPhase, "after_step", original)
    assert [e["iter"] for e in _evals(run)] == [2]
    assert main(_args(synth, run, *extra, "--resume", iterations=4)) == 0
    keys = ("iter", "value", "improved", "best", "best_iter", "bbox", "segm")
    assert [{k: e[k] for k in keys} for e in _evals(run)] == [{k: e[k] for k in keys} for e in evals]
    assert _sha256(run / "best" / "model.safetensors") == _sha256(unbroken / "best" / "model.safetensors")
    a, b = _weights(unbroken), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (run / "log.txt").read_text().splitlines()
    assert [line.split("iter ")[1].split("/")[0] for line in log] == ["1", "2", "3", "4"]  # appended on resume


def test_a_failed_start_leaves_nothing_and_a_rejected_resume_changes_nothing(synth, straight, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(synth, run, "--images", str(tmp_path / "missing"))) == 2
    assert "image folder not found" in capsys.readouterr().err and not run.exists()
    assert main(_args(synth, run, "eval.every=2", f"eval.annotations={synth / 'val.json'}",
                      f"eval.images={tmp_path / 'missing'}")) == 2
    assert "evaluation image folder not found" in capsys.readouterr().err and not run.exists()
    assert main(_args(synth, run, "eval.every=2", f"eval.annotations={synth / 'val.json'}",
                      "eval.metric=segm/APx")) == 2
    assert "segm/APr" in capsys.readouterr().err and not run.exists()
    # a --resume whose checkpoint does not fit the recipe's model is refused with the run untouched
    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert main(_args(synth, copy, "model.fpn_channels=32", "--resume")) == 2
    assert "does not fit" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


KILLER = textwrap.dedent("""
    import io, sys, time, torch
    torch.set_num_threads(1)
    marker = sys.argv[1]
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *a, **k)
        buffer = io.BytesIO()  # the second checkpoint: write half of it, then wait to be killed
        real_save(obj, buffer)
        half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if hasattr(f, "write"):  # a file object (slsd_cli.io wraps the temporary file's handle)
            handle = getattr(f, "handle", f)
            handle.write(half)
            handle.flush()
        else:
            with open(f, "wb") as handle:
                handle.write(half)
                handle.flush()
        open(marker, "w").close()
        time.sleep(300)

    torch.save = save
    from slsd_cli.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_sigkill_while_writing_a_checkpoint_leaves_a_resumable_run(synth, straight, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "writing"
    args = _args(synth, run, "train.checkpoint_every=2")
    child = subprocess.Popen([sys.executable, "-c", KILLER, str(marker), *args], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert child.poll() is None, child.stdout.read().decode()
            assert time.time() < deadline, "the child never reached its second checkpoint"
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert list((run / "ckpt").glob(".last.pt.*.tmp")), "the half-written temporary file should be there"
    assert ckpt.load(run / "ckpt" / "last.pt")["iteration"] == 2  # the previous checkpoint, intact
    assert main(args + ["--resume"]) == 0
    assert not list((run / "ckpt").glob(".last.pt.*.tmp"))
    a, b = _weights(straight), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _inject_nan(monkeypatch, calls_with_nan):
    original = TeacherPhase.losses
    count = {"calls": 0}

    def losses(self, model, batch):
        out = original(self, model, batch)
        count["calls"] += 1
        if calls_with_nan(count["calls"]):
            out["mask"] = out["mask"] * float("nan")
        return out

    monkeypatch.setattr(TeacherPhase, "losses", losses)


def test_nonfinite_loss_skips_the_step(synth, tmp_path, monkeypatch):
    from slsd_cli import recipe as recipes
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.engine.seeding import seed_everything
    from slsd_cli.model.weights import build_detector

    run = tmp_path / "run"
    _inject_nan(monkeypatch, lambda call: True)
    assert main(_args(synth, run, "train.micro_batch=2", iterations=1)) == 0
    line = read_metrics(run)[0]
    assert line["event"] == "nonfinite" and line["skipped"] is True and line["nonfinite"] == {"mask": "nan"}
    # no optimizer update: the parameters are the initial ones
    recipe = recipes.load("synthetic_tiny", TINY)
    seed_everything(recipe.train.seed)
    initial = build_detector(recipe.model, load_annotations(synth / "train16.json").categories)
    final = _weights(run)
    for name, param in initial.named_parameters():
        assert torch.equal(param.detach(), final[name]), name


def test_repeated_nonfinite_losses_abort_with_a_resumable_checkpoint(synth, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _inject_nan(monkeypatch, lambda call: call >= 2)  # iteration 1 is fine, 2.. are not
    args = _args(synth, run, "train.micro_batch=2", "train.max_nonfinite=2", iterations=5)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 consecutive non-finite losses" in err and "--resume" in err and "Traceback" not in err
    state = ckpt.load(run / "ckpt" / "last.pt")
    assert state["iteration"] == 3 and state["trainer"]["skipped"] == 2
    monkeypatch.undo()
    assert main(args + ["--resume"]) == 0
    lines = read_metrics(run)
    assert [x["iter"] for x in lines if "event" not in x] == [1, 2, 3, 4, 5]
    assert [x["iter"] for x in lines if x.get("event") == "nonfinite"] == [2, 3]


def test_similarity_smoothing_reaches_the_classification_loss(synth, tmp_path, monkeypatch):
    import slsd_cli.model.cascade as cascade
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.labels.smoothing import cosine_similarity, save_prototypes, similarity_targets

    annotations = load_annotations(synth / "train16.json")
    counts = torch.tensor(annotations.instance_counts())
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(4, 8, generator=generator) + 2.0  # positive-ish: distinct, non-trivial similarity
    similarity = cosine_similarity(prototypes)
    save_prototypes(tmp_path / "prototypes.safetensors", prototypes, counts, similarity, annotations.category_ids)
    table = similarity_targets(similarity, counts, epsilon=0.2, gamma=1.0)
    assert not torch.allclose(table, torch.eye(4))

    fed, gathered, loss_targets = [], [], []
    original_losses, original_gather = TeacherPhase.losses, cascade.gather_class_targets
    original_loss = cascade.sigmoid_classification_loss

    def losses(self, model, batch):
        fed.extend(batch.targets)  # what the teacher phase hands the model
        return original_losses(self, model, batch)

    def gather(class_targets, matched, foreground):
        out = original_gather(class_targets, matched, foreground)
        gathered.append((class_targets, matched, foreground, out))
        return out

    def classification_loss(logits, targets, *rest):
        loss_targets.append(targets)
        return original_loss(logits, targets, *rest)

    monkeypatch.setattr(TeacherPhase, "losses", losses)
    monkeypatch.setattr(cascade, "gather_class_targets", gather)
    monkeypatch.setattr(cascade, "sigmoid_classification_loss", classification_loss)
    args = _args(synth, tmp_path / "run", "--smoothing", "similarity",
                 "--prototypes", str(tmp_path / "prototypes.safetensors"), "--epsilon", "0.2", "--gamma", "1.0",
                 iterations=1)
    assert main(args) == 0
    assert len(gathered) == len(loss_targets) == 2 * 3  # 2 micro-batches x 3 cascade stages, 1 image each
    foreground_rois = 0
    for (class_targets, matched, foreground, out), fed_to_loss in zip(gathered, loss_targets):
        target = next(t for t in fed if torch.equal(t["class_targets"], class_targets))
        # each ground truth carries the row of its class
        assert torch.equal(class_targets, table[target["labels"]])
        # a foreground RoI gets the row of its matched ground truth's class, background gets zeros
        expected = table[target["labels"][matched]] * foreground.unsqueeze(1)
        assert torch.equal(out, expected) and torch.equal(fed_to_loss, expected)
        foreground_rois += int(foreground.sum())
    assert foreground_rois > 0


def test_refusals(synth, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.json").write_text("{}")
    assert main(_args(synth, run)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_args(synth, tmp_path / "other", "--smoothing", "similarity")) == 2
    assert "--prototypes" in capsys.readouterr().err
    assert main(_args(synth, tmp_path / "other", "train.bogus=1")) == 2
    assert "unknown key train.bogus" in capsys.readouterr().err
    assert main(["train-teacher", "--help"]) == 0
    assert "Example: slsd train-teacher" in capsys.readouterr().out


RANK_DIES = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    from slsd_cli.engine.teacher import TeacherPhase

    if os.environ["RANK"] == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        original = TeacherPhase.after_step

        def die(self, iteration):
            original(self, iteration)
            if iteration == 2:  # during the 3rd iteration; the checkpoint of iteration 2 is on disk
                Path(os.environ["SLSD_TEST_DIED"]).touch()
                os.kill(os.getpid(), signal.SIGKILL)

        TeacherPhase.after_step = die
    from slsd_cli.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_ddp_two_processes_equal_one_process_with_two_images(synth, tmp_path):
    """torchrun, 2 processes x 1 image vs 1 process x 2 images, same seed: the same losses. In the
    torchrun run, rank 1 is SIGKILLed during iteration 3: torchrun (--max-restarts 1) restarts both
    processes, which continue from the checkpoint of iteration 2 (--resume), and the run still
    matches the single process."""
    single = tmp_path / "single"
    common = ["train.checkpoint_every=2", "train.seed=3"]
    assert main(_args(synth, single, *common, iterations=5)) == 0
    ddp, died, script = tmp_path / "ddp", tmp_path / "died", tmp_path / "rank_dies.py"
    script.write_text(RANK_DIES)
    args = _args(synth, ddp, *common, "train.batch_per_process=1", "--resume", iterations=5)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "--max-restarts", "1", str(script), *args],
                            env={**_env(), "SLSD_TEST_DIED": str(died)}, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert died.exists(), "rank 1 should have died once"
    one, two = read_metrics(single), read_metrics(ddp)
    assert [x["iter"] for x in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        assert a["losses"].keys() == b["losses"].keys()
        for name in a["losses"]:
            assert abs(a["losses"][name] - b["losses"][name]) < 1e-4, (a["iter"], name)
        assert abs(a["loss"] - b["loss"]) < 1e-4
    assert ckpt.load(ddp / "ckpt" / "last.pt")["world_size"] == 2
    wa, wb = _weights(single), _weights(ddp)
    for name in wa:
        if wa[name].is_floating_point() and "running" not in name:
            assert torch.allclose(wa[name], wb[name], atol=1e-4), name


TWICE = textwrap.dedent("""
    import sys
    import torch
    from slsd_cli.cli import main

    torch.set_num_threads(1)
    out, args = sys.argv[1], sys.argv[2:]
    for name in ("first", "second"):
        assert main([*args, "--out-dir", f"{out}/{name}"]) == 0
""")


def test_two_trainings_in_one_fresh_process_are_byte_identical(synth, tmp_path):
    """The first training of a process equals every later one: nothing read once per process (the
    packaged backbone weights, other caches) consumes the seeded RNG stream only on first use. A
    fresh interpreter, so no earlier test has warmed those caches."""
    args = _args(synth, tmp_path / "unused", iterations=2)
    args = args[:args.index("--out-dir")] + args[args.index("--out-dir") + 2:]
    script = tmp_path / "twice.py"
    script.write_text(TWICE)
    result = subprocess.run([sys.executable, str(script), str(tmp_path), *args], env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first, second = ((tmp_path / name / "model.safetensors").read_bytes() for name in ("first", "second"))
    assert first == second
