"""`slsd demo`: the whole pipeline on the embedded benchmark, the held-out grid, the paper's Table 1
with paired intervals, and the label-efficiency curves.

The demo is a script of ordinary `slsd` commands, run in this process one after the other (so it
lives in the commands layer: it calls the CLI), and every number in its report comes from the same
code a user runs; the report lists the exact commands to rerun any step alone. A step whose output
already exists is skipped (training steps resume from their last checkpoint), so a demo interrupted
or rerun in the same directory picks up where it was, and a run the grid trained is reused by the
table. The statistics, the grid's choice and the report are library code (`slsd_cli/demo/`).

Modes (combinable):
- quick (default): split 85/15 -> prototypes -> retrieve -> teacher (similarity smoothing, recipe
  defaults) -> calibrate on the held-out split -> distill (soft + calibration correction) -> eval
  on val -> paired val bootstrap -> plots -> report.md;
- `tune`: the held-out grid (`demo/tuning.py`) at the first seed: teachers trained on train.json
  and scored on holdout.json, then students of the chosen teacher; choices in tuning.json;
- `full`: `tune`, then Table 1 (3 teachers, 3 students) for every seed with the chosen settings;
- `label_efficiency`: one-hot / uniform / similarity teachers on nested labeled fractions
  (`slsd split --fraction`), scored on val, written for `slsd plot label-efficiency`.

Layout of OUT_DIR: data/ (synth), split/, prototypes*.safetensors, retrieval/, runs/<run>/ (each with
eval_val/ or eval_holdout/), tuning.json, bootstrap.npz, label_efficiency/, figures/, report.md.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from slsd_cli.data.synthetic import CALIB_FILE
from slsd_cli.demo.runner import Runner
from slsd_cli.demo import settings as S
from slsd_cli.demo import table
from slsd_cli.demo import findings
from slsd_cli.demo.diagnostics import (calibration_summary, correction_effect, peak_memory_mb, pseudo_label_counts,
                                       retrieval_quality, similarity_quality)
from slsd_cli.demo.premise import delta_intervals
from slsd_cli.demo.report import ReportInputs, render
from slsd_cli.demo.tuning import (SIMILARITY_TEACHER_GRID, STUDENT_GRID, UNIFORM_TEACHER_GRID, CellResult, Grid,
                                  along_axes, available, choose, differing_only_in,
                                  stage_settings)
from slsd_cli.errors import InputError
from slsd_cli.io import atomic_write_json, atomic_write_text, make_dirs, read_json
from slsd_cli.progress import info

# Prototypes and retrieval of the demo, chosen by measurement (issue 16; docs/demo.md). Prototypes:
# the packaged ImageNet EfficientNet-Lite0, mask-weighted, stride-16 level, at DemoSize.prototype_image_size
# (224: the objects cover few cells at 128) — Spearman of S vs the true attribute similarity 0.47,
# against 0.16 for the former random ResNet-18. Retrieval: the colour histogram (own-class enrichment
# of rare queries' neighbours 4.24x chance vs 2.55x for ImageNet Lite0 and 2.44x for a random ResNet-18).
PROTOTYPE_ARGS = ["--backbone", "efficientnet_lite0", "--mask-weighted", "--feature-level", "3"]
# `slsd synth`'s calibration split (issue 23): Δ is measured there when the data has it
CALIBRATION_FILE = CALIB_FILE
RETRIEVE_ARGS = ["--embedder", "colorhist"]
DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 1.0)
PREMISE_REPLICATES = 100  # bootstrap over calibration images for the teacher's Δ per group (its std: ~7% precise)


@dataclass
class Demo:
    """The demo's paths and size, and the commands that produce each kind of output."""

    out: Path
    size: S.DemoSize
    runner: Runner
    regime: S.Regime = S.REGIMES["paper"]

    def __post_init__(self) -> None:
        self.data = self.out / "data"            # slsd synth: train/val/pool json, classes.json, images/
        self.images = self.data / "images"
        self.split = self.out / "split"          # train.json (85%), holdout.json (15%), train_frac*.json
        self.runs = self.out / "runs"            # one folder per trained model, named by its setting
        self.retrieval = self.out / "retrieval"  # unlabeled.json, retrieval.jsonl

    @property
    def calibration_json(self) -> Path:
        """The split Δ is measured on: `slsd synth`'s calibration split (at least 5 images of every
        class, disjoint from train and val) when the data has one, else the held-out 15%."""
        synth = self.data / CALIBRATION_FILE
        return synth if synth.exists() else self.split / "holdout.json"

    @property
    def calibration_name(self) -> str:
        """'calib' (the synth calibration split) or 'holdout': the suffix of its eval / calibration files."""
        return "calib" if self.calibration_json.name == CALIBRATION_FILE else "holdout"

    def annotations(self, on: str) -> Path:
        """The annotations of a split the demo scores on: val, holdout or calib."""
        return {"val": self.data / "val.json", "holdout": self.split / "holdout.json",
                "calib": self.calibration_json}[on]

    def train_json(self, fraction: float = 1.0) -> Path:
        from slsd_cli.data.split import fraction_file_name

        return self.split / "train.json" if fraction >= 1 else self.split / fraction_file_name(fraction)

    def prototypes(self, fraction: float = 1.0) -> Path:
        return self.out / ("prototypes.safetensors" if fraction >= 1 else f"prototypes_frac{fraction:g}.safetensors")

    # ------------------------------------------------------------ data
    def check_data_size(self) -> None:
        """One folder, one dataset: refuse to mix runs of another data size into it."""
        size = self.size
        wanted = {"classes": size.classes, "train_images": size.train_images, "val_images": size.val_images,
                  "pool_images": size.pool_images, "calib_images": size.calib_images, "image_size": size.image_size}
        if self.regime.name != "paper":  # the record of a paper-regime folder stays as before regimes existed
            wanted["regime"] = self.regime.name
        record = self.out / "demo_data.json"
        if record.exists():
            have = read_json(record)
            if have.get("regime", "paper") != self.regime.name:
                raise InputError(f"this folder's runs are in the {have.get('regime', 'paper')!r} regime (asked "
                                 f"{self.regime.name!r}); use another --out-dir", path=self.out)
            if "calib_images" not in have:  # data from before the calibration split: Δ on the held-out split
                wanted.pop("calib_images")
            if have != wanted:
                diff = ", ".join(f"{k} {have.get(k)} (asked {v})" for k, v in wanted.items() if have.get(k) != v)
                raise InputError(f"this folder's data was generated with {diff}; use another --out-dir or the same "
                                 f"sizes", path=self.out)
        elif not (self.data / "classes.json").exists():
            atomic_write_json(record, wanted, indent=1)

    def prepare(self, fractions: tuple[float, ...] = ()) -> None:
        self.check_data_size()
        size, s = self.size, str
        self.runner.run("synth", ["synth", s(self.data), "--classes", s(size.classes), "--train-images",
                                  s(size.train_images), "--val-images", s(size.val_images), "--pool-images",
                                  s(size.pool_images), "--calib-images", s(size.calib_images), "--image-size",
                                  s(size.image_size), "--seed", "0"],
                        self.data / "classes.json")
        partial = [f for f in fractions if f < 1]
        argv = ["split", s(self.data / "train.json"), "--holdout", "0.15", "--seed", "0", "--out-dir", s(self.split)]
        for f in partial:
            argv += ["--fraction", f"{f:g}"]
        missing = [p for p in [self.split / "holdout.json"] + [self.train_json(f) for f in partial] if not p.exists()]
        if missing and (self.split / "holdout.json").exists():
            argv.append("--force")  # the same seed rewrites the same train/holdout, adding the fractions
        self.runner.run("split", argv, missing[0] if missing else self.split / "holdout.json")
        for f in (1.0, *partial):
            self.make_prototypes(f)
        unlabeled = self.retrieval / "unlabeled.json"
        self.runner.run("retrieve", ["retrieve", "--annotations", s(self.train_json()), "--images", s(self.images),
                                     "--pool", s(self.data / "pool.json"), "--pool-images", s(self.images),
                                     "--queries", "rare", "--k", s(size.retrieve_k), *RETRIEVE_ARGS,
                                     "--workers", "0", "--seed", "0", "--out", s(unlabeled)], unlabeled)

    def make_prototypes(self, fraction: float) -> None:
        out = self.prototypes(fraction)
        name = "prototypes" if fraction >= 1 else f"prototypes (fraction {fraction:g})"
        self.runner.run(name, ["prototypes", "--annotations", str(self.train_json(fraction)), "--images",
                               str(self.images), *PROTOTYPE_ARGS, "--image-size", str(self.size.prototype_image_size),
                               "--seed", "0", "--out", str(out)], out)

    # ------------------------------------------------------------ training and scoring
    def teacher(self, row: S.TeacherRow, setting: Mapping[str, Any], seed: int, fraction: float = 1.0,
                wait: bool = True) -> Path:
        """The teacher run of `row` at `setting` and `seed`, trained unless done (`wait=False`: queued,
        with --jobs > 1, while the caller goes on)."""
        knobs = {k: setting[k] for k in row.knobs if k in setting}
        name = S.teacher_run_name(row, knobs, seed)
        if fraction < 1:
            name = name.replace(f"_seed{seed}", f"_frac{fraction:g}_seed{seed}")
        run = self.runs / name
        argv = ["train-teacher", S.TEACHER_RECIPE, *self.regime.overrides, *S.overrides(knobs), "--train-json",
                str(self.train_json(fraction)), "--images", str(self.images), "--out-dir", str(run), "--smoothing",
                row.smoothing, "--iterations", str(self.size.teacher_iterations), "--seed", str(seed), "--resume"]
        if row.smoothing == "similarity":
            argv += ["--prototypes", str(self.prototypes(fraction))]
        (self.runner.run if wait else self.runner.submit)(name, argv, run / "model.safetensors")
        return run

    def calibrate_teacher(self, teacher: Path) -> Path:
        """A teacher's calibration.json (Δ of Eq. 5) on the calibration split (`calibration_json`),
        from its detections there. `teacher` may be a distillation run's EMA teacher (`RUN/teacher`)."""
        on = self.calibration_name
        self.evaluate(teacher, on, calibrate=False)
        out = teacher / f"calibration_{on}.json"
        self.runner.run(f"calibrate {_run_label(teacher)} on {on}",
                        ["calibrate", "--annotations", str(self.calibration_json), "--detections",
                         str(teacher / f"eval_{on}" / "detections.json"), "--out", str(out)], out)
        return out

    def calibrate_ema_teacher(self, student: Path) -> Path:
        """Δ drift: the distillation's EMA teacher at its end (`RUN/teacher`), calibrated on the same split."""
        self.runner.wait(student / "model.safetensors")
        return self.calibrate_teacher(student / "teacher")

    def student(self, targets: str, setting: Mapping[str, Any], teacher: Path, seed: int, wait: bool = True) -> Path:
        """A student of `teacher` at `setting`; its teacher's held-out calibration comes first (always
        waited for), then the distillation (`wait=False`: queued while the caller goes on)."""
        name = S.student_run_name(targets, setting, teacher.name)
        run = self.runs / name
        calibration = self.calibrate_teacher(teacher)
        argv = ["distill", S.DISTILL_RECIPE, *self.regime.overrides, *S.overrides(setting), "--teacher",
                str(teacher), "--unlabeled", str(self.retrieval / "unlabeled.json"), "--unlabeled-images",
                str(self.images), "--calibration", str(calibration), "--out-dir", str(run), "--targets", targets,
                "--iterations", str(self.size.distill_iterations), "--seed", str(seed), "--resume"]
        (self.runner.run if wait else self.runner.submit)(name, argv, run / "model.safetensors")
        return run

    def evaluate(self, run: Path, on: str, calibrate: bool = True, wait: bool = True) -> dict | None:
        """Score a run on val (with its calibration on val, for ECE, unless `calibrate` is False), on
        the held-out split or on the calibration split ('calib'); returns the metrics.json content
        (`wait=False`: only queues the scoring, returns None; the run must be trained)."""
        annotations = self.annotations(on)
        out = run / f"eval_{on}"
        self.runner.wait(run / "model.safetensors")
        argv = ["eval", "--annotations", str(annotations), "--checkpoint", str(run), "--images", str(self.images),
                "--out-dir", str(out)]
        if self.size.eval_max_dets != S.DemoSize.eval_max_dets:  # the default argv stays as the report lists it
            argv += ["--max-dets", str(self.size.eval_max_dets)]
        (self.runner.run if wait else self.runner.submit)(f"eval {_run_label(run)} on {on}", argv,
                                                          out / "metrics.json")
        if not wait:
            return None
        if on == "val" and calibrate:
            self.runner.run(f"calibrate {_run_label(run)} on val",
                            ["calibrate", "--annotations", str(annotations), "--detections",
                             str(out / "detections.json"), "--out", str(out / "calibration.json")],
                            out / "calibration.json")
        return read_json(out / "metrics.json")

    def plot(self, kind: str, args: list[str], out_name: str) -> str:
        out = self.out / "figures" / f"{out_name}.png"
        self.runner.run(f"plot {out_name}", ["plot", kind, *args, "--out", str(out)], out)
        return f"figures/{out_name}.png"


