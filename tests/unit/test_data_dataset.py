"""InstanceDataset on the real COCO photo and on tiny written datasets; DataLoader integration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from slsd_cli.data import transforms as T
from slsd_cli.data.batching import Batch, collate
from slsd_cli.data.dataset import InstanceDataset
from slsd_cli.data.lvis import load_annotations
from slsd_cli.data.sampling import RepeatFactorSampler, repeat_factors
from slsd_cli.errors import InputError

from tests.helpers.tiny_data import COCO_39769, write_dataset


def shoelace_area(flat: list[float]) -> float:
    xy = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


@pytest.fixture(scope="module")
def coco():
    annotations = load_annotations(COCO_39769 / "instances.json")
    return annotations, InstanceDataset(annotations, COCO_39769)


def test_coco_photo_loads(coco):
    annotations, dataset = coco
    assert len(dataset) == 1 and annotations.protocol == "coco"
    sample = dataset[0]
    assert isinstance(sample["image"], tv_tensors.Image) and sample["image"].shape == (3, 480, 640)
    assert sample["image"].dtype == torch.uint8
    assert isinstance(sample["boxes"], tv_tensors.BoundingBoxes) and sample["boxes"].shape == (6, 4)
    assert sample["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert isinstance(sample["masks"], tv_tensors.Mask) and sample["masks"].shape == (6, 480, 640)
    assert sample["image_id"] == 39769 and sample["orig_size"] == (480, 640) and sample["scale"] == 1.0
    # contiguous labels: categories 17, 63, 65, 75 -> 0, 1, 2, 3
    expected = [annotations.category_index[a["category_id"]] for a in annotations.annotations]
    assert sample["labels"].tolist() == expected and sorted(set(expected)) == [0, 1, 2, 3]
    first = annotations.annotations[0]["bbox"]
    assert sample["boxes"][0].tolist() == pytest.approx([first[0], first[1], first[0] + first[2], first[1] + first[3]])


def test_coco_masks_match_polygon_areas(coco):
    annotations, dataset = coco
    masks = dataset[0]["masks"]
    assert len(annotations.annotations) == 6
    for ann, mask in zip(annotations.annotations, masks):
        (polygon,) = ann["segmentation"]
        area = shoelace_area(polygon)
        raster = int(mask.sum())
        assert abs(raster - area) <= 0.01 * area, (ann["id"], raster, area)
        x, y, w, h = ann["bbox"]
        ys, xs = torch.nonzero(mask, as_tuple=True)  # the mask lies inside its box (rasterisation: +-1 px)
        assert xs.min() >= x - 1 and xs.max() + 1 <= x + w + 1 and ys.min() >= y - 1 and ys.max() + 1 <= y + h + 1


def test_coco_photo_through_lsj_and_weak_strong(coco):
    annotations, _ = coco
    torch.manual_seed(0)
    dataset = InstanceDataset(annotations, COCO_39769, transform=T.WeakStrongTransform(256))
    for _ in range(3):
        weak, strong = dataset[0]
        masks, boxes = weak["masks"].as_subclass(torch.Tensor), weak["boxes"].as_subclass(torch.Tensor)
        assert max(weak["image"].shape[-2:]) <= 256 and masks.shape[-2:] == weak["image"].shape[-2:]
        assert (T.mask_boxes(masks) - boxes).abs().max() <= 1
        assert torch.equal(boxes, strong["boxes"].as_subclass(torch.Tensor))
    test = InstanceDataset(annotations, COCO_39769, transform=T.test_transform(320))[0]
    assert test["image"].shape == (3, 240, 320) and test["scale"] == pytest.approx(0.5)
    assert len(test["labels"]) == 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    path = write_dataset(root, [(40, 50), (30, 30), (50, 36), (24, 40)], [3, 0, 2, 1])
    return path, load_annotations(path)


def test_tiny_dataset_and_subset(tiny):
    path, annotations = tiny
    dataset = InstanceDataset(annotations, path.parent)
    assert len(dataset) == 4
    assert [len(dataset[i]["labels"]) for i in range(4)] == [3, 0, 2, 1]
    empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 30, 30) and empty["labels"].dtype == torch.long
    subset = InstanceDataset(annotations, path.parent, image_ids=[103, 100])
    assert [subset[i]["image_id"] for i in range(2)] == [103, 100]
    # the tight boxes written for the fixture are the masks' boxes
    sample = dataset[0]
    assert torch.equal(T.mask_boxes(sample["masks"].as_subclass(torch.Tensor)), sample["boxes"].as_subclass(torch.Tensor))
    with pytest.raises(InputError, match="unknown image id 999"):
        InstanceDataset(annotations, path.parent, image_ids=[999])


def test_images_only_json_gives_empty_targets(tiny, tmp_path):
    path, _ = tiny
    data = json.loads(path.read_text())
    del data["annotations"]
    unlabeled = tmp_path / "unlabeled.json"
    unlabeled.write_text(json.dumps(data))
    annotations = load_annotations(unlabeled, require_annotations=False)
    dataset = InstanceDataset(annotations, path.parent, transform=T.lsj_transform(32))
    torch.manual_seed(0)
    samples = [dataset[i] for i in range(len(dataset))]
    assert all(s["boxes"].shape == (0, 4) and s["masks"].shape[0] == 0 for s in samples)
    batch = collate(samples)
    assert batch.images.shape[0] == 4 and all(t["labels"].numel() == 0 for t in batch.targets)


def test_crowd_annotations_are_counted_not_silently_dropped(tiny, tmp_path):
    path, _ = tiny
    data = json.loads(path.read_text())
    data["annotations"][0]["iscrowd"] = 1
    crowd = tmp_path / "crowd.json"
    crowd.write_text(json.dumps(data))
    annotations = load_annotations(crowd)
    dataset = InstanceDataset(annotations, path.parent)
    assert dataset.num_crowd_skipped == 1 and len(dataset[0]["labels"]) == 2
    assert len(InstanceDataset(annotations, path.parent, include_crowd=True)[0]["labels"]) == 3


def test_dataloader_with_sampler_is_reproducible(tiny):
    path, annotations = tiny
    dataset = InstanceDataset(annotations, path.parent, transform=T.lsj_transform(32))

    def run() -> list[Batch]:
        torch.manual_seed(7)
        sampler = RepeatFactorSampler(repeat_factors(annotations, threshold=0.5), seed=1)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=1,
                                             collate_fn=collate)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == 3:
                break
        return batches

    first, second = run(), run()
    for a, b in zip(first, second):
        assert a.image_ids == b.image_ids and torch.equal(a.images, b.images)
        assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a.targets, b.targets))
    assert first[0].images.shape[-1] % 32 == 0
