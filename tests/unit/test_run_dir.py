"""slsd_cli.run_dir: the run-directory rules both training phases share (refuse, clear, resume)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slsd_cli import run_dir as runs
from slsd_cli.distributed import DistInfo
from slsd_cli.errors import InputError
from slsd_cli.recipe import Recipe

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
OUTPUTS = runs.DISTILL_OUTPUTS


def _old_run(run_dir: Path) -> None:
    (run_dir / "ckpt").mkdir(parents=True)
    (run_dir / "ckpt" / "last.pt").write_bytes(b"x")
    (run_dir / "teacher").mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")
    (run_dir / "notes.txt").write_text("mine")


def test_existing_run_needs_resume_or_force(tmp_path: Path):
    runs.check_on_main(tmp_path / "new", OUTPUTS, False, False, CPU)  # nothing there: fine
    _old_run(tmp_path)
    with pytest.raises(InputError, match="--resume") as err:
        runs.check_on_main(tmp_path, OUTPUTS, False, False, CPU)
    assert "metrics.jsonl" in str(err.value) and "teacher" in str(err.value)
    runs.check_on_main(tmp_path, OUTPUTS, True, False, CPU)
    runs.check_on_main(tmp_path, OUTPUTS, False, True, CPU)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        runs.check_is_dir(tmp_path / "file")
    runs.check_is_dir(tmp_path)


def test_prepare_clears_only_run_outputs_unless_resuming(tmp_path: Path):
    _old_run(tmp_path)
    assert runs.prepare(tmp_path, OUTPUTS, True, Recipe(), CPU) is True
    assert (tmp_path / "ckpt" / "last.pt").is_file() and (tmp_path / "recipe.yaml").is_file()

    assert runs.prepare(tmp_path, OUTPUTS, False, Recipe(), CPU) is False
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "teacher").exists()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "recipe.yaml").is_file()

    fresh = tmp_path / "a" / "b"
    assert runs.prepare(fresh, OUTPUTS, True, Recipe(), CPU) is False  # --resume without a checkpoint starts
    assert (fresh / "recipe.yaml").is_file()


def test_layout_names_every_output_and_orders_periodic_checkpoints(tmp_path: Path):
    assert runs.last_checkpoint(tmp_path) == tmp_path / "ckpt" / "last.pt"
    assert runs.teacher_dir(tmp_path) == tmp_path / "teacher" and runs.best_dir(tmp_path) == tmp_path / "best"
    # a replaced run (--force) loses all of these, and an existing one of them needs --resume / --force
    assert {"log.txt", "eval.jsonl", "best", "tensorboard", "metrics.jsonl", "ckpt"} <= set(runs.RUN_OUTPUTS)
    (tmp_path / "ckpt").mkdir()
    for iteration in (1000, 20, 300):
        runs.periodic_checkpoint(tmp_path, iteration).write_bytes(b"")
    (tmp_path / "ckpt" / "iter_notes.pt").write_bytes(b"")  # not a periodic checkpoint
    assert runs.periodic_checkpoint(tmp_path, 20).name == "iter_0000020.pt"
    assert [i for i, _ in runs.periodic_checkpoints(tmp_path)] == [20, 300, 1000]
    (tmp_path / "log.txt").write_text("old\n")
    (tmp_path / "best").mkdir()
    assert runs.prepare(tmp_path, runs.RUN_OUTPUTS, False, Recipe(), CPU) is False
    assert not (tmp_path / "log.txt").exists() and not (tmp_path / "best").exists()