def _run_label(run: Path) -> str:
    """A run's name in step names: `RUN/teacher` (a distillation's EMA teacher) as 'RUN (EMA teacher)'."""
    return f"{run.parent.name} (EMA teacher)" if run.name == "teacher" else run.name


# ---------------------------------------------------------------- held-out grid


def run_grid(demo: Demo, grid: Grid, base: Mapping[str, Any], train_cell,
             after_stage: Callable[[set[str], dict], None] | None = None) -> tuple[list[CellResult], dict]:
    """Run a grid's stages (each cell: `train_cell(setting) -> run dir`, scored on holdout.json) and
    return its cells and the chosen setting. `after_stage(decided keys, chosen so far)` is called
    after each stage (a later stage never changes a key an earlier one decided)."""
    from slsd_cli.demo.table import metric_columns

    results: list[CellResult] = []
    chosen = dict(base)
    for index, stage in enumerate(grid.stages):
        stage_results = []
        settings = [s for s in stage_settings(stage, chosen) if not any(r.setting == s for r in results)]
        for setting in settings:  # with --jobs > 1 the stage's cells train side by side
            train_cell(setting, wait=False)
        for setting in settings:
            run = train_cell(setting)
            metrics = metric_columns(demo.evaluate(run, "holdout"))
            pl = pseudo_label_counts(run / "metrics.jsonl")  # all NaN for a teacher (nothing logged)
            stage_results.append(CellResult(setting, metrics, run.name, index,
                                            None if all(v != v for v in pl.values()) else pl))
        results += stage_results
        chosen = dict(choose(along_axes(results, chosen, stage.keys), grid.exclude).setting)
        if after_stage is not None:
            after_stage({k for done in grid.stages[:index + 1] for k in done.keys}, chosen)
    for r in results:
        r.chosen = r.setting == chosen
    return results, chosen


