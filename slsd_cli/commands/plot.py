"""`slsd plot` (being built)."""

import typer

app = typer.Typer(help="Figures.")


@app.command("reliability")
def reliability() -> None:
    raise SystemExit("not built yet")
