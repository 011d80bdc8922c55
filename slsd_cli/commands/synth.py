"""`slsd synth` (being built)."""


def synth() -> None:
    """Not built yet."""
    raise SystemExit("slsd synth is not built yet")