def tune(demo: Demo, seed: int, after_teachers=None) -> dict[str, Any]:
    """The held-out grids at `seed`; writes and returns tuning.json's content. `after_teachers(chosen,
    keys=...)` is called once the teachers' settings are chosen (the full demo queues Table 1's teachers
    there, so they train beside the student grid), and with keys=["uniform"] as soon as the similarity
    grid has chosen ε (the uniform teachers then train beside its γ and τ stages)."""
    grids = []
    sim_row = S.TEACHERS["similarity"]
    defaults = _defaults()
    def uniform_setting(chosen: Mapping[str, Any]) -> dict[str, Any]:
        # the uniform teacher takes the similarity grid's ε (no grid of its own: ~3 teacher runs saved)
        return {k: chosen[k] for k in defaults["uniform"] if k in chosen}

    def queue_uniform(decided: set[str], chosen: dict) -> None:
        # ε is decided by the first stage: the uniform teachers fill the core the one-cell γ and τ stages leave idle
        if after_teachers is not None and set(defaults["uniform"]) <= decided:
            after_teachers({"uniform": uniform_setting(chosen)}, keys=["uniform"])

    sim_cells, sim_chosen = run_grid(demo, SIMILARITY_TEACHER_GRID, defaults["similarity"],
                                     lambda setting, wait=True: demo.teacher(sim_row, setting, seed, wait=wait),
                                     after_stage=queue_uniform)
    grids.append((SIMILARITY_TEACHER_GRID, sim_cells, sim_chosen))
    uni_chosen = uniform_setting(sim_chosen)
    if after_teachers is not None:
        after_teachers({"similarity": sim_chosen, "uniform": uni_chosen})
    teacher = demo.teacher(sim_row, sim_chosen, seed)
    student_grid = available(STUDENT_GRID, defaults["student"])
    st_cells, st_chosen = run_grid(demo, student_grid, defaults["student"],
                                   lambda setting, wait=True: demo.student("soft", setting, teacher, seed, wait=wait))
    grids.append((student_grid, st_cells, st_chosen))
    result = {"seed": seed, "metric": "holdout segm AP",
              "chosen": {"similarity": sim_chosen, "uniform": uni_chosen, "student": st_chosen},
              "grids": [{"name": g.name, "cells": [_json_ready(vars(c)) for c in cells]} for g, cells, _ in grids]}
    atomic_write_json(demo.out / "tuning.json", result, indent=1)
    return result


