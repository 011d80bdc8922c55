"""`slsd retrieve` (being built)."""


def retrieve() -> None:
    """Not built yet."""
    raise SystemExit("slsd retrieve is not built yet")
