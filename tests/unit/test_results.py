"""The one results-file reader (`slsd_cli.data.results`), the shared matcher's box IoU, Eq. 4 as a
function, and the promise that scoring a file never loads torch."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from slsd_cli.evaluation import matching
from slsd_cli.data import results, results_parser
from slsd_cli.data.lvis import load_annotations
from slsd_cli.errors import InputError
from slsd_cli.labels.calibration import ccece, ece

H, W = 20, 30


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("results")
    data = {"images": [{"id": i, "width": W, "height": H, "file_name": f"{i}.png", "neg_category_ids": [],
                        "not_exhaustive_category_ids": []} for i in (1, 2)],
            "categories": [{"id": 5, "name": "a", "frequency": "f"}, {"id": 9, "name": "b", "frequency": "r"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [2, 2, 10, 8], "area": 80,
                             "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]}]}
    path = tmp / "gt.json"
    path.write_text(json.dumps(data))
    mask = np.zeros((H, W), np.uint8)
    mask[2:10, 2:12] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    dets = [{"image_id": 1 + k % 2, "category_id": (5, 9)[k % 2], "bbox": [1.5 + k, 2.25, 10, 8.5],
             "score": round(0.1 * k, 2), "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}}
            for k in range(8)]
    return tmp, load_annotations(path), dets


def _write(tmp, records, name="dt.json", text=None):
    path = tmp / name
    path.write_text(text if text is not None else json.dumps(records))
    return path


BAD = [  # (mutation of record 3, words in the message)
    (lambda d: d.update(image_id=77), "unknown image id 77"),
    (lambda d: d.update(category_id=6), "unknown category id 6"),
    (lambda d: d.update(category_id=2 ** 64), "int64"),
    (lambda d: d.update(image_id=True), "image_id must be an integer"),
    (lambda d: d.update(image_id=[1]), "image_id must be an integer"),
    (lambda d: d.update(score="0.5"), "score must be a number"),
    (lambda d: d.update(score=1.5), "score 1.5 is outside [0, 1]"),
    (lambda d: d.update(score=float("nan")), "score is not a finite number"),
    (lambda d: d.update(bbox=[1, 2, -3, 4]), "malformed bbox"),
    (lambda d: d.update(bbox=[1, 2, 3]), "malformed bbox"),
    (lambda d: d.update(bbox=[1, 2, 3, "4"]), "malformed bbox"),
    (lambda d: d.update(bbox=[1, 2, 10 ** 400, 4]), "malformed bbox"),   # an int beyond float range
    (lambda d: d["segmentation"].update(size=H * W), "RLE size must be [height, width]"),
    (lambda d: d["segmentation"].update(size=[H, W, 1]), "RLE size must be [height, width]"),
    (lambda d: d["segmentation"].update(size=[float(H), W]), "RLE size must be [height, width]"),
    (lambda d: d["segmentation"].update(size=[H, W + 1]), "disagrees with image"),
    (lambda d: d["segmentation"].update(counts=5), "RLE counts must be a string or a list"),
    (lambda d: d.update(segmentation=None), "segmentation must be an RLE object"),
    (lambda d: d["segmentation"].update(counts=[H * W - 1, 1.0]), "malformed RLE"),
    (lambda d: d["segmentation"].update(counts="0" + d["segmentation"]["counts"]), "malformed RLE"),
    (lambda d: d.pop("score"), "a result needs"),
    (lambda d: (d.pop("bbox"), d.pop("segmentation")), "a result needs 'bbox' or 'segmentation'"),
]


@pytest.mark.parametrize("mutate, words", BAD)
def test_bad_record_is_named(problem, mutate, words):
    tmp, ann, dets = problem
    bad = json.loads(json.dumps(dets))
    mutate(bad[3])
    path = _write(tmp, bad)
    with pytest.raises(InputError) as info:
        results.read_results(path, ann)
    message = str(info.value)
    assert message.startswith(f"{path}: [3]") and words in message, message


@pytest.mark.parametrize("text, words", [
    ('[{"image_id": 1, "category_id": 5, "bbox": [1, 2, 1e400, 4], "score": 0.5}]', "malformed bbox"),  # inf
    ('[{"image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4], "score": 1.0000001}]', "outside [0, 1]"),
    ('[{"image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4], "score": 0.5},'
     ' {"image_id": 1.5, "category_id": 5, "bbox": [1, 2, 3, 4], "score": 0.5}]', "[1]"),
    ('[{"image_id": 1, "category_id": 5, "bbox": [1, 2, 3, -0.5], "score": 0.5}]', "malformed bbox"),
    ('[{"image_id": 1, "category_id": 5.0, "bbox": [1, 2, 3, 4], "score": 0.5}]', "category_id must be an integer"),
    ('[{"image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4], "score": 0.5}', "malformed json"),
    ('{"image_id": 1}', "must be a json list"),
])
def test_bad_box_files(problem, text, words):
    tmp, ann, _ = problem
    path = _write(tmp, None, text=text)
    with pytest.raises(InputError) as info:
        results.read_results(path, ann)
    assert words in str(info.value) and str(path) in str(info.value)


def test_fast_reader_equals_json_on_hard_numbers(problem):
    """The vectorised box reader gives json's values to the last bit: random doubles, short and
    long decimals, negative zero, integral floats; ids beyond 2**53 (and exponents) go to the json path."""
    tmp, ann, _ = problem
    rng = random.Random(0)
    numbers = [struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0] for _ in range(600)]
    numbers = [x for x in numbers if 1e-4 <= abs(x) < 1e15]  # json writes these without an exponent
    numbers += [rng.uniform(-1, 1e4) for _ in range(600)] + [round(rng.uniform(-1, 1e4), rng.randint(0, 9))
                                                             for _ in range(600)]
    numbers += [-0.0, 0.0, 3.0, 0.1, 123456789012345.6, 9007199254740993.0]
    records = [{"image_id": 1, "category_id": 5, "bbox": [numbers[i], numbers[i + 1], abs(numbers[i + 2]),
                                                          abs(numbers[i + 3])], "score": rng.random()}
               for i in range(0, len(numbers) - 4, 4)]
    text = json.dumps(records)
    assert results_parser.box_columns(text.encode()) is not None  # the vectorised reader takes it
    fast = results.read_results(_write(tmp, None, text=text), ann)
    ref = results.from_records(json.loads(text), ann)
    for name in ("image_ids", "category_ids", "labels", "scores", "boxes"):
        assert getattr(fast, name).tobytes() == getattr(ref, name).tobytes(), name
    big = '[{"image_id": 9007199254740993, "category_id": 5, "bbox": [1, 2, 3, 4], "score": 0.5}]'
    assert results_parser.box_columns(big.encode()) is None
    with pytest.raises(InputError, match="unknown image id 9007199254740993"):
        results.read_results(_write(tmp, None, text=big), ann)


def _box_text(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return json.dumps([{"image_id": 1 + k % 2, "category_id": (5, 9)[k % 3 == 0],
                        "bbox": [round(rng.uniform(0, 30), rng.randint(0, 6)), rng.uniform(0, 20), 3, 4.5],
                        "score": rng.random()} for k in range(n)])


@pytest.mark.parametrize("broken", [
    None,
    lambda t: t[:len(t) * 3 // 4] + t[len(t) * 3 // 4:].replace('"score": ', '"score": 1.2.', 1),  # bad token, 2nd half
    lambda t: t[:len(t) // 4] + t[len(t) // 4:].replace('"score": ', '"score": 0.5-', 1),    # bad token, 1st half
    lambda t: t[:len(t) * 3 // 4] + t[len(t) * 3 // 4:].replace('"image_id": 2', '"image_id": 2.0', 1),
    lambda t: t[:len(t) // 4] + t[len(t) // 4:].replace('"image_id": 2', '"image_id": 2.0', 1),
    lambda t: t[:len(t) * 3 // 4] + t[len(t) * 3 // 4:].replace(", 4.5]", ", 4.5, 1]", 1),    # a fifth box number
    lambda t: t[:len(t) * 3 // 4] + t[len(t) * 3 // 4:].replace("}, {", "}, 7, {", 1),        # a stray number
    lambda t: t[:len(t) // 2] + t[len(t) // 2:].replace('"score"', '"scor"', 1),              # structure
    lambda t: t + "]",                                                                        # a second "]"
    lambda t: t[:-2] + "]",                                                                   # truncated record
    lambda t: t + " 5",                                                                       # a number after the list
])
def test_box_reader_in_two_processes_and_small_chunks_equals_serial(monkeypatch, broken):
    """The forked two-process parse (`_parse_halves`) and the chunked structure check
    (`_count_records`) give the serial reader's columns to the bit, and refuse what it refuses."""
    text = _box_text(400)
    if broken is not None:
        text = broken(text)
        assert text != _box_text(400)
    serial = results_parser.box_columns(text.encode())
    assert (serial is None) == (broken is not None)
    halves = []
    monkeypatch.setattr(results_parser, "_parse_halves", lambda *a, f=results_parser._parse_halves: halves.append(1) or f(*a))
    for chunk in (7, 64, 1 << 20):
        monkeypatch.setattr(results_parser, "_SKELETON_CHUNK", chunk)
        monkeypatch.setattr(results_parser, "_PIECE", 48)
        for parallel in (0, 1 << 40):
            monkeypatch.setattr(results_parser, "_PARALLEL_BYTES", parallel)
            ours = results_parser.box_columns(text.encode())
            if serial is None:
                assert ours is None, (chunk, parallel)
            else:
                assert ours is not None and ours.tobytes() == serial.tobytes(), (chunk, parallel)
    assert halves or serial is None  # the two-process path ran