def _json_ready(value: Any) -> Any:
    """NaN (an undefined AP) as null: json has no NaN."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return None if isinstance(value, float) and value != value else value


def _grids_from(tuning: Mapping[str, Any]) -> list[tuple[Grid, list[CellResult]]]:
    by_name = {g.name: g for g in (SIMILARITY_TEACHER_GRID, UNIFORM_TEACHER_GRID, STUDENT_GRID)}
    def cell(c: dict) -> CellResult:
        nan = float("nan")
        metrics = {k: nan if v is None else v for k, v in c["metrics"].items()}
        pl = None if c["pseudo_labels"] is None else {k: nan if v is None else v for k, v in c["pseudo_labels"].items()}
        return CellResult(**{**c, "metrics": metrics, "pseudo_labels": pl})
    out = []
    for g in tuning["grids"]:
        if g["name"] in by_name:
            cells = [cell(c) for c in g["cells"]]
            out.append((available(by_name[g["name"]], set(cells[0].setting) if cells else ()), cells))
    return out


def _defaults() -> dict[str, dict[str, Any]]:
    return {"similarity": S.recipe_defaults(S.TEACHERS["similarity"].knobs, S.TEACHER_RECIPE),
            "uniform": S.recipe_defaults(S.TEACHERS["uniform"].knobs, S.TEACHER_RECIPE),
            "student": S.recipe_defaults(S.STUDENT_KNOBS, S.DISTILL_RECIPE)}


# ---------------------------------------------------------------- Table 1


@dataclass
class TableRuns:
    rows: list[table.Row] = field(default_factory=list)
    runs: dict[tuple[str, int], Path] = field(default_factory=dict)  # (row label, seed) -> run dir
    pseudo: dict[str, list[dict]] = field(default_factory=dict)
    teacher_calibration: list[dict] = field(default_factory=list)  # similarity teacher on the calibration split, per seed
    premise: list[dict] = field(default_factory=list)      # per seed: group -> Interval of the teacher's mean Δ
    drift: list[dict] = field(default_factory=list)        # per seed: the corrected student's EMA teacher at the end


def table_one(demo: Demo, seeds: list[int], chosen: Mapping[str, dict], teacher_keys: list[str],
              student_keys: list[str]) -> TableRuns:
    """Train, score on val and collect the rows of Table 1 for every seed. Everything is queued as
    soon as what it reads exists, so with --jobs > 1 runs of different rows and seeds train side by
    side; the table is read in row order at the end."""
    out = TableRuns()
    similarity = S.TEACHERS["similarity"]
    for seed in seeds:  # 1. every seed's teachers
        for key in teacher_keys:
            demo.teacher(S.TEACHERS[key], chosen.get(key, {}), seed, wait=False)
    trained: dict[int, list[tuple[str, Path]]] = {}
    for seed in seeds:  # 2. a seed's students, once its similarity teacher is calibrated
        teacher = demo.teacher(similarity, chosen["similarity"], seed)
        out.teacher_calibration.append(calibration_summary(demo.calibrate_teacher(teacher)))
        out.premise.append(delta_intervals(demo.calibration_json,
                                           teacher / f"eval_{demo.calibration_name}" / "detections.json",
                                           replicates=PREMISE_REPLICATES))
        trained[seed] = [(S.TEACHERS[key].label, demo.teacher(S.TEACHERS[key], chosen.get(key, {}), seed, wait=False))
                         for key in teacher_keys]
        for key in student_keys:
            row = S.STUDENTS[key]
            trained[seed].append((row.label, demo.student(row.targets, row.setting(chosen["student"]), teacher, seed,
                                                          wait=False)))
    for seed in seeds:  # 3. each run scored on val as soon as it is trained
        for _, run in trained[seed]:
            demo.evaluate(run, "val", wait=False)
    calibrated = S.STUDENTS["calibrated"].label
    for seed in seeds:  # Δ drift: the corrected student's EMA teacher, calibrated on the same split
        for label, run in trained[seed]:
            if label == calibrated:
                out.drift.append(calibration_summary(demo.calibrate_ema_teacher(run)))
    student_labels = {S.STUDENTS[key].label for key in student_keys}
    rows: dict[str, table.Row] = {}
    for seed in seeds:
        for label, run in trained[seed]:
            metrics = demo.evaluate(run, "val")
            ece = read_json(run / "eval_val" / "calibration.json")["ece"]
            rows.setdefault(label, table.Row(label)).values[seed] = table.row_values(metrics, ece)
            out.runs[(label, seed)] = run
            if label in student_labels:
                out.pseudo.setdefault(label, []).append(pseudo_label_counts(run / "metrics.jsonl"))
    out.rows = list(rows.values())
    return out


def bootstrap(demo: Demo, runs: Mapping[tuple[str, int], Path], replicates: int) -> dict | None:
    """Paired bootstrap over val images of every run (cached in bootstrap.npz for the same runs)."""
    import numpy as np

    if replicates <= 0 or not runs:
        return None
    keys = sorted(runs, key=lambda k: (k[1], k[0]))
    cache = demo.out / "bootstrap.npz"
    def stamp(k: tuple[str, int]) -> list:
        stat = (runs[k] / "eval_val" / "detections.json").stat()
        return [k[0], k[1], runs[k].name, stat.st_size, stat.st_mtime_ns]
    signature = json.dumps({"replicates": replicates, "runs": [stamp(k) for k in keys]})
    if cache.exists():
        stored = np.load(cache, allow_pickle=False)
        if str(stored["signature"]) == signature:
            return {k: stored[f"run{i}"] for i, k in enumerate(keys)}
    from slsd_cli.data.lvis import load_annotations
    from slsd_cli.evaluation.bootstrap import bootstrap_metrics
    from slsd_cli.io import atomic_path
    from slsd_cli.data.results import read_results

    info(f"[bold cyan]demo:[/bold cyan] bootstrap over val images: {replicates} replicates × {len(keys)} runs")
    annotations = load_annotations(demo.data / "val.json")
    detections = {f"run{i}": read_results(runs[k] / "eval_val" / "detections.json", annotations)
                  for i, k in enumerate(keys)}
    workers = min(os.cpu_count() or 1, 4) if replicates * len(keys) >= 200 else 1  # tiny runs: no fork
    samples = bootstrap_metrics(annotations, detections, replicates=replicates, seed=0,
                                keys=table.BOOTSTRAP_COLUMNS, workers=workers)
    samples = {name: 100.0 * values for name, values in samples.items()}
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, signature=np.array(signature), **samples)
    return {k: samples[f"run{i}"] for i, k in enumerate(keys)}


# ---------------------------------------------------------------- label efficiency


def label_efficiency(demo: Demo, seeds: list[int], chosen: Mapping[str, dict],
                     fractions: tuple[float, ...]) -> str:
    """Teachers (one-hot, uniform, similarity) on each labeled fraction, scored on val; one file per
    (method, fraction) with `method`, `labeled_fraction` and the seeds' mean metrics, as
    `slsd plot label-efficiency` reads them; returns the figure's path."""
    folder = demo.out / "label_efficiency"
    files = []
    for key in ("onehot", "uniform", "similarity"):  # queued first: with --jobs > 1 they train side by side
        for fraction in fractions:
            for seed in seeds:
                demo.teacher(S.TEACHERS[key], chosen.get(key, {}), seed, fraction, wait=False)
    for key in ("onehot", "uniform", "similarity"):
        row = S.TEACHERS[key]
        for fraction in fractions:
            per_seed = [demo.evaluate(demo.teacher(row, chosen.get(key, {}), seed, fraction), "val", calibrate=False)
                        for seed in seeds]
            path = folder / f"{key}_frac{fraction:g}.json"
            atomic_write_json(path, _mean_metrics(per_seed, row.label, fraction, seeds), indent=1)
            files.append(str(path))
    return demo.plot("label-efficiency", files, "label_efficiency")


