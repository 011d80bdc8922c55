"""Running a trained detector.

- `predictor`: `Predictor`, the one way to run a trained model (load a run, test-time resize and
  padding, score threshold, precision, backbone features).
- `sharded`: sharded inference over an annotations file's images into a results json, and
  `slsd predict` over folders, globs and image lists.
"""
