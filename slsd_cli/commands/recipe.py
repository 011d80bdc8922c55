"""`slsd recipe list` / `slsd recipe show NAME|PATH [OVERRIDES]`: the packaged recipes, and a recipe
as it will run (overrides applied, every key shown with its resolved value)."""

from __future__ import annotations

from typing import List, Optional

import typer

app = typer.Typer(help="Training recipes: list the packaged ones, print one resolved.", no_args_is_help=True,
                  rich_markup_mode=None)


@app.command("list")
def list_recipes() -> None:
    """The packaged recipes (usable by name in train-teacher / distill), one line each, on stdout.

    Example: slsd recipe list
    """
    from slsd_cli.recipe import describe_packaged

    for name, summary in describe_packaged():
        typer.echo(f"{name:<26} {summary}")


@app.command("show")
def show(
    recipe: str = typer.Argument(..., help="Recipe yaml, or a packaged recipe name (see `slsd recipe list`)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Overrides key.sub=value, as train-teacher takes them."),
) -> None:
    """Print the resolved recipe as yaml on stdout: every key, after overrides, ranges checked.

    Example: slsd recipe show synthetic_tiny train.lr=1e-4 > my_recipe.yaml
    """
    from slsd_cli import recipe as recipes
    from slsd_cli.typed_yaml import dump_recipe

    resolved = recipes.load(recipe, list(overrides or []))
    typer.echo(f"# {recipes.resolve_path(recipe)}" + (f" with {' '.join(overrides)}" if overrides else ""))
    typer.echo(dump_recipe(resolved), nl=False)
