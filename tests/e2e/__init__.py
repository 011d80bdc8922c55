"""End-to-end tests: `slsd` commands (and torchrun launches of them) run on generated data."""
