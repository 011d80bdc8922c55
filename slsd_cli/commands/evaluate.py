"""`slsd evaluate` (being built)."""


def evaluate() -> None:
    """Not built yet."""
    raise SystemExit("slsd evaluate is not built yet")
