"""The command line as a user meets it (issue 13.6): --version, help that shows recipe defaults and
choices without losing bracketed text, `slsd recipe list|show`, recipe errors as one line with
exit 2 before any work, and the one init/cleanup site of torchrun (`distributed.session`)."""

from __future__ import annotations

import re
import subprocess
import sys

import click
import pytest
import typer
import yaml

from slsd_cli import __version__
from slsd_cli.cli import app, main
from slsd_cli.errors import InputError


def _help(capsys, *command: str) -> str:
    capsys.readouterr()
    assert main([*command, "--help"]) == 0
    return capsys.readouterr().out


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"slsd {__version__}"


@pytest.mark.parametrize("command,flag,needles", [
    (["train-teacher"], "--epsilon", ["smoothing.epsilon", "synthetic_tiny: 0.1", "lvis_eva02_L_teacher: 0.1"]),
    (["train-teacher"], "--gamma", ["smoothing.gamma", "synthetic_tiny: 1.5"]),
    (["train-teacher"], "--smoothing", ["One of: none, uniform, similarity", "lvis_eva02_L_teacher: similarity"]),
    (["train-teacher"], "--iterations", ["synthetic_tiny: 300", "lvis_eva02_L_teacher: 30000"]),
    (["distill"], "--lambda", ["distill.lam", "synthetic_tiny_distill: 2.0"]),
    (["distill"], "--ema", ["lvis_eva02_L_distill: 0.9996"]),
    (["distill"], "--score-threshold", ["distill.threshold", "synthetic_tiny_distill: 0.5"]),
    (["distill"], "--targets", ["One of: onehot, soft"]),
    (["distill"], "--correction-scope", ["One of: all, predicted"]),
    (["distill"], "--checkpoint", ["The teacher: a run dir"]),
])
def test_recipe_backed_flags_show_their_recipe_default(capsys, command, flag, needles):
    text = _squash(_help(capsys, *command))
    assert _squash(flag) in text
    for needle in needles:
        assert _squash(needle) in text, (flag, needle)


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


def test_every_help_text_is_shown_whole(capsys):
    """No markup eats '[...]' (or anything else): each option's help appears verbatim (modulo
    line wrapping) in `--help`, for every command."""
    group = typer.main.get_command(app)
    seen = 0
    for path, command in _commands(group):
        text = _squash(_help(capsys, *path))
        for param in command.params:
            if getattr(param, "hidden", False) or not getattr(param, "help", None):
                continue
            assert _squash(param.help) in text, (path, param.name)
            seen += 1
    assert seen > 50
    assert _squash("(default: each file's run folder") in _squash(_help(capsys, "plot", "reliability"))


def test_hidden_alias_keeps_old_scripts_working(capsys):
    text = _help(capsys, "distill")
    assert "--checkpoint" in text and "--teacher " not in text
    # one spelling of a score threshold in every command; the old ones stay as hidden aliases
    assert "--score-threshold" in text and "--threshold " not in text
    predict_help = _help(capsys, "predict")
    assert "--score-threshold" in predict_help and "--score " not in predict_help
    assert "--render-score-threshold" in predict_help and "--render-score " not in predict_help
    plot_help = _help(capsys, "plot", "predictions")
    assert "--score-threshold" in plot_help and "--score " not in plot_help


def test_old_and_new_spelling_of_an_option_must_agree():
    from slsd_cli.commands._options import renamed

    assert renamed(None, 0.3, "--score-threshold", "--score") == 0.3
    assert renamed(0.3, None, "--score-threshold", "--score") == 0.3
    assert renamed(None, None, "--score-threshold", "--score") is None
    with pytest.raises(InputError, match="--score-threshold and --score .* disagree"):
        renamed(0.3, 0.4, "--score-threshold", "--score")


