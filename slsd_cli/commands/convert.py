"""`slsd convert`: a released detectron2-format EVA-02 LVIS Cascade Mask R-CNN -> an slsd run dir."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from slsd_cli.progress import info


def convert(
    checkpoint: Path = typer.Argument(..., help="detectron2 checkpoint: model_final.pth-like torch file (read "
                                                "with weights_only=True) or a .safetensors state dict."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides model.key=value, e.g. "
                                                              "model.test_score_threshold=0.001."),
    annotations: Path = typer.Option(..., "--annotations", help="LVIS json whose categories the checkpoint "
                                                                "predicts (e.g. lvis_v1_val.json): ids ascending "
                                                                "= the checkpoint's class rows."),
    out_dir: Path = typer.Option(..., "--out-dir", "-o", help="Output run directory (model.safetensors + "
                                                              "model.json)."),
    recipe: str = typer.Option("lvis_eva02_L_teacher", "--recipe",
                               help="Recipe whose model: section is the checkpoint's architecture: "
                                    "lvis_eva02_L_teacher (1024, eva02_L_lvis_bsl) or lvis_eva02_L_sys_teacher "
                                    "(1536, window 32, 8 global blocks: eva02_L_lvis_sys*), or a yaml path."),
    window_key_mask: bool = typer.Option(False, "--window-key-mask/--reference-padding",
                                         help="Mask padded window keys (slsd's default for training) or let "
                                              "them take part as the reference does (default here)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run in --out-dir."),
) -> None:
    """Convert a released EVA-02 LVIS detector (baaivision/EVA, detectron2 format) into an slsd run
    that `slsd eval --checkpoint`, `calibrate --checkpoint`, `prototypes --checkpoint`,
    `predict --checkpoint` and `train-teacher model.init_from=RUN` accept.

    Example: slsd convert eva02_L_lvis_sys.pth --recipe lvis_eva02_L_sys_teacher --annotations lvis_v1_val.json --out-dir runs/eva02_L_lvis_sys
    """
    from slsd_cli.model.convert_detectron2 import ConvertConfig, run_convert

    cfg = ConvertConfig(checkpoint=checkpoint, annotations=annotations, out_dir=out_dir, recipe=recipe,
                        overrides=list(overrides or []), window_key_mask=window_key_mask, force=force)
    summary = run_convert(cfg)
    info(f"converted {summary['tensors']} tensors ({summary['dropped']} buffers dropped), "
         f"{summary['classes']} classes -> {summary['out']}")
