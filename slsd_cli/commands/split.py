"""`slsd split` (being built)."""


def split() -> None:
    """Not built yet."""
    raise SystemExit("slsd split is not built yet")
