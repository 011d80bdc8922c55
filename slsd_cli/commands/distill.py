"""`slsd distill` (being built)."""


def distill() -> None:
    """Not built yet."""
    raise SystemExit("slsd distill is not built yet")
