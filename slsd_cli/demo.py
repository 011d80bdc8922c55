"""`slsd demo`: the whole pipeline on the embedded benchmark, and the paper's Table 1 ablation.

The demo is a script of ordinary `slsd` commands, run in this process one after the other, so every
number in its report comes from the same code a user runs, and the report lists the exact commands
to rerun any step alone. A step whose output already exists is skipped (training steps resume from
their last checkpoint), so a demo interrupted or rerun in the same directory picks up where it was.

Quick (default): split 85/15 -> prototypes -> teacher (similarity smoothing) -> calibrate on the
held-out split -> retrieve from the pool -> distill (soft + calibration correction) -> eval on val
-> plots -> report.md.
Full (`--full`): Table 1 — supervised one-hot / + uniform / + similarity smoothing, and
semi-supervised one-hot / soft / soft + calibration, each over several seeds (mean ± std).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from slsd_cli.errors import InputError
from slsd_cli.io import atomic_write_text, read_json, read_jsonl
from slsd_cli.progress import info


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is. `quick` fits 10 minutes on 2 CPU cores; tests use smaller ones."""

    classes: int = 40
    train_images: int = 500
    val_images: int = 100
    pool_images: int = 300
    image_size: int = 128
    teacher_iterations: int = 300
    distill_iterations: int = 150
    retrieve_k: int = 8


QUICK = DemoSize()
FULL = DemoSize()  # every row of Table 1, same schedule as the quick demo, over 2 seeds


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    label: str
    smoothing: str  # none | uniform | similarity


@dataclass(frozen=True)
class StudentSpec:
    name: str
    label: str
    targets: str  # onehot | soft
    lam: float


TEACHERS = {
    "onehot": TeacherSpec("teacher_onehot", "Supervised, one-hot", "none"),
    "uniform": TeacherSpec("teacher_uniform", "Supervised + uniform smoothing", "uniform"),
    "similarity": TeacherSpec("teacher_similarity", "Supervised + similarity smoothing", "similarity"),
}
STUDENTS = {
    "onehot": StudentSpec("student_onehot", "Semi-supervised, one-hot pseudo-labels", "onehot", 0.0),
    "soft": StudentSpec("student_soft", "+ soft pseudo-labels", "soft", 0.0),
    "calibrated": StudentSpec("student_calibrated", "+ soft pseudo-labels + calibration correction", "soft", 2.0),
}


@dataclass
class Step:
    name: str
    argv: list[str]
    done_marker: Path
    skipped: bool = False
    seconds: float = 0.0


@dataclass
class DemoRun:
    out_dir: Path
    size: DemoSize
    seeds: list[int]
    full: bool
    steps: list[Step] = field(default_factory=list)

    def run(self, name: str, argv: list[str], done_marker: Path) -> None:
        """Run one `slsd` command unless its output already exists."""
        from slsd_cli.cli import main

        step = Step(name, argv, done_marker)
        self.steps.append(step)
        if done_marker.exists():
            step.skipped = True
            info(f"[dim]demo: {name}: done before, skipped[/dim]")
            return
        info(f"[bold cyan]demo:[/bold cyan] {name}: slsd {' '.join(argv)}")
        start = time.perf_counter()
        code = main(argv)
        step.seconds = time.perf_counter() - start
        if code != 0:
            raise InputError(f"step '{name}' failed with exit code {code} (command: slsd {' '.join(argv)})",
                             path=self.out_dir)


def _metric(metrics: dict, iou_type: str, key: str) -> float:
    value = metrics.get(iou_type, {}).get(key, -1.0)
    return float("nan") if value is None or value < 0 else 100.0 * float(value)


def _mean_std(values: list[float]) -> str:
    clean = [v for v in values if v == v]
    if not clean:
        return "n/a"
    if len(clean) == 1:
        return f"{clean[0]:.1f}"
    return f"{statistics.mean(clean):.1f} ± {statistics.stdev(clean):.1f}"


