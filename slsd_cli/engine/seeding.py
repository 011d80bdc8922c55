"""Seeds of a training run: one user seed, and the seeds derived from it for each random stream.

    sample_seed(seed, *keys)    -> a 63-bit seed for (seed, keys), the same on every machine/process
    seed_everything(seed)       -> torch (all devices), numpy and python seeded with one number

A user seed must lie in [0, 2**32) (`train.seed`'s declared range): a larger one would be folded
onto a smaller one. Keys name the stream a derived seed belongs to (`AUGMENT`, `MODEL`, `STREAM`,
`UNLABELED_STREAM`) followed by a position (stream position, micro-batch index), so no two streams
share a seed.
"""

from __future__ import annotations

import random

import numpy as np
import torch

SEED_LIMIT = 2**32  # seeds and keys are single 32-bit words of a numpy SeedSequence

# keys of the derived seeds, so that augmentation, model randomness and streams never share one
AUGMENT, MODEL, STREAM = 1, 2, 3
UNLABELED_STREAM = 7  # distillation's unlabeled stream (independent of the labeled stream's)


def sample_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from (seed, keys), the same on every machine and process.

    Each of seed and keys must lie in [0, 2**32): a larger number would be split into several
    words by numpy and collide with another (seed, keys) tuple, so it is refused (ValueError)."""
    words = [int(seed), *(int(k) for k in keys)]
    if any(not 0 <= w < SEED_LIMIT for w in words):
        raise ValueError(f"seed and keys must lie in [0, 2**32), got {words}")
    state = np.random.SeedSequence(words).generate_state(2)
    return (int(state[0]) << 31 ^ int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and python with one number."""
    random.seed(seed)
    np.random.seed(seed % SEED_LIMIT)
    torch.manual_seed(seed)