def test_recipe_list_and_show(capsys):
    capsys.readouterr()
    assert main(["recipe", "list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"synthetic_tiny", "synthetic_tiny_distill", "lvis_eva02_L_teacher", "lvis_eva02_L_distill"} <= set(names)
    assert main(["recipe", "show", "synthetic_tiny", "train.lr=1e-4", "smoothing.mode=uniform"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == 1e-4 and shown["smoothing"]["mode"] == "uniform"
    assert shown["model"]["backbone"] == "efficientnet_lite0" and shown["train"]["iterations"] == 300


def test_recipe_show_round_trips(tmp_path, capsys):
    """What `recipe show` prints is a recipe that loads to the same values."""
    from slsd_cli import recipe as recipes

    capsys.readouterr()
    assert main(["recipe", "show", "lvis_eva02_L_teacher"]) == 0
    path = tmp_path / "copy.yaml"
    path.write_text(capsys.readouterr().out)
    assert recipes.load(path) == recipes.load("lvis_eva02_L_teacher")


def test_recipe_commands_do_not_import_torch():
    code = ("import sys; from slsd_cli.cli import main; rc = main(['recipe', 'show', 'synthetic_tiny']); "
            "sys.exit(10 + rc if 'torch' in sys.modules else rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("args,needle", [
    (["train.lr=-1"], "train.lr must lie in (0, inf)"),
    (["data.scale_range=[2, 1]"], "data.scale_range must be [low, high]"),
    (["smoothing.epsilon=nan"], "smoothing.epsilon must be a finite number"),
    (["=3"], "has no key before '='"),
    (["train.lrr=1"], "did you mean train.lr"),
    (["--epsilon", "1.5"], "smoothing.epsilon must lie in [0, 1]"),
    (["--iterations", "0"], "train.iterations must lie in [1, inf)"),
    (["--seed", "4294967296"], "train.seed must lie in [0, 4294967295]"),
], ids=["lr", "scale-range", "nan", "no-key", "unknown", "flag-epsilon", "flag-iterations", "flag-seed"])
def test_recipe_errors_exit_2_in_one_line_before_any_work(tmp_path, capsys, args, needle):
    run = tmp_path / "run"
    overrides = [a for a in args if not a.startswith("--") and not a[0].isdigit()]
    flags = [a for a in args if a not in overrides]
    capsys.readouterr()
    code = main(["train-teacher", "synthetic_tiny", *overrides, "--train-json", str(tmp_path / "train.json"),
                 "--out-dir", str(run), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err
    assert not run.exists(), "nothing is created before the recipe is valid"


def test_recipe_file_errors_name_the_file(tmp_path, capsys):
    for content, needle in ((b"", "empty recipe"), (b"\x00\x01binary", "binary"),
                            (b"train:\n  lr: [1\n", "line 3")):
        path = tmp_path / "r.yaml"
        path.write_bytes(content)
        capsys.readouterr()
        assert main(["recipe", "show", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: ") and needle in err and err.count("\n") == 1, err


def test_distributed_session_cleans_up_what_it_started(monkeypatch):
    """`session()` is the one init/cleanup site: on an error inside, the process group it created is
    destroyed; a group that existed before (a caller's) is left alone."""
    import torch.distributed as dist

    from slsd_cli import distributed

    def init_world_of_one(device="auto", timeout_minutes=30):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return distributed.DistInfo(0, 1, 0, __import__("torch").device("cpu"))

    monkeypatch.setattr(distributed, "init", init_world_of_one)
    with pytest.raises(RuntimeError, match="boom"):
        with distributed.session("cpu") as info:
            assert distributed.is_distributed() and info.world_size == 1
            raise RuntimeError("boom")
    assert not distributed.is_distributed()

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(distributed, "init", lambda *a, **k: distributed.DistInfo(0, 1, 0, None))
        with distributed.session():
            pass
        assert distributed.is_distributed(), "a caller's process group is not destroyed"
    finally:
        dist.destroy_process_group()
