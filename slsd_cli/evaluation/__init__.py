"""Evaluation: LVIS/COCO AP equal to the official tools, the matcher they share with calibration,
the `slsd eval` pipeline and bootstrap intervals over images.

- `matching`: greedy score-ordered matching of detections to ground truth (pycocotools' rules).
- `metrics`: AP, AP50, AP75, APs/m/l, APr/c/f and per-class AP from matched arrays.
- `pipeline`: `EvalConfig` + `run_eval`, what `slsd eval` runs.
- `bootstrap`: paired bootstrap of metrics over images (the demo's val intervals).
"""