def _mean_metrics(per_seed: list[dict], method: str, fraction: float, seeds: list[int]) -> dict:
    """Summary metrics averaged over seeds (a value undefined in any seed stays -1)."""
    out: dict[str, Any] = {"method": method, "labeled_fraction": fraction, "seeds": seeds}
    for iou_type in ("segm", "bbox"):
        keys = [k for k, v in per_seed[0].get(iou_type, {}).items() if isinstance(v, (int, float))]
        out[iou_type] = {}
        for key in keys:
            values = [m[iou_type][key] for m in per_seed]
            out[iou_type][key] = -1.0 if any(v < 0 for v in values) else sum(values) / len(values)
        out[iou_type]["per_seed"] = {str(s): {k: m[iou_type][k] for k in keys} for s, m in zip(seeds, per_seed)}
    return out


# ---------------------------------------------------------------- the demo


def run_demo(out_dir: Path, run_command: Callable[[list[str]], int], *, full: bool = False,
             tune_only: bool = False, label_efficiency_mode: bool = False, seeds: list[int] | None = None,
             size: S.DemoSize | None = None, fractions: tuple[float, ...] = DEFAULT_FRACTIONS, jobs: int = 1,
             regime: S.Regime = S.REGIMES["paper"]) -> Path:
    """Run the demo in `out_dir` and return the path of its report. `run_command(argv) -> exit code`
    runs one `slsd` command in this process (the CLI's `main`); `jobs`: steps run at once, in child
    processes sharing the cores; 1 = one after the other in this process. `regime`: its recipe overrides go
    to every training (its size changes are the caller's: `size` is used as given)."""
    runner = Runner(Path(out_dir), run_command, jobs=jobs)
    try:
        return _run_demo(runner, full=full, tune_only=tune_only, label_efficiency_mode=label_efficiency_mode,
                         seeds=seeds, size=size, fractions=fractions, regime=regime)
    finally:
        runner.close()  # children still running after an error or an interrupt are stopped (training resumes)


