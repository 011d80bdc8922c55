"""The `slsd` command line: a thin Typer app. Each subcommand lives in `slsd_cli/commands/` as a
small function that parses options and calls the library; no logic lives here."""

from __future__ import annotations

import os
import re
import sys

import click
import typer

try:  # typer >= 0.20 ships its own copy of click; older releases use click itself
    from typer._click import exceptions as _click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as _click_exceptions

_USAGE_ERRORS = tuple({click.ClickException, _click_exceptions.ClickException})
_EXITS = tuple({click.exceptions.Exit, typer.Exit})
_ABORTS = tuple({click.exceptions.Abort, typer.Abort})

from slsd_cli.commands import calibrate as _calibrate
from slsd_cli.commands import convert as _convert
from slsd_cli.commands import demo as _demo
from slsd_cli.commands import distill as _distill
from slsd_cli.commands import evaluate as _evaluate
from slsd_cli.commands import plot as _plot
from slsd_cli.commands import predict as _predict
from slsd_cli.commands import prototypes as _prototypes
from slsd_cli.commands import recipe as _recipe
from slsd_cli.commands import retrieve as _retrieve
from slsd_cli.commands import split as _split
from slsd_cli.commands import synth as _synth
from slsd_cli.commands import train_teacher as _train_teacher
from slsd_cli import interrupts
from slsd_cli.errors import InputError

app = typer.Typer(
    name="slsd",
    help="Semi-supervised instance segmentation for the long tail (Porcher et al.). "
    "Run `slsd demo` for the whole pipeline on the embedded benchmark.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)

def _print_version(value: bool) -> None:
    if value:
        from slsd_cli import __version__

        typer.echo(f"slsd {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors (read by `main`)."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
) -> None:
    """Options for every command (`--debug` is acted on in `main`, before the command runs)."""


app.command("synth")(_synth.synth)
app.command("split")(_split.split)
app.command("retrieve")(_retrieve.retrieve)
app.command("prototypes")(_prototypes.prototypes)
app.command("train-teacher", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})(
    _train_teacher.train_teacher)
app.command("calibrate")(_calibrate.calibrate)
app.command("distill", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})(
    _distill.distill)
app.command("eval")(_evaluate.evaluate)
app.command("predict")(_predict.predict)
app.command("convert")(_convert.convert)
app.add_typer(_plot.app, name="plot")
app.add_typer(_recipe.app, name="recipe")
app.command("demo")(_demo.demo)


def _first_sentence(doc: str, limit: int = 100) -> str:
    """The first sentence of a docstring's first paragraph, for `slsd --help` (click's own cut stops at
    the first '. ', e.g. inside '(Eq. 4)')."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.search(r"(?<!Eq)(?<!e\.g)(?<!i\.e)\.(\s|$)", paragraph)
    sentence = paragraph[:match.start() + 1] if match else paragraph
    return sentence if len(sentence) <= limit else sentence[:limit - 3].rsplit(" ", 1)[0] + "..."


for _info in app.registered_commands:
    if _info.short_help is None and _info.callback is not None and _info.callback.__doc__:
        _info.short_help = _first_sentence(_info.callback.__doc__)
for _group in app.registered_groups:  # plot, recipe: their Typer(help=...) text
    if isinstance(_group.typer_instance.info.help, str):
        _group.short_help = _first_sentence(_group.typer_instance.info.help)


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input ends with one line on stderr and exit code 2; SIGINT / SIGTERM end the
    command at a safe point with one line and exit code 130 / 143 (`slsd_cli.interrupts`). While it
    runs, its outputs are locked (`io.locks`); a command that fails leaves no new empty folder."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    with interrupts.handling():
        try:
            return _run(args, debug)
        except interrupts.Interrupted as exc:
            if interrupts.nested():  # a step of the demo: the demo stops too
                raise
            if debug:
                import traceback

                traceback.print_exc()
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops alike: rank 0 says so
                print(f"error: {exc.line()}", file=sys.stderr)
            return exc.exit_code


def _run(args: list[str], debug: bool) -> int:
    from slsd_cli.io import locks, new_dirs_removed_on_error

    try:
        with new_dirs_removed_on_error(), locks.scope():
            # `obj`: what a command that runs other commands (the demo) needs, so it never imports this module
            result = app(args=args, prog_name="slsd", standalone_mode=False, obj={"run_command": _run_step})
    except InputError as exc:
        if debug or _raise_errors:
            raise
        print(f"error: {exc.format()}", file=sys.stderr)
        return 2
    except _EXITS as exc:
        return exc.exit_code
    except _USAGE_ERRORS as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `slsd` alone: help was shown
            exc.show()
            return 0
        exc.show()
        return exc.exit_code
    except _ABORTS:
        print("aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # SIGINT outside `interrupts.handling` (a thread other than the main one)
        print("error: interrupted by SIGINT", file=sys.stderr)
        return 130
    if not interrupts.nested() and interrupts.pending() is not None:  # came in the last quiet section
        raise interrupts.Interrupted(interrupts.take(), "the command had finished; its outputs are complete")
    return result if isinstance(result, int) else 0


_raise_errors: list[bool] = []


def _run_step(argv: list[str]) -> int:
    """A step of the demo, run in this process: `main`, except that bad input propagates as the
    InputError (the demo reports it as its one error line) instead of being printed here."""
    _raise_errors.append(True)
    try:
        return main(argv)
    finally:
        _raise_errors.pop()


if __name__ == "__main__":
    sys.exit(main())
