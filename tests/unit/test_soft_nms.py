"""Class-wise soft-NMS and maskness (issue 21.4) against plain Python loops written here from the
reference's rules (mmcv's `soft_nms` as EVA-02 calls it, and EVA-02's `CascadeROIHeads` maskness),
and the test keys that choose them (model config, eval / predict options)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slsd_cli.errors import InputError
from slsd_cli.model.nms import SOFT_NMS_MIN_SCORE, maskness, rescore_by_maskness, select_detections, soft_nms

f32 = np.float32


def loop_soft_nms(boxes, scores, classes, method, iou_threshold, sigma, min_score=SOFT_NMS_MIN_SCORE):
    """mmcv's CPU soft-NMS, line by line, in float32, on boxes shifted per class as EVA-02 does:
    -> [(index, score at selection)] in selection order."""
    boxes = np.asarray(boxes, dtype=f32)
    top = boxes.max() if len(boxes) else f32(0)
    shift = np.asarray(classes, dtype=f32) * (top + f32(1))
    b = [list(row) for row in (boxes + shift[:, None])]
    sc = [f32(s) for s in scores]
    area = [(r[2] - r[0]) * (r[3] - r[1]) for r in b]
    ind = list(range(len(b)))
    n, out = len(b), []
    i = 0
    while i < n:
        best = i
        for pos in range(i + 1, n):
            if sc[best] < sc[pos]:
                best = pos
        for arr in (b, sc, area, ind):
            arr[i], arr[best] = arr[best], arr[i]
        out.append((ind[i], sc[i]))
        pos = i + 1
        while pos < n:
            w = max(f32(0), min(b[i][2], b[pos][2]) - max(b[i][0], b[pos][0]))
            h = max(f32(0), min(b[i][3], b[pos][3]) - max(b[i][1], b[pos][1]))
            inter = f32(w * h)
            ovr = f32(inter / f32(f32(area[i] + area[pos]) - inter))
            if method == "linear":
                weight = f32(1) - ovr if ovr >= f32(iou_threshold) else f32(1)
            else:
                weight = f32(math.exp(-(ovr * ovr) / f32(sigma)))
            sc[pos] = f32(sc[pos] * weight)
            if sc[pos] < f32(min_score):
                for arr in (b, sc, area, ind):
                    arr[pos] = arr[n - 1]
                n -= 1
                pos -= 1
            pos += 1
        i += 1
    return out


def _clustered(seed: int, n: int = 60, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(6, 2, generator=g) * 80
    which = torch.randint(0, 6, (n,), generator=g)
    xy = centres[which] + torch.randn(n, 2, generator=g) * 2
    wh = 10 + torch.rand(n, 2, generator=g) * 20
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(n, generator=g) * 0.9 + 0.02
    labels = torch.randint(0, classes, (n,), generator=g)
    return boxes, scores, labels


@pytest.mark.parametrize("method, iou", [("linear", 0.6), ("linear", 0.3), ("gaussian", 0.3)])
@pytest.mark.parametrize("seed", range(3))
def test_soft_nms_matches_the_reference_loop(method, iou, seed):
    boxes, scores, labels = _clustered(seed)
    keep, new_scores = soft_nms(boxes, scores, labels, method, iou, 0.5)
    expected = loop_soft_nms(boxes.numpy(), scores.numpy(), labels.numpy(), method, iou, 0.5)
    ours = dict(zip(keep.tolist(), new_scores.tolist()))
    theirs = {i: float(s) for i, s in expected}
    assert ours.keys() == theirs.keys()  # the same boxes survive
    assert all(ours[i] == pytest.approx(theirs[i], rel=1e-6, abs=1e-9) for i in ours)
    assert torch.all(new_scores[:-1] >= new_scores[1:])  # best first
    assert sum(ours[i] < float(scores[i]) for i in ours) >= 5  # overlapping boxes did decay


def test_soft_nms_decays_only_within_a_class():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0], [0.0, 0.0, 10.0, 9.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep, new = soft_nms(boxes, scores, torch.tensor([0, 0, 1]), "linear", 0.6, 0.5)
    got = dict(zip(keep.tolist(), new.tolist()))
    assert got[0] == pytest.approx(0.9) and got[2] == pytest.approx(0.7)  # another class: untouched
    assert got[1] == pytest.approx(0.8 * (1 - 0.9), rel=1e-5)  # IoU 0.9 >= 0.6: decays by 1 - IoU
    keep, _ = soft_nms(boxes[:0], scores[:0], torch.zeros(0, dtype=torch.long), "linear", 0.6, 0.5)
    assert keep.numel() == 0
    tiny = torch.tensor([0.9, 0.0009])  # a candidate under the minimum score is dropped on the first pass
    keep, _ = soft_nms(torch.tensor([[0.0, 0.0, 5.0, 5.0], [20.0, 20.0, 30.0, 30.0]]), tiny,
                       torch.tensor([0, 0]), "linear", 0.6, 0.5)
    assert keep.tolist() == [0]


def loop_maskness(mask_probs: np.ndarray, threshold: float) -> list[float]:
    out = []
    for mask in mask_probs:
        total, count = 0.0, 0
        for value in mask.ravel():
            if value > threshold:
                total += float(value)
                count += 1
        out.append(total / count if count else 0.0)
    return out


def test_maskness_matches_the_reference_loop():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 28, 28, generator=g) ** 3
    probs[3] = 0.2  # no pixel above 0.5: maskness 0
    probs[4] = 0.5  # exactly at the threshold counts as below (the reference uses >)
    expected = loop_maskness(probs.numpy(), 0.5)
    assert maskness(probs, 0.5).tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[3] == 0.0 and expected[4] == 0.0
    det = {"boxes": torch.rand(5, 4), "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]),
           "labels": torch.arange(5), "probs": torch.rand(5, 3), "mask_probs": probs}
    out = rescore_by_maskness(det, 0.5)
    rescored = [s * m for s, m in zip(det["scores"].tolist(), expected)]
    order = sorted(range(5), key=lambda i: -rescored[i])
    assert out["scores"].tolist() == pytest.approx([rescored[i] for i in order], rel=1e-6)
    assert out["labels"].tolist() == order and torch.equal(out["mask_probs"], probs[order])


def test_select_detections_hard_and_soft():
    boxes, scores, labels = _clustered(5, n=40, classes=3)
    probs = torch.zeros(40, 3)
    probs[torch.arange(40), labels] = scores
    hard = select_detections(boxes, probs, 0.02, 0.5, 7)
    assert len(hard["scores"]) == 7 and torch.all(hard["scores"][:-1] >= hard["scores"][1:])
    soft = select_detections(boxes, probs, 0.02, 0.5, 7, "linear", 0.6, 0.5)
    expected = loop_soft_nms(boxes.numpy(), scores.numpy(), labels.numpy(), "linear", 0.6, 0.5)
    assert len(soft["scores"]) == len(expected) > 7  # soft-NMS keeps every survivor (no top-k), as the reference
    assert sorted(soft["scores"].tolist()) == pytest.approx(sorted(float(s) for _, s in expected), rel=1e-6)
    assert torch.equal(soft["probs"], probs[[i for i, _ in sorted(expected, key=lambda e: -e[1])]])


def test_test_options_are_checked_like_recipe_keys():
    from slsd_cli.evaluation.pipeline import EvalConfig
    from slsd_cli.model.model_config import check_inference_options, inference_options

    assert inference_options("linear", 0.6, None, 0.5) == {"test_soft_nms": "linear", "test_soft_nms_iou": 0.6,
                                                      "test_maskness": 0.5}
    with pytest.raises(InputError, match="test_soft_nms must be one of none, linear, gaussian"):
        check_inference_options(inference_options("hard"))
    with pytest.raises(InputError, match=r"test_maskness must lie in \[0, 1\)"):
        check_inference_options(inference_options(maskness=1.5))
    with pytest.raises(InputError, match="a --detections file is scored as it is"):
        EvalConfig(annotations="a.json", out_dir="o", detections="d.json", soft_nms="linear")