def _run_demo(runner: Runner, *, full: bool, tune_only: bool, label_efficiency_mode: bool, seeds: list[int] | None,
              size: S.DemoSize | None, fractions: tuple[float, ...], regime: S.Regime) -> Path:
    started = time.perf_counter()
    out_dir = runner.out_dir
    make_dirs(out_dir)  # a read-only or blocked location: the one-line error
    size = size or (S.FULL if full or tune_only or label_efficiency_mode else S.QUICK)
    seeds = seeds or ([0, 1, 2] if full else [0])
    demo = Demo(out_dir, size, runner, regime)
    demo.prepare(fractions if label_efficiency_mode else ())
    mode = "full" if full else "tune" if tune_only else "label-efficiency" if label_efficiency_mode else "quick"

    chosen = _defaults()
    grids: list[tuple[Grid, list[CellResult]]] = []
    teacher_keys = list(S.TEACHERS) if full else ["similarity"]
    student_keys = list(S.STUDENTS) if full else ["calibrated"]

    def queue_table_teachers(teachers_chosen: Mapping[str, dict], keys: list[str] = teacher_keys) -> None:
        for seed in seeds:  # Table 1's teachers need only the teachers' choice: they train beside the grid
            for key in keys:
                demo.teacher(S.TEACHERS[key], teachers_chosen.get(key, {}), seed, wait=False)

    if full:  # the one-hot teachers have no knob to choose: queued at once, they fill the cores from the start
        queue_table_teachers({}, keys=[key for key in teacher_keys if not S.TEACHERS[key].knobs])
    if full or tune_only:
        tuning = tune(demo, seeds[0], after_teachers=queue_table_teachers if full else None)
        chosen, grids = tuning["chosen"], _grids_from(tuning)
    elif (out_dir / "tuning.json").exists():  # a finished grid in this folder: use its choices
        tuning = read_json(out_dir / "tuning.json")
        chosen, grids = tuning["chosen"], _grids_from(tuning)

    by_grid = {SIMILARITY_TEACHER_GRID.name: chosen["similarity"], UNIFORM_TEACHER_GRID.name: chosen["uniform"],
               STUDENT_GRID.name: chosen["student"]}
    inputs = ReportInputs(mode, size, seeds, [], grids=grids, chosen=by_grid if grids else {})
    figures: list[tuple[str, str]] = []
    if not tune_only and (full or not label_efficiency_mode):
        runs = table_one(demo, seeds, chosen, teacher_keys, student_keys)
        inputs.rows, inputs.pseudo_labels = runs.rows, runs.pseudo
        inputs.bootstrap = bootstrap(demo, runs.runs, size.bootstrap)
        teacher_label, student_label = S.TEACHERS["similarity"].label, S.STUDENTS["calibrated"].label
        inputs.answer = (student_label, teacher_label, S.STUDENTS["soft"].label if full else None)
        inputs.control = S.STUDENTS["control"].label if full else None
        figures += _table_figures(demo, runs.runs[(teacher_label, seeds[0])], runs.runs[(student_label, seeds[0])])
        inputs.diagnostics = _diagnostics(demo, runs, teacher_label, student_label, grids, chosen["similarity"])
        inputs.premise = findings.premise_lines(runs.premise, seeds, _split_text(demo))
        inputs.correction = findings.correction_lines(_correction_effects(demo, runs, grids))
    if label_efficiency_mode:
        figures.append(("AP and APr against the labeled fraction (paper Fig. 2)",
                        label_efficiency(demo, seeds, chosen, fractions)))
    inputs.setup = _setup(demo, mode, chosen)
    inputs.figures = figures
    inputs.steps = demo.runner.steps
    inputs.elapsed_s = time.perf_counter() - started
    inputs.peak_memory_mb = peak_memory_mb()
    report = out_dir / "report.md"
    atomic_write_text(report, render(inputs))
    info(f"[green]demo finished in {inputs.elapsed_s / 60:.1f} min[/green]; report: {report}")
    return report