def test_index_of_outside_the_ids():
    ids = np.array([3, 4, 9, 20], dtype=np.int64)
    values = np.array([9, 2, 3, 21, 20, -(2 ** 63), 2 ** 63 - 1, 5, 4], dtype=np.int64)
    expect = [{3: 0, 4: 1, 9: 2, 20: 3}.get(int(v), -1) for v in values]
    assert results.index_of(values, ids).tolist() == expect
    assert results.index_of(values, np.array([3, 4, 9, 2 ** 40])).tolist() == expect[:4] + [-1] + expect[5:]
    assert results.index_of(values, np.zeros(0, np.int64)).tolist() == [-1] * values.size


def test_pair_rows_are_every_detection_with_every_ground_truth_of_its_pair():
    rng = np.random.default_rng(0)
    dt_size, gt_size = rng.integers(1, 6, 50), rng.integers(1, 4, 50)
    dt_start, gt_start = rng.integers(0, 1000, 50), rng.integers(0, 1000, 50)
    d, g = matching._pair_rows(dt_start, dt_size, gt_start, gt_size)
    expect = [(ds + r, gs + j) for ds, dn, gs, gn in zip(dt_start, dt_size, gt_start, gt_size)
              for r in range(dn) for j in range(gn)]
    assert list(zip(d.tolist(), g.tolist())) == expect


