"""Repeat factors against hand-computed values; RepeatFactorSampler determinism, shards, resume."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from slsd_cli.data.lvis import load_annotations
from slsd_cli.data.sampling import RepeatFactorSampler, repeat_factors


@pytest.fixture(scope="module")
def ten_images(tmp_path_factory):
    """10 images; class 1 ("A") in image 0, class 2 ("B") in images 1-4, class 3 ("C") in images
    0-3 and 5-8 (two instances in image 5), image 9 empty."""
    classes = {0: [1, 3], 1: [2, 3], 2: [2, 3], 3: [2, 3], 4: [2], 5: [3, 3], 6: [3], 7: [3], 8: [3], 9: []}
    images = [{"id": 10 + i, "file_name": f"{i}.png", "width": 20, "height": 20} for i in range(10)]
    anns = []
    for i, cats in classes.items():
        for c in cats:
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": c, "bbox": [2, 2, 5, 5],
                         "segmentation": [[2, 2, 7, 2, 7, 7, 2, 7]], "iscrowd": 0})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": n} for c, n in ((1, "A"), (2, "B"), (3, "C"))]}
    path = tmp_path_factory.mktemp("rfs") / "ten.json"
    path.write_text(json.dumps(data))
    return load_annotations(path)


def test_repeat_factors_by_hand(ten_images):
    # t = 0.5: f_A = 1/10 -> sqrt(5); f_B = 4/10 -> sqrt(1.25); f_C = 8/10 -> 1 (max with 1)
    r = repeat_factors(ten_images, threshold=0.5)
    a, b = math.sqrt(5.0), math.sqrt(1.25)
    assert r.tolist() == pytest.approx([a, b, b, b, b, 1, 1, 1, 1, 1])
    # LVIS default threshold: every class is in more than 0.1% of images -> all 1
    assert repeat_factors(ten_images).tolist() == [1.0] * 10
    # a subset recounts frequencies over its own images, in the given order:
    # images 0-4: f_A = 1/5 -> sqrt(2.5); f_B = 4/5 and f_C = 4/5 -> 1
    sub = repeat_factors(ten_images, threshold=0.5, image_ids=[14, 10, 11, 12, 13])
    assert sub.tolist() == pytest.approx([1, math.sqrt(2.5), 1, 1, 1])


def test_stochastic_rounding_per_epoch():
    factors = torch.tensor([2.0, 1.0, 1.5, 0.25])
    sampler = RepeatFactorSampler(factors, seed=3)
    totals = torch.zeros(4)
    epochs = 400
    for e in range(epochs):
        counts = torch.bincount(sampler.epoch_indices(e), minlength=4)
        assert counts[0] == 2 and counts[1] == 1 and counts[2] in (1, 2) and counts[3] in (0, 1)
        totals += counts
    assert (totals / epochs).tolist() == pytest.approx([2.0, 1.0, 1.5, 0.25], abs=0.08)


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_deterministic_and_seeded():
    factors = torch.tensor([1.0, 3.2, 1.0, 1.7, 1.0, 2.5])
    a = _take(RepeatFactorSampler(factors, seed=11), 200)
    assert a == _take(RepeatFactorSampler(factors, seed=11), 200)
    assert a != _take(RepeatFactorSampler(factors, seed=12), 200)
    assert set(a) == set(range(6))
    ordered = _take(RepeatFactorSampler(torch.ones(5), seed=0, shuffle=False), 12)
    assert ordered == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shards_are_disjoint_and_cover_the_stream(world_size):
    factors = torch.tensor([1.0, 2.6, 1.0, 1.3, 4.0, 1.0, 1.0])
    n = 60
    single = _take(RepeatFactorSampler(factors, seed=5), n * world_size)
    shards = [_take(RepeatFactorSampler(factors, seed=5, rank=r, world_size=world_size), n)
              for r in range(world_size)]
    # rank r holds global positions r, r + W, ...: interleaving the shards rebuilds the stream,
    # so no position is drawn twice and none is skipped
    interleaved = [shards[r][k] for k in range(n) for r in range(world_size)]
    assert interleaved == single


@pytest.mark.parametrize("rank,world_size,consumed", [(0, 1, 37), (1, 2, 23), (2, 3, 9)])
def test_resume_continues_the_exact_stream(rank, world_size, consumed):
    factors = torch.tensor([1.0, 2.2, 1.0, 1.6, 3.0])  # short epochs: the resume crosses several
    unbroken = _take(RepeatFactorSampler(factors, seed=9, rank=rank, world_size=world_size), consumed + 50)

    first = RepeatFactorSampler(factors, seed=9, rank=rank, world_size=world_size)
    it = iter(first)
    head = [next(it) for _ in range(consumed)]
    state = first.state_dict()
    assert head == unbroken[:consumed] and state["epoch"] > 0

    resumed = RepeatFactorSampler(factors, seed=9, rank=rank, world_size=world_size)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a json/checkpoint round trip
    assert _take(resumed, 50) == unbroken[consumed:]
    # the state is rank-independent: rank 0's checkpoint resumes every rank
    if rank:
        other = RepeatFactorSampler(factors, seed=9, rank=0, world_size=world_size)
        it0 = iter(other)
        for _ in range(consumed):
            next(it0)
        assert other.state_dict() == state


def test_state_for_a_prefetching_loader():
    factors = torch.tensor([1.0, 2.5, 1.0, 1.5])
    sampler = RepeatFactorSampler(factors, seed=2)
    it = iter(sampler)
    stream = [next(it) for _ in range(40)]  # a DataLoader ran ahead of the trainer
    state = sampler.state_dict(consumed=25)  # the trainer consumed 25
    resumed = RepeatFactorSampler(factors, seed=2)
    resumed.load_state_dict(state)
    assert _take(resumed, 15) == stream[25:]
    with pytest.raises(ValueError):
        RepeatFactorSampler(factors, seed=3).load_state_dict(state)


def test_bad_factors_rejected():
    with pytest.raises(ValueError):
        RepeatFactorSampler(torch.zeros(3), seed=0)
    with pytest.raises(ValueError):
        RepeatFactorSampler(torch.ones(3), seed=0, rank=2, world_size=2)
