"""`slsd train_teacher` (being built)."""


def train_teacher() -> None:
    """Not built yet."""
    raise SystemExit("slsd train_teacher is not built yet")
