"""Hostile inputs (issue 24): what a downloaded dataset, a careless recipe or a shared folder throws
at slsd. Every case ends the same way as a bad input of issue 12: exit code 2, exactly one `error:`
line naming the file and the record (or the option), no traceback, nothing new left on disk.

Classes: 1 paths (image file names stay inside --images; control characters never split the line),
2 recipes (yaml aliases / anchors, duplicate keys, integers beyond 64 bits, `eval:` checked at load),
3 leftovers of the first set (NaN `info`, pool ids beyond int64, a pickle as --checkpoint, categories
missing, a relative --out on a read-only file system), 4 validation before the first write (no new
folder after a failed start; the demo's one line). The signal and lock machinery's own units close
the file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from slsd_cli.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

BIG = 2 ** 70


class World:
    def __init__(self, root: Path, synth: Path, model: Path):
        self.root, self.synth, self.model = root, synth, model
        self.val, self.images = synth / "val.json", synth / "images"
        self.data = json.loads(self.val.read_text())

    def annotations(self, name: str, edit: Callable[[dict], None]) -> Path:
        """A copy of val.json changed by `edit`."""
        data = json.loads(json.dumps(self.data))
        edit(data)
        path = self.root / "bad" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(data))
        return path

    def text(self, name: str, text: str) -> Path:
        path = self.root / "bad" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return path


@pytest.fixture(scope="module")
def world(tiny_synth, tmp_path_factory, one_thread) -> World:
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.model import build_detector, save_detector, tiny_eva_config

    root = tmp_path_factory.mktemp("hostile")
    categories = load_annotations(tiny_synth / "val.json").categories
    torch.manual_seed(0)
    cfg = tiny_eva_config(image_size=64, test_score_threshold=0.0, max_detections=20, rpn_post_nms_topk_test=32)
    save_detector(build_detector(cfg, categories), root / "model", categories, cfg)
    return World(root, tiny_synth, root / "model")


def _name(index: int, value) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["images"][index]["file_name"] = value
    return edit


def _no_name(index: int) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["images"][index].pop("file_name")
        data["images"][index]["coco_url"] = "http://images.cocodataset.org/val2017/.."
    return edit


@dataclass
class Case:
    id: str
    klass: int
    build: Callable[[World, Path], tuple[list[str], str]]  # (arguments, what the line must name)
    words: str = ""        # in the error line
    record: str = ""       # the record named, for files of records


def _ann(edit: Callable[[dict], None], name: str, command: str) -> Callable[[World, Path], tuple[list[str], str]]:
    """A command over a changed copy of val.json (named in the line)."""
    def build(w: World, out: Path):
        path = w.annotations(name, edit)
        args = {
            "split": ["split", str(path), "--out-dir", str(out / "split")],
            "eval": ["eval", "--annotations", str(path), "--checkpoint", str(w.model), "--images", str(w.images),
                     "--out-dir", str(out / "eval")],
            "prototypes": ["prototypes", "--annotations", str(path), "--images", str(w.images), "--backbone",
                           "resnet18", "--random-init", "--image-size", "64", "--out", str(out / "p.safetensors")],
            "train-teacher": ["train-teacher", "synthetic_tiny", "data.image_size=64", "model.image_size=64",
                              "--train-json", str(path), "--images", str(w.images), "--out-dir", str(out / "run"),
                              "--iterations", "1"],
            "retrieve": ["retrieve", "--annotations", str(w.val), "--images", str(w.images), "--pool", str(path),
                         "--pool-images", str(w.images), "--embedder", "colorhist", "--workers", "0",
                         "--out", str(out / "unlabeled.json")],
            "plot": ["plot", "predictions", str(w.root / "dets.json"), "--images", str(w.images), "--annotations",
                     str(path), "--out", str(out / "fig")],
        }[command]
        return args, path.name
    return build


def _recipe(text: str, name: str, *overrides: str) -> Callable[[World, Path], tuple[list[str], str]]:
    def build(w: World, out: Path):
        path = w.text(name, text)
        return ["recipe", "show", str(path), *overrides], name
    return build


def _override(*overrides: str) -> Callable[[World, Path], tuple[list[str], str]]:
    def build(w: World, out: Path):
        return ["recipe", "show", "synthetic_tiny", *overrides], overrides[-1].split("=")[0]
    return build


BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


CASES = [
    # ------------------------------------------------------------------ 1 paths
    Case("name-dotdot-eval", 1, _ann(_name(0, "../../../etc/passwd"), "dotdot", "eval"),
         "leads out of the image folder", "images[0]"),
    Case("name-absolute-prototypes", 1, _ann(_name(1, "/etc/hostname"), "absolute", "prototypes"),
         "absolute path", "images[1]"),
    Case("name-dotdot-train-teacher", 1, _ann(_name(0, "sub/../../x.png"), "dotdot_t", "train-teacher"),
         "leads out of the image folder", "images[0]"),
    Case("name-dotdot-pool-retrieve", 1, _ann(_name(2, "../val_000000.png"), "pool_dotdot", "retrieve"),
         "leads out of the image folder", "images[2]"),
    Case("name-absolute-plot", 1, _ann(_name(0, "/tmp/x.png"), "absolute_p", "plot"), "absolute path", "images[0]"),
    Case("name-empty", 1, _ann(_name(0, ""), "empty", "split"), "file_name is empty", "images[0]"),
    Case("name-null", 1, _ann(_name(1, None), "null", "split"), "file_name is null", "images[1]"),
    Case("name-number", 1, _ann(_name(1, 7), "number", "split"), "file_name must be a string", "images[1]"),
    Case("name-newline-one-line", 1, _ann(_name(0, "val\nerror: injected.png"), "newline", "eval"),
         "'val\\nerror: injected.png' holds a control character", "images[0]"),
    Case("name-escape-sequence", 1, _ann(_name(0, "val\x1b[2J.png"), "escape", "split"),
         "control character", "images[0]"),
    Case("name-coco-url-dotdot", 1, _ann(_no_name(0), "url_dotdot", "split"), "leads out", "images[0]"),
    Case("name-windows-absolute", 1, _ann(_name(0, "C:\\Windows\\x.png"), "drive", "split"), "absolute path",
         "images[0]"),
    # ------------------------------------------------------------------ 2 recipes
    Case("yaml-billion-laughs", 2, _recipe(BOMB, "bomb.yaml"), "anchors and aliases"),
    Case("yaml-alias-in-a-valid-key", 2, _recipe("model:\n  anchor_sizes: &s [16, 32]\n  anchor_ratios: *s\n",
                                                 "alias.yaml"), "anchors and aliases"),
    Case("yaml-anchor-in-override", 2, _override("train.iterations=&n 5"), "anchors and aliases"),
    Case("yaml-duplicate-section", 2, _recipe("train:\n  lr: 0.1\ntrain:\n  lr: 0.2\n", "dup_section.yaml"),
         "duplicate key 'train' (first at line 1)"),
    Case("yaml-duplicate-key", 2, _recipe("train:\n  lr: 0.1\n  iterations: 3\n  lr: 0.2\n", "dup_key.yaml"),
         "line 4, column 3: duplicate key 'lr'"),
    Case("yaml-5000-digit-integer", 2, _recipe("train:\n  iterations: " + "9" * 5000 + "\n", "digits.yaml"),
         "integer of 5000 digits is beyond 64 bits"),
    Case("yaml-integer-beyond-int64", 2, _recipe("train:\n  seed: 18446744073709551616\n", "int64.yaml"),
         "beyond 64 bits"),
    Case("yaml-5000-digit-override", 2, _override("train.iterations=" + "7" * 5000), "5000 digits"),
    Case("yaml-hex-beyond-int64", 2, _override("train.iterations=0x1" + "0" * 20), "beyond 64 bits"),
    Case("eval-metric-unknown-at-load", 2, _recipe("eval:\n  metric: segm/APx\n", "metric.yaml"),
         "eval.metric must be bbox/<key> or segm/<key>"),
    Case("eval-metric-override-case", 2, _override("eval.metric=segm/apr"), "eval.metric"),
    Case("eval-metric-recall-of-other-max-dets", 2, _override("eval.metric=bbox/AR@100"), "AR@300"),
    # ------------------------------------------------------------------ 3 leftovers of the first set
    Case("split-info-nan", 3, _ann(lambda d: d.update(info={"year": float("nan")}), "info_nan", "split"),
         "non-finite number", "info"),
    Case("split-info-not-object", 3, _ann(lambda d: d.update(info=[1, 2]), "info_list", "split"),
         "info must be an object", "info"),
    Case("retrieve-pool-id-beyond-int64", 3, _ann(lambda d: d["images"][0].update(id=BIG), "pool_big", "retrieve"),
         "does not fit in 64 bits", "images[0]"),
    Case("eval-checkpoint-pickle-named", 3, lambda w, o: (
        ["eval", "--annotations", str(w.val), "--checkpoint", str(w.root / "weights.pth"), "--images",
         str(w.images), "--out-dir", str(o / "eval")], "weights.pth"), "not a safetensors file"),
    Case("predict-checkpoint-pickle-named", 3, lambda w, o: (
        ["predict", "--checkpoint", str(w.root / "weights.pth"), str(w.images / "val_*.png"), "--out",
         str(o / "r.json")], "weights.pth"), "not a safetensors file"),
    Case("convert-annotations-without-categories", 3, lambda w, o: (
        ["convert", str(w.root / "weights.pth"), "--annotations",
         str(w.text("nocats.json", json.dumps({"images": [], "categories": []}))), "--out-dir", str(o / "cv")],
        "nocats.json"), "lists no categories"),
    # ------------------------------------------------------------------ 4 validation before the first write
    Case("failed-split-leaves-no-new-folders", 4, _ann(_name(0, ""), "empty2", "split"), "file_name is empty"),
    Case("failed-convert-leaves-no-folder", 4, lambda w, o: (
        ["convert", str(w.text("garbage.pth", "not a checkpoint")), "--annotations", str(w.val), "--out-dir",
         str(o / "deep" / "cv")], "garbage.pth"), "unreadable checkpoint"),
    Case("failed-eval-leaves-no-folder", 4, lambda w, o: (
        ["eval", "--annotations", str(w.val), "--detections", str(w.text("dets_bad.json", "[{")), "--out-dir",
         str(o / "a" / "b")], "dets_bad.json"), "malformed json"),
    Case("demo-too-few-val-images", 4, lambda w, o: (["demo", "--out-dir", str(o / "demo"), "--val-images", "3"],
                                                     "--val-images"), "too few"),
    Case("demo-too-few-train-images", 4, lambda w, o: (["demo", "--out-dir", str(o / "demo"), "--train-images", "3"],
                                                       "--train-images"), "too few"),
]


@pytest.fixture(scope="module")
def prepared(world: World) -> World:
    import pickle

    (world.root / "weights.pth").write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}))
    (world.root / "dets.json").write_text("[]")
    return world


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(prepared: World, tmp_path: Path, capsys, case: Case):
    out = tmp_path / "out"
    args, named = case.build(prepared, out)
    started = time.monotonic()
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and len(err.strip().splitlines()) == len(lines) + err.count("demo: "), err
    assert named in lines[0] and case.words in lines[0] and case.record in lines[0], lines[0]
    assert not out.exists(), f"left behind: {sorted(str(p) for p in out.rglob('*'))}"
    assert time.monotonic() - started < 30  # refused before any work (the yaml bomb does not expand)


def test_case_counts():
    assert len(CASES) >= 30 and {c.klass for c in CASES} == {1, 2, 3, 4}
    assert len({c.id for c in CASES}) == len(CASES)


def test_symlinked_folder_inside_images_keeps_working(prepared: World, tmp_path: Path):
    """Names resolve lexically under --images: a folder inside it may be a link to elsewhere."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "linked").symlink_to(prepared.images, target_is_directory=True)

    def under_link(data: dict) -> None:
        for image in data["images"]:
            image["file_name"] = "linked/" + image["file_name"]

    annotations = prepared.annotations("linked", under_link)
    assert main(["eval", "--annotations", str(annotations), "--checkpoint", str(prepared.model), "--images",
                 str(images), "--out-dir", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "metrics.json").is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
def test_relative_out_on_a_read_only_file_system_is_one_line(prepared: World, tmp_path: Path, capsys, monkeypatch):
    """calibrate --out relative to the working folder: tempfile names the temporary by its absolute
    path, which the writer's mapping must still recognise as the output's."""
    from slsd_cli.io import locks

    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (prepared.root / "dets.json").write_text("[]")
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(locks, "acquire", lambda output: None)  # the writer's own mapping, not the lock's
        code = main(["calibrate", "--annotations", str(prepared.val), "--detections", str(prepared.root / "dets.json"),
                     "--out", "ro/calibration.json"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
        assert "ro/calibration.json" in err and "read-only" in err
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_a_planted_staging_link_is_never_followed(prepared: World, tmp_path: Path):
    """A link someone left where a multi-file output stages its files: removed, never written through."""
    out, victim = tmp_path / "split", tmp_path / "victim"
    out.mkdir()
    victim.mkdir()
    (out / ".train.json.set.tmp").symlink_to(victim, target_is_directory=True)
    assert main(["split", str(prepared.val), "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["holdout.json", "train.json"] and list(victim.iterdir()) == []


def test_appends_never_follow_a_link(tmp_path: Path):
    from slsd_cli.errors import InputError
    from slsd_cli.io import append_text

    outside = tmp_path / "outside.txt"
    outside.write_text("kept\n")
    (tmp_path / "log.txt").symlink_to(outside)
    with pytest.raises(InputError, match="symbolic link"):
        append_text(tmp_path / "log.txt", "a line\n")
    assert outside.read_text() == "kept\n"


def test_one_line_whatever_the_message_holds():
    from slsd_cli.errors import InputError

    line = InputError("bad\r\nvalue", path="a\nb.json", record="images[0]\t").format()
    assert "\n" not in line and "\r" not in line and line == "a\\nb.json: images[0]\\t: bad\\r\\nvalue"


# ------------------------------------------------------------------ the signal rule's units


def test_interrupted_exit_codes_and_line():
    from slsd_cli.interrupts import Interrupted

    assert Interrupted(signal.SIGINT).exit_code == 130 and Interrupted(signal.SIGTERM).exit_code == 143
    assert Interrupted(signal.SIGTERM, "saved").line() == "interrupted by SIGTERM: saved"


def test_polled_and_deferred_sections():
    from slsd_cli import interrupts

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with interrupts.handling():
        with interrupts.polled():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert interrupts.pending() == signal.SIGTERM  # recorded, not raised
            os.kill(os.getpid(), signal.SIGINT)  # on top of a pending SIGTERM: no change
            time.sleep(0.01)
            assert interrupts.take() == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            with pytest.raises(interrupts.Interrupted) as second:  # a second Ctrl-C stops at once
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
            assert second.value.exit_code == 130
        with pytest.raises(interrupts.Interrupted) as deferred:
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
                finished = True  # the section is not cut
        assert finished and deferred.value.exit_code == 143
        with pytest.raises(interrupts.Interrupted):  # outside the sections: at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers given back


class _Slow(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 200

    def __getitem__(self, i: int) -> int:
        time.sleep(0.005)
        return i


def test_dataloader_workers_outlive_signals_not_sent_by_their_parent():
    """A Ctrl-C to the process group or SLURM's SIGTERM to every process reaches the workers too:
    they keep feeding the parent, which stops at its safe point and shuts them down."""
    from slsd_cli import interrupts

    loader = torch.utils.data.DataLoader(_Slow(), num_workers=1, worker_init_fn=interrupts.worker_init)
    with interrupts.handling(), interrupts.polled():
        batches = iter(loader)
        next(batches)
        (worker,) = [w.pid for w in batches._workers]
        subprocess.run(["kill", "-TERM", str(worker)], check=True)  # sent by another process
        subprocess.run(["kill", "-INT", str(worker)], check=True)
        received = [int(x) for _, x in zip(range(100), batches)]
        assert received == list(range(1, 101))  # every batch still arrives
        del batches
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]
