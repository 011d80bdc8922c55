"""The demo's library side: what `slsd demo` runs and how it reads the results (no CLI imports).

- `settings`: demo sizes, the rows of the paper's Table 1, and hyperparameter settings as recipe
  keys (a setting names its run directory, so a finished run is found again and reused);
- `tuning`: the small held-out grid (teacher ε, γ; student λ, threshold, unlabeled weight, ...) and
  the choice of the best cell by held-out mask AP;
- `table`: Table 1 as mean ± std over seeds and the paired difference of each row to the row above,
  with Student-t intervals over seeds and bootstrap intervals over val images;
- `diagnostics`: the numbers that explain a result (class-similarity quality, teacher CCECE per
  frequency group, pseudo-labels per image, retrieval enrichment, ECE);
- `report`: report.md.

The commands layer (`slsd_cli/demo/pipeline.py`) runs the `slsd` commands and calls these.
"""