def test_reader_keeps_masks_compresses_uncompressed_and_skips_them_on_request(problem):
    tmp, ann, dets = problem
    records = json.loads(json.dumps(dets))
    h, w = records[0]["segmentation"]["size"]
    mask = mask_utils.decode(records[0]["segmentation"])
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    records[0]["segmentation"]["counts"] = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    path = _write(tmp, records)
    loaded = results.read_results(path, ann)
    assert loaded.all_have_masks and loaded.segmentations[0]["counts"] == dets[0]["segmentation"]["counts"]
    boxes_only = results.read_results(path, ann, masks=False)
    assert boxes_only.segmentations is None and np.array_equal(boxes_only.boxes, loaded.boxes)


def test_records_give_back_the_file(problem):
    """`Detections.records()` (what `slsd plot predictions` draws) equals the file's records."""
    tmp, ann, dets = problem
    mixed = [dict(d) for d in dets]
    del mixed[1]["bbox"]          # a mask only
    del mixed[2]["segmentation"]  # a box only
    assert results.read_results(_write(tmp, mixed, "records.json"), ann).records() == mixed
    assert results.from_records([], ann).records() == []


def test_box_iou_is_bit_identical_to_pycocotools():
    rng = np.random.default_rng(0)
    d = np.round(rng.uniform(0, 50, (300, 4)), rng.integers(0, 4))
    g = np.round(rng.uniform(0, 50, (40, 4)), 2)
    g[:5] = d[:5]  # exact overlaps
    crowd = rng.random(40) < 0.3
    ref = np.asarray(mask_utils.iou(d.tolist(), g.tolist(), crowd.astype(np.uint8).tolist()))
    rows_d, rows_g = np.repeat(np.arange(300), 40), np.tile(np.arange(40), 300)
    ours = matching.box_iou(matching._box_columns(d), rows_d, matching._box_columns(g), rows_g, crowd[rows_g])
    assert ours.reshape(300, 40).tobytes() == ref.tobytes()


def test_ccece_and_ece_are_eq4():
    count = np.array([[0, 4, 6], [0, 0, 0]])
    correct = np.array([[0.0, 1.0, 6.0], [0.0, 0.0, 0.0]])
    conf = np.array([[0.0, 2.0, 5.4], [0.0, 0.0, 0.0]])
    # class 0: 0.4 * (0.25 - 0.5) + 0.6 * (1.0 - 0.9) = -0.04; class 1 has no detection: 0
    assert ccece(count, correct, conf) == pytest.approx([-0.04, 0.0])
    assert ece(count.sum(0), correct.sum(0), conf.sum(0)) == pytest.approx(0.4 * 0.25 + 0.6 * 0.1)
    assert ece(np.zeros(3), np.zeros(3), np.zeros(3)) == 0.0


@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_scoring_a_file_never_imports_torch(problem, command, tmp_path):
    _, ann, dets = problem
    path = _write(tmp_path, dets)
    args = ["--annotations", str(ann.path), "--detections", str(path)]
    args += ["--out-dir", str(tmp_path / "out")] if command == "eval" else ["--out", str(tmp_path / "cal.json")]
    code = ("import sys\nfrom slsd_cli.cli import main\n"
            f"assert main({[command, *args]!r}) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if command == "eval":
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json"]  # input not copied
