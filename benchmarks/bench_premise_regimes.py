"""Does some training regime bring on the paper's premise on the embedded benchmark? (issue 23, item 6)

The paper's premise: the teacher's frequent classes are over-confident (mean CCECE Δ < 0) and its rare
classes under-confident (Δ > 0). On the demo's data the similarity teacher's rare classes are
under-confident but its frequent classes are calibrated (Δ_f ~ 0). For each regime of
`slsd_cli.demo.settings.REGIMES` (the recipes as they are; the teacher trained 3x longer; 120 classes on
the LVIS curve; the federated sigmoid loss; repeat-factor sampling at LVIS strength) this script runs
what the quick demo runs before its students, with the regime applied exactly as `slsd demo --regime
NAME` applies it (the same `Demo` steps, so a later demo in the same folder reuses them):

    slsd synth -> slsd split -> slsd prototypes -> slsd train-teacher (similarity smoothing, the recipe's
    defaults) -> slsd eval on the calibration split -> slsd calibrate

and prints, per regime, the teacher's mean Δ per r/c/f group with its 95% interval (the bootstrap over
calibration images of the demo's premise check), the verdict sentence the demo's report would print,
the teacher's mask AP / APr / APf on the calibration split, the classification loss over the first and
the last fifth of training (has it flattened?), and the wall time. Results also go to
OUT/regimes.json.

    python benchmarks/bench_premise_regimes.py --out-dir runs/regimes [--regimes paper,long,...]
        [--seed 0] [--replicates 100] [--threads N]

Each regime lives in OUT/<regime>/ (a demo folder: `slsd demo --regime NAME --out-dir OUT/NAME` continues
from it). Two invocations on disjoint --regimes, each with --threads 1, share 2 cores best.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from slsd_cli.cli import main as run_command
from slsd_cli.data.lvis import FREQUENCY_GROUPS
from slsd_cli.demo import settings as S
from slsd_cli.demo.pipeline import Demo
from slsd_cli.demo.premise import delta_intervals, interval_text, premise_verdict
from slsd_cli.demo.runner import Runner
from slsd_cli.io import atomic_write_json, read_json


def classification_loss(metrics_jsonl: Path) -> tuple[float, float]:
    """Mean of the cascade's classification losses (summed over stages) over the first and the last
    fifth of the logged windows."""
    values = []
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line)
        losses = record.get("losses")
        if losses:
            values.append(sum(v for k, v in losses.items() if k.startswith("cls_stage")))
    fifth = max(1, len(values) // 5)
    return sum(values[:fifth]) / fifth, sum(values[-fifth:]) / fifth


SHARED = ("data", "split", "retrieval", "prototypes.safetensors")


def share_data(out: Path, regime: S.Regime) -> None:
    """A regime that keeps the paper regime's data uses its files (synth, split, prototypes, retrieval:
    what `Demo.prepare` would make again, identically) when they are complete."""
    source = out.parent / "paper"
    if regime.name == "paper" or regime.size or not (source / "retrieval" / "unlabeled.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        if not (out / name).exists():
            (out / name).symlink_to((source / name).resolve())


def probe(regime: S.Regime, out: Path, seed: int, replicates: int) -> dict:
    started = time.perf_counter()
    size = regime.apply(S.QUICK)
    share_data(out, regime)
    runner = Runner(out, run_command, jobs=1)
    try:
        demo = Demo(out, size, runner, regime)
        demo.prepare()
        row = S.TEACHERS["similarity"]
        setting = S.recipe_defaults(row.knobs, S.TEACHER_RECIPE)
        teacher = demo.teacher(row, setting, seed)
        calibration = read_json(demo.calibrate_teacher(teacher))
        detections = teacher / f"eval_{demo.calibration_name}" / "detections.json"
        intervals = delta_intervals(demo.calibration_json, detections, replicates=replicates, seed=0)
        metrics = read_json(teacher / f"eval_{demo.calibration_name}" / "metrics.json")["segm"]
        first, last = classification_loss(teacher / "metrics.jsonl")
    finally:
        runner.close()
    return {"regime": regime.name, "description": regime.description, "overrides": list(regime.overrides),
            "size": dict(regime.size), "teacher": str(teacher), "calibration_split": demo.calibration_json.name,
            "delta": {g: vars(intervals[g]) for g in FREQUENCY_GROUPS},
            "ece": calibration.get("ece"), "verdict": premise_verdict(intervals),
            "AP": metrics["AP"], "APr": metrics["APr"], "APc": metrics["APc"], "APf": metrics["APf"],
            "cls_loss_first_fifth": first, "cls_loss_last_fifth": last, "seconds": time.perf_counter() - started}


def table(results: list[dict]) -> str:
    from slsd_cli.stats import Interval

    lines = ["| regime | rare Δ | common Δ | frequent Δ | calib AP / APr / APf | cls loss first → last fifth | min |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        deltas = " | ".join(interval_text(Interval(**r["delta"][g])) for g in FREQUENCY_GROUPS)
        ap = " / ".join(f"{100 * r[k]:.1f}" for k in ("AP", "APr", "APf"))
        loss = f"{r['cls_loss_first_fifth']:.3f} → {r['cls_loss_last_fifth']:.3f}"
        lines.append(f"| {r['regime']} | {deltas} | {ap} | {loss} | {r['seconds'] / 60:.1f} |")
    lines.append("")
    lines += [f"- {r['regime']}: {r['verdict']}" for r in results]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/regimes"))
    parser.add_argument("--regimes", default=",".join(S.REGIMES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replicates", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    regimes = [S.parse_regime(name.strip()) for name in args.regimes.split(",") if name.strip()]
    results = []
    for regime in regimes:
        result = probe(regime, args.out_dir / regime.name, args.seed, args.replicates)
        atomic_write_json(args.out_dir / regime.name / "premise.json", result, indent=1)
        results.append(result)
        print(table([result]), flush=True)
    everything = [read_json(p) for p in sorted(args.out_dir.glob("*/premise.json"))]
    order = list(S.REGIMES)
    everything.sort(key=lambda r: order.index(r["regime"]) if r["regime"] in order else len(order))
    atomic_write_json(args.out_dir / "regimes.json", everything, indent=1)
    print("\nAll regimes measured in " + str(args.out_dir) + ":\n" + table(everything))


if __name__ == "__main__":
    main()