def run_demo(out_dir: Path, full: bool = False, seeds: list[int] | None = None,
             size: DemoSize | None = None) -> Path:
    """Run the demo in `out_dir` and return the path of its report."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = size or (FULL if full else QUICK)
    seeds = seeds or ([0, 1] if full else [0])
    demo = DemoRun(out_dir, size, seeds, full)
    data = out_dir / "data"
    images = data / "images"
    split = out_dir / "split"
    s = str

    demo.run("synth", ["synth", s(data), "--classes", s(size.classes), "--train-images", s(size.train_images),
                       "--val-images", s(size.val_images), "--pool-images", s(size.pool_images),
                       "--image-size", s(size.image_size), "--seed", "0"], data / "classes.json")
    demo.run("split", ["split", s(data / "train.json"), "--holdout", "0.15", "--seed", "0",
                       "--out-dir", s(split)], split / "holdout.json")
    prototypes = out_dir / "prototypes.safetensors"
    demo.run("prototypes", ["prototypes", "--annotations", s(split / "train.json"), "--images", s(images),
                            "--backbone", "resnet18", "--random-init", "--image-size", s(size.image_size),
                            "--seed", "0", "--out", s(prototypes)], prototypes)
    unlabeled = out_dir / "retrieval" / "unlabeled.json"
    demo.run("retrieve", ["retrieve", "--annotations", s(split / "train.json"), "--images", s(images),
                          "--pool", s(data / "pool.json"), "--pool-images", s(images), "--queries", "rare",
                          "--k", s(size.retrieve_k), "--embedder", "colorhist", "--workers", "0",
                          "--seed", "0", "--out", s(unlabeled)], unlabeled)

    teacher_keys = list(TEACHERS) if full else ["similarity"]
    student_keys = list(STUDENTS) if full else ["calibrated"]
    rows: dict[str, list[dict]] = {}
    pseudo: dict[str, list[dict]] = {}
    for seed in seeds:
        runs = out_dir / f"seed{seed}"
        trained: dict[str, Path] = {}
        for key in teacher_keys:
            spec = TEACHERS[key]
            run_dir = runs / spec.name
            argv = ["train-teacher", "synthetic_tiny", "--train-json", s(split / "train.json"),
                    "--images", s(images), "--out-dir", s(run_dir), "--smoothing", spec.smoothing,
                    "--iterations", s(size.teacher_iterations), "--seed", s(seed), "--resume"]
            if spec.smoothing == "similarity":
                argv += ["--prototypes", s(prototypes)]
            demo.run(f"{spec.name} (seed {seed})", argv, run_dir / "model.safetensors")
            trained[spec.label] = run_dir
        teacher = runs / TEACHERS["similarity"].name
        holdout_cal = teacher / "calibration_holdout.json"
        demo.run(f"calibrate teacher on held-out (seed {seed})",
                 ["calibrate", "--annotations", s(split / "holdout.json"), "--checkpoint", s(teacher),
                  "--images", s(images), "--out", s(holdout_cal)], holdout_cal)
        for key in student_keys:
            spec = STUDENTS[key]
            run_dir = runs / spec.name
            demo.run(f"{spec.name} (seed {seed})",
                     ["distill", "synthetic_tiny_distill", "--teacher", s(teacher), "--unlabeled", s(unlabeled),
                      "--unlabeled-images", s(images), "--calibration", s(holdout_cal), "--out-dir", s(run_dir),
                      "--targets", spec.targets, "--lambda", s(spec.lam), "--iterations",
                      s(size.distill_iterations), "--seed", s(seed), "--resume"], run_dir / "model.safetensors")
            trained[spec.label] = run_dir
            pseudo.setdefault(spec.label, []).append(_pseudo_label_counts(run_dir / "metrics.jsonl"))
        for label, run_dir in trained.items():
            evaluation = run_dir / "eval_val"
            demo.run(f"eval {run_dir.name} (seed {seed})",
                     ["eval", "--annotations", s(data / "val.json"), "--checkpoint", s(run_dir), "--images",
                      s(images), "--out-dir", s(evaluation)], evaluation / "metrics.json")
            demo.run(f"calibrate {run_dir.name} on val (seed {seed})",
                     ["calibrate", "--annotations", s(data / "val.json"), "--detections",
                      s(evaluation / "detections.json"), "--out", s(evaluation / "calibration.json")],
                     evaluation / "calibration.json")
            metrics = read_json(evaluation / "metrics.json")
            calibration = read_json(evaluation / "calibration.json")
            rows.setdefault(label, []).append({"seed": seed, "metrics": metrics, "ece": calibration["ece"],
                                               "run": run_dir})

    first = out_dir / f"seed{seeds[0]}"
    teacher_dir = first / TEACHERS["similarity"].name
    student_dir = first / STUDENTS["calibrated"].name
    figures = out_dir / "figures"
    demo.run("plot reliability", ["plot", "reliability", s(teacher_dir / "eval_val" / "calibration.json"),
                                  s(student_dir / "eval_val" / "calibration.json"), "--labels", "teacher,student",
                                  "--out", s(figures / "reliability.png")], figures / "reliability.png")
    demo.run("plot ap-vs-frequency", ["plot", "ap-vs-frequency", s(student_dir / "eval_val" / "metrics.json"),
                                      "--annotations", s(split / "train.json"), "--iou-type", "segm",
                                      "--out", s(figures / "ap_vs_frequency.png")], figures / "ap_vs_frequency.png")
    demo.run("plot predictions", ["plot", "predictions", s(student_dir / "eval_val" / "detections.json"),
                                  "--images", s(images), "--annotations", s(data / "val.json"),
                                  "--max-images", "4", "--score", "0.5", "--out", s(figures / "predictions.png")],
             figures / "predictions.png")

    report = out_dir / "report.md"
    elapsed = time.perf_counter() - started
    atomic_write_text(report, _report(demo, rows, pseudo, data, unlabeled, elapsed))
    info(f"[green]demo finished in {elapsed / 60:.1f} min[/green]; report: {report}")
    return report


def _pseudo_label_counts(metrics_path: Path) -> dict:
    """Mean pseudo-labels per unlabeled image over a distillation run, overall and per r/c/f group
    of the detected class (from the run's metrics.jsonl log windows)."""
    keys = {"all": "pl_per_image", "r": "pl_per_image_r", "c": "pl_per_image_c", "f": "pl_per_image_f",
            "confidence": "pl_confidence"}
    records = [r for r in read_jsonl(metrics_path) if "pl_per_image" in r]
    if not records:
        return {k: float("nan") for k in keys}
    return {k: statistics.mean(float(r.get(key, 0.0)) for r in records) for k, key in keys.items()}


def _peak_memory_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0  # Linux reports KiB


def _retrieval_quality(data: Path, unlabeled: Path) -> str:
    """Share of retrieved pool images holding a rare class, against the whole pool's share."""
    gt = read_json(data / "pool_gt.json")
    rare = {c["id"] for c in gt["categories"] if c.get("frequency") == "r"}
    with_rare = {a["image_id"] for a in gt["annotations"] if a["category_id"] in rare}
    pool_ids = [img["id"] for img in gt["images"]]
    chosen = [img["id"] for img in read_json(unlabeled)["images"]]
    if not chosen or not pool_ids:
        return "no images retrieved"
    share = sum(i in with_rare for i in chosen) / len(chosen)
    base = sum(i in with_rare for i in pool_ids) / len(pool_ids)
    ratio = f"{share / base:.2f}×" if base else "n/a"
    return (f"{len(chosen)} of {len(pool_ids)} pool images retrieved; {100 * share:.1f}% of them hold a rare "
            f"class against {100 * base:.1f}% of the whole pool ({ratio}).")


def _report(demo: DemoRun, rows: dict[str, list[dict]], pseudo: dict[str, list[dict]], data: Path,
            unlabeled: Path, elapsed: float) -> str:
    classes = read_json(data / "train.json")["categories"]
    groups = {g: sum(c["frequency"] == g for c in classes) for g in "rcf"}
    lines = [
        "# slsd demo report",
        "",
        f"{'Full ablation (paper Table 1)' if demo.full else 'Quick pipeline'} on the embedded benchmark "
        f"(`slsd synth`: {demo.size.classes} classes — {groups['r']} rare, {groups['c']} common, {groups['f']} "
        f"frequent; {demo.size.train_images} training, {demo.size.val_images} val, {demo.size.pool_images} pool "
        f"images of {demo.size.image_size}²). Random-init backbones: no pretrained weights are used.",
        "",
        f"- Seeds: {', '.join(map(str, demo.seeds))} (training seeds; the data is generated with seed 0). "
        + ("Each cell is mean ± standard deviation over the seeds." if len(demo.seeds) > 1 else
           "One seed: the variation between seeds is not measured here; pass `--seeds 0,1,2` to measure it."),
        f"- Wall time: {elapsed / 60:.1f} min this invocation "
        f"({sum(st.skipped for st in demo.steps)} of {len(demo.steps)} steps were already done and skipped); "
        f"peak memory {_peak_memory_mb():.0f} MB.",
        f"- Machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
        f"torch {__import__('torch').__version__}.",
        f"- Retrieval (colour-histogram embedder, rare-class queries): {_retrieval_quality(data, unlabeled)}",
        "",
        "## Results on val (mask AP, %; ECE of the detection confidences on val)",
        "",
        "| Model | AP | APr | APc | APf | box AP | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, entries in rows.items():
        def cell(iou_type: str, key: str) -> str:
            return _mean_std([_metric(e["metrics"], iou_type, key) for e in entries])
        ece = _mean_std([100.0 * e["ece"] for e in entries])
        lines.append(f"| {label} | {cell('segm', 'AP')} | {cell('segm', 'APr')} | {cell('segm', 'APc')} | "
                     f"{cell('segm', 'APf')} | {cell('bbox', 'AP')} | {ece} |")
    lines += ["", "ECE is in percent. Per-seed values are in each run's `eval_val/metrics.json`.", ""]
    if pseudo:
        lines += ["## Pseudo-labels per unlabeled image (mean over training; group of the detected class)",
                  "", "| Student | all | rare | common | frequent | mean confidence |", "|---|---|---|---|---|---|"]
        for label, entries in pseudo.items():
            def avg(key: str) -> str:
                values = [e[key] for e in entries if e[key] == e[key]]
                if not values:
                    return "n/a"
                spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
                return f"{statistics.mean(values):.2f}{spread}"
            lines.append(f"| {label} | {avg('all')} | {avg('r')} | {avg('c')} | {avg('f')} | {avg('confidence')} |")
        lines.append("")
    lines += ["## Figures", "", "![reliability](figures/reliability.png)",
              "![AP vs frequency](figures/ap_vs_frequency.png)", "![predictions](figures/predictions.png)", "",
              "## Steps (rerun any of them alone)", "", "| step | seconds | command |", "|---|---|---|"]
    for st in demo.steps:
        seconds = "skipped" if st.skipped else f"{st.seconds:.0f}"
        lines.append(f"| {st.name} | {seconds} | `slsd {' '.join(st.argv)}` |")
    lines.append("")
    return "\n".join(lines)


def parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise InputError(f"--seeds must be a comma list of integers, got {text!r}") from exc
