"""Which Δ estimator predicts a class's calibration error on independent data? (issue 23, item 1)

`slsd calibrate` measures Δ_i (Eq. 4) on one labeled split; Eq. 5 then uses it on other images. A
class with few ground-truth instances in that split has a noisy Δ_i, and a class with none has
Δ_i = -(its mean score) whatever the teacher does. This script measures which estimator of
`slsd_cli.labels.calibration.estimate_delta` best predicts Δ_i measured on a second, independent
labeled split, on the embedded benchmark:

1. Prepare (once, cached under --work): `slsd synth` (the demo's sizes and seed, with its
   calibration split calib.json), `slsd split` (the demo's 85/15), `slsd prototypes` (the demo's),
   one `slsd train-teacher` per --seeds with the demo's recipe and setting (similarity smoothing,
   the quick demo's iterations), and its detections (`slsd eval`) on holdout.json, val.json and
   calib.json.
2. Scenarios: estimate on split A, compare with the plain Eq. 4 Δ on split B:
   holdout -> calib and holdout -> val (an LVIS user's 15 % held-out split of the training set: most
   rare classes have 0-2 images there), calib -> val and val -> calib (two splits drawn by val's rule,
   >= 5 images of every class).
3. Error: the squared difference between the estimate on A and Δ on B, averaged over the classes that
   have a ground-truth instance and a judged detection in B (each class counts once: APr counts each
   rare class once), and over --replicates bootstrap resamples of A's images (the error of an
   estimator is then its error on a calibration split *like* A, not on one draw). B's own noise adds
   the same constant to every estimator, so it does not change their order. Reported per r/c/f group
   too, and weighted by B's judged detections.

Prints one table per scenario and the mean over scenarios and teacher seeds; the estimator with the
lowest mean class-averaged error is the default of `slsd calibrate` (docs/method.md, Eq. 4).

    python benchmarks/bench_delta_estimators.py [--work /tmp/slsd_bench_delta] [--seeds 0] [--replicates 200]
        [--teacher RUN ...]   # a teacher already trained on the benchmark's split/train.json (checked by hash)
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from slsd_cli.data.lvis import load_annotations
from slsd_cli.data.results import read_results
from slsd_cli.evaluation import matching
from slsd_cli.labels.calibration import Judged, class_support, judge_detections
from slsd_cli.labels.delta_estimate import FREQUENCY_GROUPS, ClassSupport, DeltaEstimator, estimate_delta
from slsd_cli.stats import bootstrap_indices

SPLITS = ("holdout", "val", "calib")
SCENARIOS = (("holdout", "calib"), ("holdout", "val"), ("calib", "val"), ("val", "calib"))
GROUP_ONLY_K = 1e12  # shrinking with this k is the group's Δ for every class ("k = inf")
# (label, estimator or None for Δ = 0 everywhere: no correction)
CANDIDATES: list[tuple[str, DeltaEstimator | None]] = [
    ("zero (no correction)", None),
    ("raw (Eq. 4 as measured)", DeltaEstimator("raw")),
    *[(f"shrink instances k={k:g}", DeltaEstimator("shrink", k, "instances")) for k in (0, 1, 2, 5, 10, 20, 50, 100)],
    *[(f"shrink detections k={k:g}", DeltaEstimator("shrink", k, "detections"))
      for k in (10, 30, 100, 300, 1000, 3000)],
    ("group Δ only (k = inf)", DeltaEstimator("shrink", GROUP_ONLY_K, "instances")),
]


def slsd(*argv: str) -> None:
    """One slsd command in a fresh process (as a user runs it); its stderr shown on failure."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "slsd_cli", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"slsd {' '.join(argv)} failed:\n{proc.stderr}")
    print(f"  slsd {argv[0]}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def prepare(work: Path, seeds: list[int]) -> dict[str, Path]:
    """The demo's data, split, prototypes and teachers (cached); -> annotations path per split."""
    from slsd_cli.demo.pipeline import PROTOTYPE_ARGS
    from slsd_cli.demo.settings import QUICK, TEACHER_RECIPE, overrides, recipe_defaults

    data, split = work / "data", work / "split"
    size = QUICK
    if not (data / "calib.json").exists():
        slsd("synth", str(data), "--classes", str(size.classes), "--train-images", str(size.train_images),
             "--val-images", str(size.val_images), "--pool-images", str(size.pool_images), "--image-size",
             str(size.image_size), "--seed", "0", "--force")
    if not (split / "holdout.json").exists():
        slsd("split", str(data / "train.json"), "--holdout", "0.15", "--seed", "0", "--out-dir", str(split), "--force")
    prototypes = work / "prototypes.safetensors"
    if seeds and not prototypes.exists():
        slsd("prototypes", "--annotations", str(split / "train.json"), "--images", str(data / "images"),
             *PROTOTYPE_ARGS, "--image-size", str(size.prototype_image_size), "--seed", "0", "--out", str(prototypes))
    knobs = recipe_defaults(("smoothing.epsilon", "smoothing.gamma"), TEACHER_RECIPE)
    annotations = {"holdout": split / "holdout.json", "val": data / "val.json", "calib": data / "calib.json"}
    for seed in seeds:
        run = work / f"teacher_seed{seed}"
        if not (run / "model.safetensors").exists():
            slsd("train-teacher", TEACHER_RECIPE, *overrides(knobs), "--train-json", str(split / "train.json"),
                 "--images", str(data / "images"), "--out-dir", str(run), "--smoothing", "similarity",
                 "--prototypes", str(prototypes), "--iterations", str(size.teacher_iterations), "--seed", str(seed),
                 "--resume")
    return annotations


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_teacher(run: Path, train_json: Path) -> None:
    """A given teacher must have been trained on the benchmark's training split (same bytes)."""
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    used = Path(recipe["data"]["train_json"])
    if not used.is_file() or sha256(used) != sha256(train_json):
        sys.exit(f"{run}: trained on {used}, not on {train_json} (the benchmark's split); train one with --seeds")


def detections(run: Path, out: Path, annotations: dict[str, Path], images: Path) -> dict[str, Path]:
    """The run's detections on each split (`slsd eval`, cached under `out`)."""
    paths = {}
    for name, path in annotations.items():
        folder = out / f"eval_{name}"
        if not (folder / "detections.json").exists():
            slsd("eval", "--annotations", str(path), "--checkpoint", str(run), "--images", str(images),
                 "--out-dir", str(folder), "--force")
        paths[name] = folder / "detections.json"
    return paths


# ---------------------------------------------------------------- the measurement


@dataclass
class Split:
    """One labeled split's judged detections and ground truth, ready to re-weigh by image."""

    judged: Judged
    gt: matching.GroundTruth
    images: int

    def support(self, weights: np.ndarray | None = None) -> ClassSupport:
        return class_support(self.judged, self.gt, weights)


def load_split(annotations: Path, detections_path: Path) -> Split:
    ann = load_annotations(annotations)
    gt = matching.ground_truth(ann, ann.protocol)
    judged = judge_detections(read_results(detections_path, ann, masks=False), gt)
    return Split(judged, gt, len(ann.image_ids))


def estimates(support: ClassSupport, groups: list[str]) -> np.ndarray:
    """[candidates, C]: every candidate's Δ̂ from one split's support."""
    return np.stack([np.zeros(len(groups)) if est is None else estimate_delta(support, groups, est).delta
                     for _, est in CANDIDATES])


def scenario_errors(a: Split, b: Split, groups: list[str], replicates: int, seed: int) -> dict:
    """Squared errors of each candidate's Δ̂ on A (the split itself, then `replicates` bootstrap
    resamples of its images) against Eq. 4 Δ on B, over the classes B can judge."""
    target = b.support()
    eligible = (target.instances > 0) & (target.detections > 0)
    delta_b = target.raw_delta()
    group = np.asarray(groups)
    draws = [None] + [np.bincount(d, minlength=a.images).astype(np.float64)
                      for d in bootstrap_indices(a.images, replicates, seed)]
    squared, unknown = [], []
    for weights in draws:
        support = a.support(weights)
        squared.append((estimates(support, groups) - delta_b) ** 2)
        unknown.append(int(((support.instances == 0) | (support.detections == 0)).sum()))
    squared = np.stack(squared)  # [1 + replicates, candidates, C]
    det_weight = np.where(eligible, target.detections, 0.0)
    noise = np.stack([b.support(np.bincount(d, minlength=b.images).astype(np.float64)).raw_delta()
                      for d in bootstrap_indices(b.images, replicates, seed + 100)]).var(axis=0)
    out = {"classes": int(eligible.sum()), "unknown_on_a": unknown[0], "unknown_mean": float(np.mean(unknown[1:])),
           "per_class": squared[1:][:, :, eligible].mean(axis=0),  # [candidates, eligible classes]
           "noise": {g: float(np.sqrt(noise[eligible & ((group == g) if g != "all" else True)].mean()))
                     for g in ("all", *FREQUENCY_GROUPS)},
           "actual": squared[0][:, eligible].mean(axis=1),
           "all": squared[1:][:, :, eligible].mean(axis=(0, 2)),
           "weighted": (squared[1:] * det_weight).sum(axis=2).mean(axis=0) / det_weight.sum()}
    for g in FREQUENCY_GROUPS:
        members = eligible & (group == g)
        out[g] = squared[1:][:, :, members].mean(axis=(0, 2)) if members.any() else np.full(len(CANDIDATES), np.nan)
    return out


def versus_best(per_class: list[np.ndarray], best: int, draws: int = 2000, seed: int = 0) -> np.ndarray:
    """[candidates, 3]: each candidate's mean squared error minus the best one's (averaged over the
    scenarios), with a 95 % interval from resampling each scenario's classes (the same draw for
    every candidate: the comparison is paired)."""
    rng = np.random.default_rng(seed)
    gaps = [rows - rows[best] for rows in per_class]  # [candidates, classes] per scenario
    point = np.mean([g.mean(axis=1) for g in gaps], axis=0)
    boot = np.mean([np.stack([g[:, rng.integers(0, g.shape[1], g.shape[1])].mean(axis=1) for _ in range(draws)])
                    for g in gaps], axis=0)  # [draws, candidates]
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    return np.stack([point, low, high], axis=1)


def print_table(title: str, rows: dict, note: str = "", gaps: np.ndarray | None = None) -> None:
    """RMSE (the square root of the mean squared error) per candidate."""
    print(f"\n{title}" + (f"  ({note})" if note else ""))
    columns = ("all", "r", "c", "f", "weighted", "actual")
    names = ["RMSE all classes", "r", "c", "f", "det-weighted", "on A itself"]
    if gaps is not None:
        names.append("MSE - best's x 1e3 [95 % over classes]")
    print(f"| estimator | {' | '.join(names)} |")
    print("|---|" + "---:|" * len(names))
    best = int(np.nanargmin(rows["all"]))
    for i, (label, _) in enumerate(CANDIDATES):
        cells = [("n/a" if np.isnan(rows[c][i]) else f"{np.sqrt(rows[c][i]):.4f}") for c in columns]
        if gaps is not None:
            cells.append(f"{1e3 * gaps[i, 0]:+.2f} [{1e3 * gaps[i, 1]:+.2f}, {1e3 * gaps[i, 2]:+.2f}]")
        print(f"| {label}{' **best**' if i == best else ''} | {' | '.join(cells)} |")


def measure(work: Path, runs: list[Path], annotations: dict[str, Path], replicates: int) -> None:
    train = load_annotations(work / "split" / "train.json")
    groups = train.frequencies()  # the teachers' training groups, for every split alike
    totals: dict[str, list] = {}
    per_class: list[np.ndarray] = []
    for run in runs:
        dets = detections(run, work / f"dets_{run.name}", annotations, work / "data" / "images")
        splits = {name: load_split(annotations[name], dets[name]) for name in SPLITS}
        for k, (a, b) in enumerate(SCENARIOS):
            rows = scenario_errors(splits[a], splits[b], groups, replicates, seed=k)
            print_table(f"{run.name}: estimate on {a}.json, predict Δ on {b}.json", rows,
                        f"{rows['classes']} classes judged on {b}; on {a}: {rows['unknown_on_a']} classes without "
                        f"instance or detection, {rows['unknown_mean']:.1f} on average over {replicates} resamples; "
                        f"{b}'s own noise, the bootstrap RMSE of its Δ: " +
                        ", ".join(f"{g} {v:.4f}" for g, v in rows["noise"].items()))
            per_class.append(rows["per_class"])
            for key in ("all", "r", "c", "f", "weighted", "actual"):
                totals.setdefault(key, []).append(rows[key])
    mean = {key: np.mean(np.stack(values), axis=0) for key, values in totals.items()}
    print_table(f"Mean over {len(SCENARIOS)} scenarios x {len(runs)} teacher(s)", mean,
                "RMSE of the mean squared error; 'all' averages classes, the choice criterion",
                versus_best(per_class, int(np.nanargmin(mean["all"]))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/slsd_bench_delta"))
    parser.add_argument("--seeds", default=None, help="teachers to train, comma-separated seeds (default 0, none "
                        "with --teacher)")
    parser.add_argument("--replicates", type=int, default=200, help="bootstrap resamples of split A")
    parser.add_argument("--teacher", type=Path, action="append", default=[],
                        help="use this teacher run (trained on the benchmark's split/train.json) instead of training")
    parser.add_argument("--prepare-only", action="store_true")
    args = parser.parse_args()
    seeds = ([] if args.teacher else [0]) if args.seeds is None else [int(s) for s in args.seeds.split(",") if s]
    started = time.perf_counter()
    annotations = prepare(args.work, seeds)
    for run in args.teacher:
        check_teacher(run, args.work / "split" / "train.json")
    if args.prepare_only:
        return
    runs = [args.work / f"teacher_seed{seed}" for seed in seeds] + list(args.teacher)
    measure(args.work, runs, annotations, args.replicates)
    print(f"\n({time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
