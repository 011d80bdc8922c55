"""`slsd demo`: the whole pipeline on the embedded benchmark (thin CLI over `slsd_cli/demo/pipeline.py`)."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    ctx: typer.Context,
    out_dir: Path = typer.Option(Path("runs/demo"), "--out-dir", "-o", help="Where data, runs, figures and report.md go."),
    full: bool = typer.Option(False, "--full", help="The paper's Table 1 (3 teachers, 3 students) over --seeds, with the "
                              "hyperparameters chosen on the held-out grid, paired differences and 95% intervals."),
    tune: bool = typer.Option(False, "--tune", help="Only the held-out grid (train on train.json, score on "
                              "holdout.json, never val); its choices are saved in OUT_DIR/tuning.json."),
    label_efficiency: bool = typer.Option(False, "--label-efficiency", help="One-hot / uniform / similarity "
                                          "teachers on nested labeled fractions (paper Fig. 2)."),
    fractions: str = typer.Option("0.1,0.25,0.5,1", "--fractions", help="Labeled fractions for --label-efficiency."),
    seeds: str = typer.Option(None, "--seeds", help="Comma list of training seeds [default: 0; with --full: 0,1,2]. "
                              "The grid runs at the first."),
    val_images: int = typer.Option(None, "--val-images", min=1, help="Synthetic val images [default: 100; with "
                                   "--full, --tune or --label-efficiency: 300; the report measures val noise by a bootstrap over "
                                   "val images]."),
    bootstrap: int = typer.Option(None, "--bootstrap", min=0, help="Bootstrap replicates over val images "
                                  "[default: 100; with --full: 50; 0 = none]."),
    teacher_iterations: int = typer.Option(None, "--teacher-iterations", min=1, help="Override the teacher's iterations."),
    distill_iterations: int = typer.Option(None, "--distill-iterations", min=1, help="Override the student's iterations."),
    train_images: int = typer.Option(None, "--train-images", min=1, help="Override the synthetic training images."),
    regime: str = typer.Option("paper", "--regime", help="Training regime: paper (the recipes as they are), long "
                               "(3x teacher iterations), classes120 (120 classes on the LVIS curve), federated (federated "
                               "sigmoid loss), rfs (repeat-factor sampling at LVIS strength); see docs/demo.md. One "
                               "--out-dir per regime."),
    jobs: int = typer.Option(None, "--jobs", "-j", min=1, help="Steps run at once, in child processes sharing the CPU "
                             "cores [default: 1; with --full, --tune or --label-efficiency: 2 on a machine with >= 2 "
                             "cores and no GPU]. Results are bit-exact for the same --jobs."),
) -> None:
    """Run split -> prototypes -> retrieve -> teacher -> calibrate -> distill -> eval -> plots on the embedded
    benchmark, and write OUT_DIR/report.md, which opens with the answer: does calibration-corrected
    distillation raise APr here? Finished steps are skipped on a rerun.

    Examples (quick: under 10 minutes on 2 CPU cores; then Table 1 with paired intervals, see docs/demo.md):

    \b
      slsd demo --out-dir runs/demo
      slsd demo --full --seeds 0,1,2 --out-dir runs/full
      slsd demo --regime rfs --out-dir runs/demo_rfs
    """
    import dataclasses

    from slsd_cli.demo.pipeline import run_demo
    from slsd_cli.interrupts import Interrupted
    from slsd_cli.demo.settings import FULL, QUICK, default_jobs, parse_fractions, parse_regime, parse_seeds

    chosen_regime = parse_regime(regime)
    size = chosen_regime.apply(FULL if full or tune or label_efficiency else QUICK)  # one data size per folder
    overrides = {"teacher_iterations": teacher_iterations, "distill_iterations": distill_iterations,
                 "train_images": train_images, "val_images": val_images, "bootstrap": bootstrap}
    size = dataclasses.replace(size, **{k: v for k, v in overrides.items() if v is not None})
    _check_size(size)  # before anything is written: a failed start leaves no folder behind
    # the CLI's entry point, handed over by `slsd_cli.cli.main` (commands never import the CLI): the demo
    # runs each of its steps through it, as `slsd <step>` would
    run_command = ctx.find_root().obj["run_command"]
    try:
        run_demo(out_dir, run_command, full=full, tune_only=tune, label_efficiency_mode=label_efficiency,
                 seeds=parse_seeds(seeds), size=size, fractions=tuple(parse_fractions(fractions)),
                 jobs=jobs or default_jobs(full or tune or label_efficiency), regime=chosen_regime)
    except Interrupted as exc:  # the steps running in child processes were stopped with it
        raise Interrupted(exc.signum, exc.message or "the demo and its running steps stopped; rerun the demo to "
                          "continue (finished steps are skipped, trainings resume)") from None


def _check_size(size) -> None:
    """The data sizes the demo's `slsd synth` step will refuse, refused now (the same one line)."""
    from slsd_cli.data.synthetic import min_val_images, train_image_counts
    from slsd_cli.errors import InputError

    need = min_val_images(train_image_counts(size.classes, size.train_images), size.train_images)
    if size.val_images < need:
        raise InputError(f"--val-images {size.val_images} is too few for {size.classes} classes with >= 5 "
                         f"images each; use at least {need}")
