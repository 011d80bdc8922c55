"""What the training commands (`train-teacher`, `distill`) share: flags + overrides -> recipe, and
the closing report. Not a subcommand (the leading underscore keeps it out of the CLI's list)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from slsd_cli.errors import InputError

if TYPE_CHECKING:  # the engine pulls in torch: imported when a command runs, not when the CLI starts
    from slsd_cli.engine.trainer import TrainResult
    from slsd_cli.recipe import Recipe


def check_choice(option: str, value: str | None, choices: Sequence[str]) -> None:
    """A flag limited to `choices` (None: not given)."""
    if value is not None and value not in choices:
        raise InputError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def _yaml_value(value: Any) -> str:
    """A flag value as yaml text for an override (a path stays a string, even '1e-4' or 'null')."""
    if isinstance(value, Path):
        return json.dumps(str(value))
    return str(value)


def load_recipe(recipe: str, overrides: Sequence[str], flags: dict[str, Any]) -> Recipe:
    """The recipe `recipe` (file or packaged name) with `key=value` overrides, then the flags that
    were given (`{recipe key: value or None}`, in that order): a flag wins over an override."""
    from slsd_cli import recipe as recipes

    items = list(overrides)
    items += [f"{key}={_yaml_value(value)}" for key, value in flags.items() if value is not None]
    return recipes.load(recipe, items)


def trained_line(result: TrainResult) -> str:
    """'N iterations, final loss L, K skipped step(s), R images/s' for a command's last line."""
    from slsd_cli.engine.trainer import summary

    s = summary(result)
    loss = "n/a" if s["final_loss"] is None else f"{s['final_loss']:.4f}"
    return (f"{s['iterations']} iterations, final loss {loss}, {s['skipped_steps']} skipped step(s), "
            f"{s['images_per_s']} images/s")
