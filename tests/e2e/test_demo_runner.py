"""The demo's step runner with --jobs 2: queued steps run in child processes and give the same files
as in this process; a step is waited for by its output; a failing child is one error naming its log;
finished steps are skipped; children still running are stopped on close."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from slsd_cli.cli import main
from slsd_cli.demo.runner import Runner
from slsd_cli.errors import InputError


def _synth(out: Path, seed: int) -> list[str]:
    return ["synth", str(out), "--classes", "3", "--train-images", "255", "--val-images", "15", "--pool-images", "2",
            "--image-size", "32", "--seed", str(seed)]  # the smallest synth allowed: under a second


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_children_match_this_process_and_are_waited_for_by_output(tmp_path):
    here = Runner(tmp_path / "here", main, jobs=1)
    (tmp_path / "here").mkdir()
    here.run("synth a", _synth(tmp_path / "here" / "a", 1), tmp_path / "here" / "a" / "classes.json")

    out = tmp_path / "jobs"
    out.mkdir()
    runner = Runner(out, main, jobs=2)
    assert runner.threads >= 1
    markers = [out / name / "classes.json" for name in ("a", "b", "c")]
    for seed, marker in zip((1, 2, 3), markers):
        runner.submit(f"synth {marker.parent.name}", _synth(marker.parent, seed), marker)
    assert len(runner._running) == 2 and len(runner._queue) == 1  # two at a time
    runner.wait(markers[2])  # the queued one first in line, then waited for
    assert markers[2].exists()
    runner.run("synth a", _synth(markers[0].parent, 1), markers[0])  # submitted before: waited for, not rerun
    runner.wait(markers[1])
    assert all(m.exists() for m in markers)
    assert _digest(out / "a") == _digest(tmp_path / "here" / "a")  # a child writes what this process writes
    assert [s.name for s in runner.steps] == ["synth a", "synth b", "synth c"]  # each listed once
    timings = json.loads((out / "step_seconds.json").read_text())
    assert len(timings) == 3 and all(v > 0 for v in timings.values())
    assert (out / "logs" / "synth_a.log").exists()

    again = Runner(out, main, jobs=2)  # a rerun skips finished steps and keeps their recorded time
    again.submit("synth b", _synth(markers[1].parent, 2), markers[1])
    assert again.steps[0].skipped and again.steps[0].seconds == timings[" ".join(_synth(markers[1].parent, 2))]
    assert not again._queue and not again._running


def test_a_failing_child_is_one_error_naming_its_log(tmp_path):
    runner = Runner(tmp_path, main, jobs=2)
    bad = ["synth", str(tmp_path / "bad"), "--classes", "1"]  # below the 3-class minimum: exit 2
    runner.submit("synth bad", bad, tmp_path / "bad" / "classes.json")
    with pytest.raises(InputError, match=r"step 'synth bad' failed with exit code 2 .*synth_bad\.log"):
        runner.wait(tmp_path / "bad" / "classes.json")
    assert "classes" in (tmp_path / "logs" / "synth_bad.log").read_text()
    runner.close()


def test_close_stops_running_children(tmp_path):
    runner = Runner(tmp_path, main, jobs=2)
    for name in ("x", "y", "z"):
        runner.submit(f"synth {name}", _synth(tmp_path / name, 0), tmp_path / name / "classes.json")
    processes = [job.process for job in runner._running]
    runner.close()
    assert all(p.poll() is not None for p in processes) and not runner._queue and not runner._running
