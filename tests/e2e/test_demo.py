"""The demo: its statistics (paired intervals, bootstrap), the report's answer and tables, the held-out
grid (never val), label efficiency for the plot, and the pipeline end to end at a reduced size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from slsd_cli.demo import pipeline as demo_pipeline
from slsd_cli.cli import main
from slsd_cli.demo.pipeline import run_demo
from slsd_cli.demo import table
from slsd_cli.demo.report import ReportInputs, render
from slsd_cli.demo.settings import STUDENTS, TEACHERS, DemoSize, parse_fractions, parse_seeds, slug
from slsd_cli.demo.tuning import CellResult, Grid, Stage, choose, stage_settings
from slsd_cli.errors import InputError
from slsd_cli.stats import bootstrap_indices, bootstrap_interval, t_interval, t_quantile

TINY = DemoSize(classes=10, train_images=255, val_images=12, pool_images=24, calib_images=16, image_size=64,
                prototype_image_size=64, teacher_iterations=2, distill_iterations=2, retrieve_k=2, bootstrap=20,
                eval_max_dets=20)  # untrained models keep ~every proposal: scoring 300 masks per image is most of the cost


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite shares 2 cores; one thread is faster under contention
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- statistics


def test_t_quantile_matches_tables():
    for df, expected in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.995, 1) == pytest.approx(63.6567, abs=1e-3)


def test_paired_t_interval_by_hand():
    teacher = [10.0, 12.0, 11.0]
    student = [11.0, 14.0, 15.0]  # per-seed differences 1, 2, 4
    interval = t_interval([b - a for a, b in zip(teacher, student)])
    mean = 7 / 3
    sd = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)
    half = 4.302653 * sd / math.sqrt(3)
    assert interval.mean == pytest.approx(mean)
    assert (interval.low, interval.high) == pytest.approx((mean - half, mean + half), abs=1e-5)
    assert interval.n == 3 and not interval.excludes_zero()
    one = t_interval([2.0])
    assert one.mean == 2.0 and math.isnan(one.low) and not one.excludes_zero()
    assert t_interval([1.0, float("nan"), 3.0]).n == 2


def test_bootstrap_draws_repeat_with_the_seed():
    a, b, c = bootstrap_indices(50, 7, seed=3), bootstrap_indices(50, 7, seed=3), bootstrap_indices(50, 7, seed=4)
    assert a.shape == (7, 50) and a.min() >= 0 and a.max() < 50
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    interval = bootstrap_interval([1.0, 2.0, 3.0, float("nan")], 10.0)
    assert (interval.low, interval.high, interval.n) == pytest.approx((10 - 1.959964, 10 + 1.959964, 3))


# ---------------------------------------------------------------- Table 1 and the report from fixture numbers


def _rows() -> list[table.Row]:
    teacher = table.Row(TEACHERS["similarity"].label)
    soft = table.Row(STUDENTS["soft"].label)
    corrected = table.Row(STUDENTS["calibrated"].label)
    for seed, (ap, apr) in enumerate([(20.0, 10.0), (21.0, 12.0), (19.0, 11.0)]):
        base = {"AP": ap, "APr": apr, "APc": ap, "APf": ap, "box AP": ap + 5, "ECE": 8.0}
        teacher.values[seed] = base
        soft.values[seed] = {**base, "AP": ap + [0.5, -0.4, 0.1][seed], "APr": apr + 0.2}
        corrected.values[seed] = {**base, "AP": ap + 0.1, "APr": apr + [3.0, 3.2, 2.8][seed], "ECE": 4.0}
    return [teacher, soft, corrected]


def _bootstrap(rows: list[table.Row], spread: float) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for row in rows:
        for seed, values in row.values.items():
            centre = np.array([values[c] for c in table.BOOTSTRAP_COLUMNS])
            out[(row.label, seed)] = centre + spread * rng.standard_normal((200, len(centre)))
    return out


def test_paired_difference_to_the_row_above():
    teacher, soft, corrected = _rows()
    diff = table.difference(corrected, soft, "APr", _bootstrap(_rows(), 0.1))
    assert diff.seeds.mean == pytest.approx(3.0 - 0.2)
    per_seed = [2.8, 3.0, 2.6]
    half = 4.302653 * np.std(per_seed, ddof=1) / math.sqrt(3)
    assert (diff.seeds.low, diff.seeds.high) == pytest.approx((2.8 - half, 2.8 + half), abs=1e-4)
    assert diff.val.low > 0 and diff.verdict() == "beyond noise"
    ap = table.difference(soft, teacher, "AP", _bootstrap(_rows(), 0.1))
    assert ap.verdict() == "within noise"
    noisy = table.difference(corrected, soft, "APr", _bootstrap(_rows(), 30.0))  # val noise swamps the gap
    assert noisy.verdict() == "beyond seed noise, within val noise"
    assert table.difference(corrected, soft, "ECE", None).val is None  # ECE is not bootstrapped


def test_report_opens_with_the_answer_and_shows_paired_differences():
    rows = _rows()
    inputs = ReportInputs("full", TINY, [0, 1, 2], ["- setup line"], rows=rows,
                          answer=(rows[2].label, rows[0].label, rows[1].label), bootstrap=_bootstrap(rows, 0.1))
    text = render(inputs)
    first = text.split("\n\n")[1]
    assert first.startswith("**Does calibration-corrected distillation raise APr here? Yes.**")
    assert "paired Δ +3.0 points" in first and "over 3 seeds" in first and "t = 4.30" in first
    assert "### Paired differences to the row above" in text
    assert f"| {rows[2].label} − {rows[1].label} |" in text
    assert f"| {rows[0].label} | 20.0 ± 1.0 | 11.0 ± 1.0 |" in text
    assert "Val noise: over 200 bootstrap resamples" in text
    # a student below its teacher is reported as such
    for seed in rows[2].values:
        rows[2].values[seed]["APr"] -= 8.0
    text = render(ReportInputs("full", TINY, [0, 1, 2], [], rows=rows, answer=(rows[2].label, rows[0].label, None),
                               bootstrap=_bootstrap(rows, 0.1)))
    assert "raise APr here? No — it lowers it.**" in text
    # the control (teacher fine-tuned without pseudo-labels) splits the change: fine-tuning vs pseudo-labels
    control = table.Row(STUDENTS["control"].label)
    control.values = {seed: {**values, "APr": values["APr"] - 4.0} for seed, values in rows[0].values.items()}
    text = render(ReportInputs("full", TINY, [0, 1, 2], [], rows=[*rows, control],
                               answer=(rows[2].label, rows[0].label, None), control=control.label,
                               bootstrap=_bootstrap([*rows, control], 0.1)))
    assert "Against the control" in text and "the fine-tuning alone changes it by -4.0" in text


# ---------------------------------------------------------------- the grid


def test_grid_stages_and_choice():
    grid = Grid("g", (Stage((("distill.lam", (0.0, 2.0)), ("distill.threshold", (0.3, 0.5)))),),
                exclude=(("distill.lam", 0.0),))
    cells = stage_settings(grid.stages[0], {"distill.unsup_weight": 1.0})
    assert [(c["distill.lam"], c["distill.threshold"]) for c in cells] == [(0.0, 0.3), (0.0, 0.5), (2.0, 0.3),
                                                                          (2.0, 0.5)]
    assert all(c["distill.unsup_weight"] == 1.0 for c in cells)
    results = [CellResult(c, {"AP": ap, "APr": 50.0}, f"run{i}", 0) for i, (c, ap) in
               enumerate(zip(cells, [30.0, 12.0, 11.0, float("nan")]))]
    assert choose(results, grid.exclude).run == "run2"  # λ = 0 is excluded, NaN never wins
    assert choose(results).run == "run0"
    assert slug(cells[2]) == "uw1_lam2_thr0.3"


def test_parse_options():
    assert parse_seeds("0, 2,5") == [0, 2, 5]
    assert parse_seeds(None) is None
    assert parse_fractions("1,0.1,0.25") == [0.1, 0.25, 1.0]
    for bad in ("a,b", "1,1"):
        with pytest.raises(InputError):
            parse_seeds(bad)
    for bad in ("0", "1.5", "x"):
        with pytest.raises(InputError):
            parse_fractions(bad)


# ---------------------------------------------------------------- the pipeline at a reduced size


def _quick_runs() -> tuple[str, str]:
    """Run names of the quick demo's teacher and student: the recipes' default settings."""
    defaults = demo_pipeline._defaults()
    teacher = f"teacher_similarity_{slug(defaults['similarity'])}_seed0"
    return teacher, f"student_soft_{slug(defaults['student'])}__from_{teacher}"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("demo")
        report = run_demo(out, main, size=TINY)
    finally:
        torch.set_num_threads(threads)
    return out, report


def test_quick_demo_report(quick_demo):
    out, report = quick_demo
    text = report.read_text()
    parts = text.split("\n\n")
    assert parts[1] == "## The paper's premise, checked first"  # the premise first, then the answer
    assert "| seed | rare Δ | common Δ | frequent Δ |" in parts[3] and "calib.json" in parts[2]
    assert parts[4].startswith("**The paper's premise") or parts[4].startswith("**The premise cannot")
    assert parts[5].startswith("**Does calibration-corrected distillation raise APr here?")
    assert "Δ drift" in text and "total variation between the similarity and the uniform targets" in text
    assert "## What the calibration correction did to the pseudo-labels" in text
    assert "One seed: the interval covers only the val set's noise" in text
    for label in (TEACHERS["similarity"].label, STUDENTS["calibrated"].label):
        assert f"| {label} |" in text
    assert "Pseudo-labels per unlabeled image" in text and "Spearman correlation" in text
    assert "peak memory" in text and "Val noise: over 20 bootstrap resamples" in text
    teacher, student = _quick_runs()
    for step in ("synth", "split", "prototypes", "retrieve", teacher, f"calibrate {teacher} on calib", student,
                 f"eval {teacher} on val", f"eval {student} on val", f"eval {teacher} on calib",
                 f"calibrate {student} (EMA teacher) on calib",
                 "plot reliability", "plot ap_vs_frequency", "plot predictions"):
        assert f"| {step} |" in text, step
    for figure in ("reliability", "ap_vs_frequency", "predictions"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000
    metrics = json.loads((out / "runs" / student / "eval_val" / "metrics.json").read_text())
    assert metrics["protocol"] == "lvis" and "APr" in metrics["segm"]


def _noisy_detections(annotations, seed: int):
    """Ground-truth masks as detections, a third of them with a wrong class, with random scores."""
    from slsd_cli.data.lvis import segmentation_to_rle
    from slsd_cli.data.results import from_records

    rng = np.random.default_rng(seed)
    records = []
    for ann in annotations.annotations:
        image = annotations.images[ann["image_id"]]
        rle = segmentation_to_rle(ann["segmentation"], image["height"], image["width"])
        counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
        wrong = rng.random() < 1 / 3
        records.append({"image_id": ann["image_id"], "score": float(rng.random()), "bbox": ann["bbox"],
                        "category_id": int(rng.choice(annotations.category_ids)) if wrong else ann["category_id"],
                        "segmentation": {"size": rle["size"], "counts": counts}})
    return from_records(records, annotations)


def test_val_bootstrap_is_paired_and_exact(quick_demo):
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.evaluation.bootstrap import Resampler, bootstrap_metrics
    from slsd_cli.evaluation.metrics import evaluate

    out, _ = quick_demo
    annotations = load_annotations(out / "data" / "val.json")
    dets, other = _noisy_detections(annotations, 0), _noisy_detections(annotations, 1)
    sample, resampled = Resampler(annotations, {"s": dets})(list(range(len(annotations.images))))
    assert evaluate(sample, resampled["s"])["segm"] == evaluate(annotations, dets)["segm"]
    draw = [0, 0, 3, 5]  # an image drawn twice counts twice
    sample, resampled = Resampler(annotations, {"s": dets})(draw)
    ids = annotations.image_ids
    assert len(sample.annotations) == sum(len(annotations.anns_by_image.get(ids[i], [])) for i in draw)
    assert len(resampled["s"]) == sum(int((dets.image_ids == ids[i]).sum()) for i in draw)
    a = bootstrap_metrics(annotations, {"x": dets, "y": dets, "z": other}, replicates=6, seed=1)
    b = bootstrap_metrics(annotations, {"x": dets}, replicates=6, seed=1)
    assert np.array_equal(a["x"], a["y"], equal_nan=True) and np.array_equal(a["x"], b["x"], equal_nan=True)
    assert np.nanstd(a["x"][:, 0]) > 0 and not np.array_equal(a["x"], a["z"])
    cached = np.load(out / "bootstrap.npz")
    assert sum(k.startswith("run") for k in cached.files) == 2 and cached["run0"].shape == (20, 4)


def test_bootstrap_workers_end_under_slsd_signal_handlers(quick_demo):
    """The demo bootstraps in forked workers while slsd's SIGINT / SIGTERM handlers are installed
    (inherited by the workers, which then ignored the pool's SIGTERM: it hung at exit)."""
    import signal

    from slsd_cli import interrupts
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.evaluation.bootstrap import bootstrap_metrics

    out, _ = quick_demo
    annotations = load_annotations(out / "data" / "val.json")
    dets = {"a": _noisy_detections(annotations, 0), "b": _noisy_detections(annotations, 1)}

    def too_long(signum, frame):
        raise TimeoutError("the bootstrap's worker pool did not end")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(60)
    try:
        with interrupts.handling():
            forked = bootstrap_metrics(annotations, dets, replicates=4, seed=2, workers=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    here = bootstrap_metrics(annotations, dets, replicates=4, seed=2, workers=1)
    for name in dets:
        assert np.array_equal(forked[name], here[name], equal_nan=True)


def test_rerun_skips_finished_steps(quick_demo, one_thread):
    out, _ = quick_demo
    teacher = out / "runs" / _quick_runs()[0] / "model.safetensors"
    before = teacher.stat().st_mtime_ns
    text = run_demo(out, main, size=TINY).read_text()
    steps = text[text.index("## Steps"):]
    assert steps.count("| skipped (") >= 14 and "when run) |" in steps  # each step's time is kept
    assert teacher.stat().st_mtime_ns == before


def test_regime_overrides_reach_teacher_and_student(quick_demo, tmp_path, one_thread):
    import dataclasses

    import yaml

    from slsd_cli.demo.runner import Runner
    from slsd_cli.demo.settings import REGIMES

    out, _ = quick_demo
    for folder in ("data", "split", "retrieval"):  # the quick demo's data; this folder's runs are the regime's
        (tmp_path / folder).symlink_to(out / folder, target_is_directory=True)
    demo = demo_pipeline.Demo(tmp_path, dataclasses.replace(TINY, teacher_iterations=1, distill_iterations=1),
                              Runner(tmp_path, main), REGIMES["federated"])
    teacher = demo.teacher(TEACHERS["onehot"], {}, 0)
    student = demo.student("soft", {"distill.lam": 2.0}, teacher, 0)
    for run in (teacher, student):
        model = yaml.safe_load((run / "recipe.yaml").read_text())["model"]
        assert model["use_federated"] is True and model["federated_num_classes"] == 10, run
    plain = yaml.safe_load((out / "runs" / _quick_runs()[0] / "recipe.yaml").read_text())["model"]
    assert plain["use_federated"] is False


def test_one_folder_holds_one_regime(tmp_path):
    from slsd_cli.demo.runner import Runner
    from slsd_cli.demo.settings import QUICK, REGIMES, parse_regime

    with pytest.raises(InputError, match="--regime must be one of"):
        parse_regime("longer")
    assert REGIMES["classes120"].apply(QUICK).classes == 120 and REGIMES["long"].apply(QUICK).teacher_iterations == 900
    (tmp_path / "demo_data.json").write_text(json.dumps({"classes": 40, "regime": "rfs"}))
    demo = demo_pipeline.Demo(tmp_path, QUICK, Runner(tmp_path, main), REGIMES["paper"])
    with pytest.raises(InputError, match="'rfs' regime"):
        demo.check_data_size()


def test_label_efficiency_writes_what_the_plot_reads(quick_demo, one_thread):
    from slsd_cli import plots

    out, _ = quick_demo
    report = run_demo(out, main, label_efficiency_mode=True, size=TINY, fractions=(0.5,)).read_text()
    files = sorted((out / "label_efficiency").glob("*.json"))
    assert [f.name for f in files] == ["onehot_frac0.5.json", "similarity_frac0.5.json", "uniform_frac0.5.json"]
    runs = plots.label_efficiency_runs(files)
    assert {(r.method, r.fraction) for r in runs} == {(TEACHERS[k].label, 0.5) for k in TEACHERS}
    assert json.loads(files[0].read_text())["seeds"] == [0]
    assert (out / "figures" / "label_efficiency.png").stat().st_size > 1000
    assert "label_efficiency.png" in report and (out / "split" / "train_frac0.5.json").exists()
    assert "--train-json " + str(out / "split" / "train_frac0.5.json") in report


def test_tuning_uses_the_held_out_split_never_val(quick_demo, tmp_path, monkeypatch, one_thread):
    import shutil

    defaults = demo_pipeline._defaults()
    eps, lam = defaults["similarity"]["smoothing.epsilon"], defaults["student"]["distill.lam"]
    # the quick demo's teacher and student are the first cells (reused); one more teacher is trained
    grids = {"SIMILARITY_TEACHER_GRID": Grid("similarity teacher", (Stage((("smoothing.epsilon", (eps, 0.2)),)),)),
             "UNIFORM_TEACHER_GRID": Grid("uniform teacher", ()),
             "STUDENT_GRID": Grid("student (soft targets)", (Stage((("distill.lam", (lam,)),)),),
                                  exclude=(("distill.lam", 0.0),))}
    for name, grid in grids.items():
        monkeypatch.setattr(demo_pipeline, name, grid)
    out, _ = quick_demo
    for part in ("data", "split", "retrieval", "prototypes.safetensors", "runs"):  # the quick demo's, reused
        copy = shutil.copytree if (out / part).is_dir() else shutil.copy2
        copy(out / part, tmp_path / part)
    (tmp_path / "data" / "val.json").unlink()  # any tuning step that reads val now fails
    report = run_demo(tmp_path, main, tune_only=True, size=TINY).read_text()
    assert "val.json" not in report
    tuning = json.loads((tmp_path / "tuning.json").read_text())
    assert set(tuning["chosen"]["similarity"]) == {"smoothing.epsilon", "smoothing.gamma", "smoothing.temperature"}
    assert tuning["chosen"]["student"]["distill.lam"] == lam
    cells = tuning["grids"][0]["cells"]
    assert [c["setting"]["smoothing.epsilon"] for c in cells] == [eps, 0.2] and sum(c["chosen"] for c in cells) == 1
    assert tuning["chosen"]["uniform"] == {"smoothing.epsilon": tuning["chosen"]["similarity"]["smoothing.epsilon"]}
    assert [g["name"] for g in tuning["grids"]] == ["similarity teacher", "student (soft targets)"]
    for cell in cells + tuning["grids"][-1]["cells"]:
        assert (tmp_path / "runs" / cell["run"] / "eval_holdout" / "metrics.json").exists()
    assert "## Held-out grid: similarity teacher" in report and "| eps | stage |" in report
    assert "## Held-out grid: student (soft targets)" in report and "PL/img" in report
    # each stage reports what it decided (the full demo queues the uniform teachers once ε is): rerun, all skipped
    from slsd_cli.demo.runner import Runner

    demo, calls = demo_pipeline.Demo(tmp_path, TINY, Runner(tmp_path, main)), []
    def cell(setting: dict, wait: bool = True):
        return demo.teacher(TEACHERS["similarity"], setting, 0, wait=wait)

    _, chosen = demo_pipeline.run_grid(demo, grids["SIMILARITY_TEACHER_GRID"], defaults["similarity"], cell,
                                       after_stage=lambda decided, now: calls.append((decided, dict(now))))
    assert calls == [({"smoothing.epsilon"}, chosen)] and all(step.skipped for step in demo.runner.steps)


def test_default_grids_are_the_trimmed_budget():
    """5 similarity teachers and 7 students: later stages add one new cell each (the other is the choice),
    the unlabeled-loss weight two (0.5 and the control 0, which is never chosen); both readings of Eq. 5
    and τ are in the grids."""
    from slsd_cli.demo.tuning import SIMILARITY_TEACHER_GRID, STUDENT_GRID

    def cells(grid: Grid, base: dict) -> int:
        seen: list[dict] = []
        chosen = dict(base)
        for stage in grid.stages:
            settings = stage_settings(stage, chosen)
            seen += [s for s in settings if s not in seen]
            chosen = settings[-1]
        return len(seen)

    defaults = demo_pipeline._defaults()
    assert cells(SIMILARITY_TEACHER_GRID, defaults["similarity"]) == 5
    assert cells(STUDENT_GRID, defaults["student"]) == 7
    assert "smoothing.temperature" in SIMILARITY_TEACHER_GRID.keys
    assert ("distill.correction_scope", ("all", "predicted")) in [a for st in STUDENT_GRID.stages for a in st.axes]
    assert ("distill.unsup_weight", 0.0) in STUDENT_GRID.exclude and ("distill.lam", 0.0) in STUDENT_GRID.exclude
    first = stage_settings(STUDENT_GRID.stages[0], defaults["student"])
    assert {(s["distill.threshold_on"], s["distill.ignore_low"], s["distill.background"]) for s in first} == {
        ("raw", None, "hard")}  # the "before" of the probe


def test_raw_vs_corrected_pairs_survive_later_stages():
    """The report's raw-vs-corrected line compares the two cells of that stage, even when a later stage
    (ignore band) moved the final choice away from both."""
    from slsd_cli.demo.tuning import differing_only_in

    def cell(run: str, on: str, ign: float | None, lam: float = 2.0) -> CellResult:
        return CellResult({"distill.lam": lam, "distill.threshold_on": on, "distill.ignore_low": ign}, {}, run, 0)

    cells = [cell("raw", "raw", None), cell("lam0", "raw", None, 0.0), cell("corr", "corrected", None),
             cell("corr_ign", "corrected", 0.1)]
    assert [[c.run for c in group] for group in differing_only_in(cells, "distill.threshold_on")] == [["raw", "corr"]]
