"""Unit ablation (SPEC "Ablation (C2)"): silence chosen units at read points and sweep how accuracy falls.

Three layers, each usable on its own:

* `ablate_units(model, {layer: units})` (masks.py) - a context manager that zeroes (or replaces by their
  dataset mean) the chosen channels/features of any model's layers; hooks are removed on exit and on error.
* `ablation_sweep(model, loader, stage_layers, csi, ...)` (sweep.py) - the study's protocol for one
  checkpoint: per stage, rank each block's units by CSI and ablate the top-n units of every block of
  the stage at once, for n on a grid and for the orders `selective`, `least` and `random` (seeded
  draws); exact fast batched path, `naive=True` the reference.
* `Ablation` (analysis.py) - the sweep over a run's checkpoints into tables/ablation.parquet, on top of
  csn.analysis.base.run_analysis (resume, BN policy, one compatibility rule, torchrun):

      run_analysis("runs/fmnist", Ablation(draws=5, grid="f:0,0.25,0.5,1"), checkpoints="0.125,end")

`summarize_ablation` (summary.py) turns a table into normalized curves, areas and selective-vs-random gaps.
"""

from csn.analysis.ablation.analysis import (
    ABLATION,
    ABLATION_COLUMNS,
    Ablation,
    AblationOptions,
    reduce_ablation,
    resolve_stages,
)
from csn.analysis.ablation.masks import (
    DEFAULT_FRACTIONS,
    MODES,
    ORDERS,
    Grid,
    ablate_units,
    check_orders,
    parse_grid,
    random_seed,
    random_units,
    rank_units,
    units_mask,
)
from csn.analysis.ablation.summary import AblationSummary, summarize_ablation
from csn.analysis.ablation.sweep import (
    DEFAULT_MAX_ELEMENTS,
    SWEEP_COLUMNS,
    ablation_sweep,
    default_max_elements,
)

__all__ = [
    "ABLATION",
    "ABLATION_COLUMNS",
    "DEFAULT_FRACTIONS",
    "DEFAULT_MAX_ELEMENTS",
    "MODES",
    "ORDERS",
    "SWEEP_COLUMNS",
    "Ablation",
    "AblationOptions",
    "AblationSummary",
    "Grid",
    "ablate_units",
    "ablation_sweep",
    "check_orders",
    "default_max_elements",
    "parse_grid",
    "random_seed",
    "random_units",
    "rank_units",
    "reduce_ablation",
    "resolve_stages",
    "summarize_ablation",
    "units_mask",
]
