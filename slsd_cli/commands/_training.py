"""What the training commands (`train-teacher`, `distill`) share: flags + overrides -> recipe, and
the closing report. Not a subcommand (the leading underscore keeps it out of the CLI's list)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from slsd_cli.errors import InputError

if TYPE_CHECKING:  # the engine pulls in torch: imported when a command runs, not when the CLI starts
    from slsd_cli.engine.trainer import TrainResult
    from slsd_cli.recipe import Recipe


def check_choice(option: str, value: str | None, choices: Sequence[str]) -> None:
    """A flag limited to `choices` (None: not given)."""
    if value is not None and value not in choices:
        raise InputError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def load_recipe(recipe: str, overrides: Sequence[str], flags: dict[str, Any]) -> Recipe:
    """The recipe `recipe` (file or packaged name) with `key=value` overrides, then the flags that
    were given (`{recipe key: value or None}`, set as typed values): a flag wins over an override."""
    from slsd_cli import recipe as recipes
    from slsd_cli.typed_yaml import apply_flags

    return apply_flags(recipes.load(recipe, list(overrides)), flags)


def trained_line(result: TrainResult) -> str:
    """'N iterations, final loss L, K skipped step(s), R images/s' for a command's last line."""
    from slsd_cli.engine.trainer import summary

    s = summary(result)
    loss = "n/a" if s["final_loss"] is None else f"{s['final_loss']:.4f}"
    return (f"{s['iterations']} iterations, final loss {loss}, {s['skipped_steps']} skipped step(s), "
            f"{s['images_per_s']} images/s")
