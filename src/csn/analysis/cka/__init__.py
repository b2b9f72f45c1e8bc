"""Linear CKA: the unbiased minibatch estimator (estimator.py) and `csn cka` as an Analysis (analysis.py).

    from csn.analysis.cka import cka, Cka, cka_matrix
    cka(model_a, model_b, loader, layers)                 # a table of layer_a, layer_b, cka
    run_analysis("runs/fmnist", Cka(mode="across"))       # tables/cka.parquet of a run
"""

from csn.analysis.cka.analysis import (
    CKA,
    COMPARISONS,
    MODES,
    Cka,
    CkaOptions,
    check_same_data,
    cka_matrix,
    comparison_rows,
    describe_cka,
    match_checkpoints,
    reduce_cka,
    resolve_reference,
    run_label,
    summarize_cka_runs,
)
from csn.analysis.cka.estimator import (
    LOGITS,
    CKAAccumulator,
    cka,
    cka_blocks,
    cka_from_hsic,
    collect_features,
    hsic1_matrix,
    linear_cka,
    resolve_cka_layers,
)

__all__ = [
    "CKA",
    "COMPARISONS",
    "LOGITS",
    "MODES",
    "CKAAccumulator",
    "Cka",
    "CkaOptions",
    "check_same_data",
    "cka",
    "cka_blocks",
    "cka_from_hsic",
    "cka_matrix",
    "comparison_rows",
    "collect_features",
    "describe_cka",
    "hsic1_matrix",
    "linear_cka",
    "match_checkpoints",
    "reduce_cka",
    "resolve_cka_layers",
    "resolve_reference",
    "run_label",
    "summarize_cka_runs",
]