def _table_figures(demo: Demo, teacher: Path, student: Path) -> list[tuple[str, str]]:
    s = str
    train = demo.train_json()
    return [
        ("Reliability on val: teacher (similarity smoothing) and student (soft + correction), paper Fig. 3",
         demo.plot("reliability", [s(teacher / "eval_val" / "calibration.json"),
                                   s(student / "eval_val" / "calibration.json"), "--labels", "teacher,student"],
                   "reliability")),
        ("Per-class mask AP against training instances, teacher (hollow) and student (filled), paper Fig. 4 (group "
         "lines: plain means of per-class AP over the training split's r/c/f groups, so they differ from the table)",
         demo.plot("ap-vs-frequency", [s(teacher / "eval_val" / "metrics.json"), s(student / "eval_val" / "metrics.json"),
                                       "--labels", "teacher,student", "--annotations", s(train)], "ap_vs_frequency")),
        ("Student predictions on val (paper Fig. 5)",
         demo.plot("predictions", [s(student / "eval_val" / "detections.json"), "--images", s(demo.images),
                                   "--annotations", s(demo.data / "val.json"), "--max-images", "4", "--score", "0.5",
                                   "--labels", "student (soft + correction)"],
                   "predictions")),
    ]


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def _split_text(demo: Demo) -> str:
    if demo.calibration_name == "calib":
        return f"`data/{CALIBRATION_FILE}`, slsd synth's calibration split: at least 5 images of every class"
    return "`split/holdout.json`, the 15% held out (the data has no synth calibration split)"


def _correction_effects(demo: Demo, runs: TableRuns, grids: list[tuple[Grid, list[CellResult]]]
                        ) -> list[tuple[str, dict]]:
    """The measured effect of Eq. 5 for the Table 1 students (mean over seeds) and for the student grid's
    cells that differ from the choice only in the scope (both readings of Eq. 5)."""
    out = []
    for key in ("soft", "calibrated"):
        label = S.STUDENTS[key].label
        effect = findings.mean_effect([correction_effect(run / "metrics.jsonl")
                                       for (row, _), run in runs.runs.items() if row == label])
        if effect:
            out.append((f"{label} (Table 1, mean over seeds)", effect))
    for grid, cells in grids:
        for group in differing_only_in(cells, "distill.correction_scope"):
            for cell in group:
                effect = correction_effect(demo.runs / cell.run / "metrics.jsonl")
                if effect:
                    out.append((f"held-out grid: scope {cell.setting['distill.correction_scope']}, λ "
                                f"{S.format_value(cell.setting.get('distill.lam'))} (held-out AP "
                                f"{_fmt(cell.metrics['AP'], 1)})", effect))
    return out


