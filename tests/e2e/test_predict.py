"""`slsd predict` (issue 13.3): a run on a folder / glob / image list -> results json (RLE masks)
equal to `slsd eval`'s detections; --render; AMP stays fp32 by default on the CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from slsd_cli.cli import main
from slsd_cli.data.lvis import load_annotations
from slsd_cli.errors import InputError
from slsd_cli.inference.image_sources import collect_images
from slsd_cli.data.results import read_results


@pytest.fixture(scope="module")
def world(tiny_synth, tmp_path_factory):
    from slsd_cli.model import build_detector, save_detector, tiny_eva_config

    root = tmp_path_factory.mktemp("predict")
    synth = tiny_synth  # its val split: 3 classes, 5 images of 64 px
    val = load_annotations(synth / "val.json")
    torch.manual_seed(0)
    cfg = tiny_eva_config(image_size=64, test_score_threshold=0.0, max_detections=20,
                          rpn_post_nms_topk_test=32)
    run = root / "run"
    save_detector(build_detector(cfg, val.categories), run, val.categories, cfg)
    folder = root / "photos"
    folder.mkdir()
    for image_id in val.image_ids:
        shutil.copy(val.image_file(image_id, synth / "images"), folder)
    ev = root / "eval"
    assert main(["eval", "--annotations", str(synth / "val.json"), "--checkpoint", str(run), "--images",
                 str(synth / "images"), "--out-dir", str(ev)]) == 0
    return root, synth, run, folder, json.loads((ev / "detections.json").read_text())


def test_predict_on_a_folder_equals_eval_and_passes_validation(world):
    root, synth, run, folder, eval_dets = world
    out = root / "pred" / "results.json"
    assert main(["predict", "--checkpoint", str(run), str(folder), "--out", str(out), "--render",
                 str(root / "drawn")]) == 0
    index = load_annotations(out.with_name("results.images.json"), require_annotations=False)
    dets = read_results(out, index)  # the results validation (ids, scores, boxes, RLE run lengths)
    assert len(dets.scores) > 0
    records = json.loads(out.read_text())
    assert all("segmentation" in r for r in records)
    # folder ids follow the sorted file names; map them to the val annotations' ids by file name
    val = load_annotations(synth / "val.json")
    by_name = {img["file_name"]: i for i, img in val.images.items()}
    to_val = {i: by_name[Path(img["file_name"]).name] for i, img in index.images.items()}
    remapped = [{**r, "image_id": to_val[r["image_id"]]} for r in records]
    assert sorted(remapped, key=json.dumps) == sorted(eval_dets, key=json.dumps)
    drawn = sorted(p.name for p in (root / "drawn").iterdir())
    assert len(drawn) == len(val.image_ids) and all(name.endswith(".png") for name in drawn)
    # an existing output needs --force
    assert main(["predict", "--checkpoint", str(run), str(folder), "--out", str(out)]) == 2


def test_image_list_json_keeps_its_ids_and_glob_works(world):
    root, synth, run, folder, eval_dets = world
    out = root / "list.json"
    assert main(["predict", "--checkpoint", str(run), str(synth / "val.json"), "--images-dir",
                 str(synth / "images"), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == eval_dets  # the annotations' ids, same order, same records
    glob_out = root / "glob.json"
    # the first form of the command (the run as the first positional) still works
    assert main(["predict", str(run), str(folder / "val_00000[01].png"), "--out", str(glob_out),
                 "--score", "0.5", "--max-dets", "3"]) == 0
    recs = json.loads(glob_out.read_text())
    assert {r["image_id"] for r in recs} <= {1, 2} and all(r["score"] > 0.5 for r in recs)
    assert all(sum(r["image_id"] == i for r in recs) <= 3 for i in (1, 2))


def test_image_ids_from_numeric_stems_and_bad_sources(tmp_path):
    from torchvision.io import write_png

    for name in ("000000039769.png", "000000000042.png"):
        write_png(torch.zeros(3, 8, 12, dtype=torch.uint8), str(tmp_path / name))
    records = collect_images([str(tmp_path)])
    assert [(r["id"], r["width"], r["height"]) for r in records] == [(42, 12, 8), (39769, 12, 8)]
    with pytest.raises(InputError, match="no such image"):
        collect_images([str(tmp_path / "missing" / "*.jpg")])
    (tmp_path / "bad.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(InputError, match="image list"):
        collect_images([str(tmp_path / "bad.json")])


def test_fp32_stays_the_default_on_cpu(world):
    from slsd_cli.inference.predictor import Predictor, autocast_dtype

    root, synth, run, folder, _ = world
    predictor = Predictor.from_run(run, device="cpu")
    assert predictor.amp == "auto" and predictor.dtype is None  # no autocast: fp32 on the CPU
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    # a checkpoint converted from the EVA-02 reference stays in the reference's fp32 under auto
    assert autocast_dtype("auto", torch.device("cuda"), converted=True) is None
    assert autocast_dtype("bf16", torch.device("cuda"), converted=True) == torch.bfloat16
    converted = Predictor(predictor.model, predictor.category_ids, meta={"converted_from": "eva02_L_lvis_bsl.pth"})
    assert converted.dtype is None and "converted EVA-02 checkpoint" in converted.precision_note()
    assert autocast_dtype("fp16", torch.device("cuda")) == torch.float16
    with pytest.raises(InputError, match="fp16 needs a CUDA"):
        autocast_dtype("fp16", torch.device("cpu"))
    with pytest.raises(InputError, match="--amp"):
        autocast_dtype("int8", torch.device("cpu"))
    # the option reaches the predictor from predict / eval / calibrate
    assert main(["predict", "--checkpoint", str(run), str(folder), "--out", str(root / "x.json"),
                 "--amp", "fp16"]) == 2
    assert main(["eval", "--annotations", str(synth / "val.json"), "--checkpoint", str(run), "--images",
                 str(synth / "images"), "--out-dir", str(root / "e16"), "--amp", "fp16"]) == 2
    assert main(["calibrate", "--annotations", str(synth / "val.json"), "--checkpoint", str(run), "--images",
                 str(synth / "images"), "--out", str(root / "c.json"), "--amp", "fp16"]) == 2


def test_the_model_is_required(tmp_path, capsys):
    capsys.readouterr()
    assert main(["predict", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--checkpoint RUN" in err
    assert not (tmp_path / "r.json").exists()


def _by_file(out: Path) -> dict[str, list[dict]]:
    index = json.loads(out.with_name(f"{out.stem}.images.json").read_text())
    names = {img["id"]: Path(img["file_name"]).name for img in index["images"]}
    grouped: dict[str, list[dict]] = {}
    for rec in json.loads(out.read_text()):
        grouped.setdefault(names[rec["image_id"]], []).append({k: v for k, v in rec.items() if k != "image_id"})
    return grouped


def test_exif_and_16_bit_images_give_the_detections_of_their_plain_twins(world, capsys):
    """An orientation-6 JPEG detects as its upright PNG; a 16-bit gray PNG as the same picture in 8
    bits (issues 21.3, 24); --amp auto says what it chose."""
    import numpy as np
    from PIL import Image

    from tests.unit.test_image_reader import save_rotated_pair

    root, _, run, _, _ = world
    folder = root / "twins"
    folder.mkdir()
    save_rotated_pair(folder)
    gray = np.kron(np.random.default_rng(1).integers(0, 256, (12, 10), dtype=np.uint8), np.ones((4, 4), np.uint8))
    Image.fromarray(gray, mode="L").save(folder / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "gray16.png")
    out = root / "twins.json"
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), str(folder), "--out", str(out)]) == 0
    assert "precision: fp32 (--amp auto on cpu)" in capsys.readouterr().err
    dets = _by_file(out)
    assert len(dets["phone.jpg"]) == 20 and dets["phone.jpg"] == dets["phone_upright.png"]
    assert len(dets["gray8.png"]) == 20 and dets["gray8.png"] == dets["gray16.png"]


def test_soft_nms_and_maskness_reach_the_model(world):
    root, synth, run, folder, _ = world
    plain, soft = root / "plain.json", root / "soft.json"
    one = str(folder / "val_000000.png")
    assert main(["predict", "--checkpoint", str(run), one, "--out", str(plain)]) == 0
    assert main(["predict", "--checkpoint", str(run), one, "--out", str(soft), "--soft-nms", "gaussian",
                 "--soft-nms-sigma", "0.5", "--maskness", "0.5", "--max-dets", "60"]) == 0
    plain_recs, soft_recs = json.loads(plain.read_text()), json.loads(soft.read_text())
    assert len(plain_recs) == 20  # hard NMS: the model's max_detections
    assert len(soft_recs) == 60  # soft-NMS keeps every survivor; --max-dets keeps the top 60
    assert max(r["score"] for r in soft_recs) < max(r["score"] for r in plain_recs)  # maskness <= 1
    assert main(["predict", "--checkpoint", str(run), one, "--out", str(root / "bad.json"),
                 "--soft-nms", "hard"]) == 2
    assert main(["eval", "--annotations", str(synth / "val.json"), "--checkpoint", str(run), "--images",
                 str(synth / "images"), "--out-dir", str(root / "bad_eval"), "--maskness", "2"]) == 2
    assert not (root / "bad.json").exists() and not (root / "bad_eval").exists()


def test_outputs_are_checked_before_anything_is_written(world, capsys):
    root, _, run, folder, _ = world
    one = str(folder / "val_000000.png")
    target = root / "checked"
    target.mkdir()
    (target / "a_folder.json").mkdir()
    (target / "a_file").write_text("x")
    cases = [(["--out", str(target / "a_folder.json")], "is a folder"),
             (["--out", str(target / "r.json"), "--render", str(target / "a_file")], "--render must be a folder"),
             (["--out", str(target / "r.json"), "--render", str(target / "a_file" / "below")], "below a file")]
    for args, message in cases:
        capsys.readouterr()
        assert main(["predict", "--checkpoint", str(run), one, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
    assert sorted(p.name for p in target.iterdir()) == ["a_file", "a_folder.json"]  # nothing written
    # a truncated image: one line, and no results, index or staging folder left behind
    broken = root / "broken"
    broken.mkdir()
    shutil.copy(folder / "val_000000.png", broken / "a.png")
    data = (folder / "val_000001.png").read_bytes()
    (broken / "b.png").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), str(broken), "--out", str(target / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and "truncated" in errors[0] and "b.png" in errors[0]
    assert sorted(p.name for p in target.iterdir()) == ["a_file", "a_folder.json"]


def test_render_names_fit_the_file_system(world):
    """A 254-byte image name: its drawing and the drawing's temporary still fit 255 bytes."""
    root, _, run, folder, _ = world
    long_dir = root / "long"
    long_dir.mkdir()
    name = "x" * 250 + ".png"
    shutil.copy(folder / "val_000000.png", long_dir / name)
    assert len(name.encode()) == 254
    drawn = root / "long_drawn"
    assert main(["predict", "--checkpoint", str(run), str(long_dir), "--out", str(root / "long.json"),
                 "--render", str(drawn)]) == 0
    [png] = list(drawn.iterdir())
    assert png.name.endswith("_1.png") and png.name.startswith("x" * 150) and len(png.name.encode()) <= 200
