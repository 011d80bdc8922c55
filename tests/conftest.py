"""Fixtures shared across the suite.

- `pytest_configure`: under pytest-xdist, each worker's torch threads are its share of the cores.
- `one_thread`: one torch intra-op thread for a test module. The suite runs on few shared cores,
  where two spinning OpenMP threads per process slow everything down, and one thread gives the same
  float reductions as the torchrun workers the tests launch with OMP_NUM_THREADS=1. Module-scoped,
  so a module that lists it in `pytestmark` also has its module-scoped fixtures built under it.
- `synth_data`: the embedded synthetic benchmark (`slsd synth`), generated once per test run for
  each set of sizes and shared read-only by every module that asks for the same sizes; a test that
  needs derived files writes them into its own tmp dir (see `tests.helpers.synth`).
- `tiny_synth`: the small set most end-to-end tests run on (3 classes, 5 val, 8 pool, 64 px)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n`, the README's test command) the workers share the cores: each gets
    cores / workers torch threads instead of every core (2 workers x 2 threads on 2 cores spin
    against each other)."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Callable[..., Path]:
    """`synth_data(classes=..., train_images=..., val_images=..., pool_images=..., image_size=..., seed=...)`
    -> the folder `slsd synth` writes (train/val/pool json, images/), made once per test run."""
    from slsd_cli.data.synthetic import generate

    made: dict[tuple, Path] = {}

    def get(classes: int, train_images: int, val_images: int, pool_images: int, image_size: int = 64,
            seed: int = 0) -> Path:
        key = (classes, train_images, val_images, pool_images, image_size, seed)
        if key not in made:
            out = tmp_path_factory.mktemp("synth") / "data"
            generate(out, classes=classes, train_images=train_images, val_images=val_images,
                     pool_images=pool_images, image_size=image_size, seed=seed)
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_synth(synth_data) -> Path:
    return synth_data(classes=3, train_images=255, val_images=5, pool_images=8, image_size=64, seed=0)
