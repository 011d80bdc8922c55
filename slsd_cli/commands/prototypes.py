"""`slsd prototypes` (being built)."""


def prototypes() -> None:
    """Not built yet."""
    raise SystemExit("slsd prototypes is not built yet")