def _diagnostics(demo: Demo, runs: TableRuns, teacher_label: str, student_label: str,
                 grids: list[tuple[Grid, list[CellResult]]], smoothing: Mapping[str, Any]) -> list[str]:
    from slsd_cli.labels.similarity_check import smoothing_quality
    from slsd_cli.stats import mean_std

    lines = []
    cal = runs.teacher_calibration
    if cal:
        def group(key: str, scale: float = 1.0, digits: int = 3) -> str:
            mean, std, n = mean_std([scale * c[key] for c in cal])
            return _fmt(mean, digits) + ("" if n < 2 else f" ± {std:.{digits}f}")
        lines.append(f"- **Teacher calibration** on the calibration split (what Eq. 5 corrects; Δ < 0 "
                     f"over-confident; intervals: the premise table at the top): mean CCECE Δ rare {group('delta_r')}, "
                     f"common {group('delta_c')}, frequent {group('delta_f')}; ECE {group('ece', 100.0, 1)}% (the "
                     f"paper's teacher: 22%).")
    lines += findings.drift_lines(cal, runs.drift, demo.calibration_json.name)
    spearman = similarity_quality(demo.prototypes(), demo.data / "classes.json")
    lines.append(f"- **Class similarity**: Spearman correlation between the prototype similarity S and the classes' "
                 f"true attribute similarity (`classes.json`): {_fmt(spearman)} (1 = same ranking; about 0 = S is "
                 f"noise, and similarity smoothing is then uniform smoothing).")
    knobs = {**S.recipe_defaults(S.TEACHERS["similarity"].knobs, S.TEACHER_RECIPE), **smoothing}
    quality = smoothing_quality(demo.prototypes(), demo.data / "classes.json", knobs["smoothing.epsilon"],
                                knobs["smoothing.gamma"], knobs.get("smoothing.temperature", 1.0))
    lines += findings.smoothing_lines(quality, knobs)
    teacher_row = next(r for r in runs.rows if r.label == teacher_label)
    student_row = next(r for r in runs.rows if r.label == student_label)
    ece_t = mean_std(teacher_row.column("ECE", list(teacher_row.values)))
    ece_s = mean_std(student_row.column("ECE", list(student_row.values)))
    lines.append(f"- **ECE on val**: teacher {_fmt(ece_t[0], 1)}%, student (soft + correction) {_fmt(ece_s[0], 1)}% "
                 f"(paper: 22% → 7%).")
    q = retrieval_quality(demo.retrieval, demo.data / "pool_gt.json")
    lines.append(f"- **Retrieval** (rare-class queries, {RETRIEVE_ARGS[-1]} embedder): own-class enrichment of the "
                 f"neighbours {_fmt(q['enrichment'])}× chance; {q['retrieved']} of {q['pool']} pool images retrieved, "
                 f"{100 * q['rare_share']:.1f}% of them hold a rare class against {100 * q['pool_rare_share']:.1f}% of "
                 f"the pool ({_fmt(q['rare_enrichment'])}×).")
    pl = runs.pseudo.get(student_label)
    if pl:
        rare = mean_std([p["r"] for p in pl])[0]
        total = mean_std([p["all"] for p in pl])[0]
        lines.append(f"- **Rare pseudo-labels**: the corrected student saw {_fmt(rare)} rare-class pseudo-labels per "
                     f"unlabeled image out of {_fmt(total)} (pseudo-label table above; per cell in the student grid).")
    for grid, cells in grids:
        for line in differing_only_in(cells, "distill.threshold_on"):
            parts = [f"on the {c.setting['distill.threshold_on']} score {_fmt(c.pseudo_labels['r'])} rare of "
                     f"{_fmt(c.pseudo_labels['all'])} (held-out AP {_fmt(c.metrics['AP'], 1)}, APr "
                     f"{_fmt(c.metrics['APr'], 1)})" for c in line if c.pseudo_labels]
            same = ", ".join(f"`{k}={S.format_value(v)}`" for k, v in line[0].setting.items()
                             if k != "distill.threshold_on")
            lines.append(f"- **Threshold on the raw or the corrected score** (held-out grid, {same}; pseudo-labels "
                         f"per unlabeled image): " + "; ".join(parts) + ".")
    return lines


def _setup(demo: Demo, mode: str, chosen: Mapping[str, dict]) -> list[str]:
    size = demo.size
    lines = []
    if (demo.split / "train.json").exists():
        def groups(path: Path) -> str:
            from slsd_cli.data.lvis import FREQUENCY_GROUPS, GROUP_NAMES

            classes = read_json(path)["categories"]
            count = {g: sum(c["frequency"] == g for c in classes) for g in FREQUENCY_GROUPS}
            return ", ".join(f"{count[g]} {GROUP_NAMES[g]}" for g in FREQUENCY_GROUPS)
        lines.append(f"- Data (`slsd synth`): {size.classes} classes — {groups(demo.split / 'train.json')} in the "
                     f"training split the models learn from; {size.train_images} training images (85% train, 15% "
                     f"held out), {size.val_images} val, {size.pool_images} pool images of {size.image_size}²."
                     + (f" The table's APr/APc/APf use val.json's groups ({groups(demo.data / 'val.json')}; counted on "
                        f"all {size.train_images} training images), Fig. 4 the training split's."
                        if mode not in ("tune", "label-efficiency") else ""))
    if demo.regime.name != "paper":
        regime = demo.regime
        lines.append(f"- Regime `{regime.name}` (`slsd demo --regime {regime.name}`): {regime.description}"
                     + (f"; every training gets `{' '.join(regime.overrides)}`" if regime.overrides else "")
                     + ".")
    recipe = S.recipe_defaults(["model.backbone", "model.pretrained"], S.TEACHER_RECIPE)
    lines.append(f"- Detector: `{S.TEACHER_RECIPE}` recipe (backbone `{recipe.get('model.backbone')}`, pretrained: "
                 f"{recipe.get('model.pretrained')}), {size.teacher_iterations} teacher and {size.distill_iterations} "
                 f"student iterations. Prototypes: `slsd prototypes {' '.join(PROTOTYPE_ARGS)}`.")
    lines.append("- Settings used: similarity teacher " + _setting_text(chosen["similarity"]) + "; uniform teacher "
                 + _setting_text(chosen["uniform"]) + " (the similarity teacher's ε); students " + _setting_text(chosen["student"])
                 + " (λ = 0 for the one-hot and soft rows)"
                 + (" — chosen on the held-out grid below." if mode in ("full", "tune") or
                    (demo.out / "tuning.json").exists() else " — the recipes' defaults (no grid run here)."))
    return lines


def _setting_text(setting: Mapping[str, Any]) -> str:
    return ", ".join(f"`{k}={S.format_value(v)}`" for k, v in setting.items()) or "(no knobs)"
