"""`slsd demo`: the whole pipeline on the embedded benchmark (thin CLI over slsd_cli.demo)."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out-dir", "-o", help="Where data, runs, figures and report.md go."),
    full: bool = typer.Option(False, "--full", help="Run the paper's Table 1 ablation (6 models × seeds) instead of the quick pipeline."),
    seeds: str = typer.Option(None, "--seeds", help="Comma list of training seeds (default: 0; with --full: 0,1)."),
    teacher_iterations: int = typer.Option(None, "--teacher-iterations", min=1, help="Override the teacher's iterations."),
    distill_iterations: int = typer.Option(None, "--distill-iterations", min=1, help="Override the student's iterations."),
    train_images: int = typer.Option(None, "--train-images", min=1, help="Override the synthetic training images."),
) -> None:
    """Run split -> prototypes -> teacher -> calibrate -> retrieve -> distill -> eval -> plots on the
    embedded benchmark, and write OUT_DIR/report.md. Finished steps are skipped on a rerun.

    Example: slsd demo --out-dir runs/demo        (quick, under 10 minutes on 2 CPU cores)
             slsd demo --full --out-dir runs/full  (Table 1 ablation)
    """
    import dataclasses

    from slsd_cli.demo import FULL, QUICK, parse_seeds, run_demo

    size = FULL if full else QUICK
    overrides = {"teacher_iterations": teacher_iterations, "distill_iterations": distill_iterations,
                 "train_images": train_images}
    size = dataclasses.replace(size, **{k: v for k, v in overrides.items() if v is not None})
    run_demo(out_dir, full=full, seeds=parse_seeds(seeds), size=size)
