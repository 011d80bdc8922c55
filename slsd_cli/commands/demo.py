"""`slsd demo` (being built)."""


def demo() -> None:
    """Not built yet."""
    raise SystemExit("slsd demo is not built yet")
