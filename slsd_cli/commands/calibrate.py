"""`slsd calibrate` (being built)."""


def calibrate() -> None:
    """Not built yet."""
    raise SystemExit("slsd calibrate is not built yet")
