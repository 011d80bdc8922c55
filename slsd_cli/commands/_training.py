"""What the training commands (`train-teacher`, `distill`) share: the closing report. Not a
subcommand (the leading underscore keeps it out of the CLI's list)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine pulls in torch: imported when a command runs, not when the CLI starts
    from slsd_cli.engine.trainer import TrainResult


def trained_line(result: TrainResult) -> str:
    """'N iterations, final loss L, K skipped step(s), R images/s' for a command's last line."""
    from slsd_cli.engine.trainer import summary

    s = summary(result)
    loss = "n/a" if s["final_loss"] is None else f"{s['final_loss']:.4f}"
    return (f"{s['iterations']} iterations, final loss {loss}, {s['skipped_steps']} skipped step(s), "
            f"{s['images_per_s']} images/s")
