"""How linear is the network at every checkpoint (claim C3): the measures and `csn linearity` as an Analysis.

measures.py holds the maths (formulas and citations in its docstrings); analysis.py the table, the
options, the Linearity analysis, the cached linear classifier and the summaries.
"""

from csn.analysis.linearity.analysis import (
    ALL_GROUPS,
    DEFAULT_SAMPLES,
    LINEAR_FIT_DEFAULTS,
    LINEAR_MODEL_FILE,
    LINEARITY,
    MEASURE_GROUPS,
    Linearity,
    LinearityOptions,
    LinearityState,
    check_groups,
    describe_linearity,
    expected_measures,
    linear_model_for_run,
    linear_model_path,
    summarize_linearity,
)
from csn.analysis.linearity.measures import (
    LinearityAccumulator,
    accuracy,
    conditional_mutual_information,
    fit_linear_classifier,
    linear_predict,
    linearity_measures,
    linearized_outputs,
    mutual_information,
    parameter_delta,
    performance_correlation,
    reduce_linearity,
    relu_agreement,
    relu_patterns,
)

__all__ = [
    "ALL_GROUPS",
    "DEFAULT_SAMPLES",
    "LINEARITY",
    "LINEAR_FIT_DEFAULTS",
    "LINEAR_MODEL_FILE",
    "MEASURE_GROUPS",
    "Linearity",
    "LinearityAccumulator",
    "LinearityOptions",
    "LinearityState",
    "accuracy",
    "check_groups",
    "conditional_mutual_information",
    "describe_linearity",
    "expected_measures",
    "fit_linear_classifier",
    "linear_model_for_run",
    "linear_model_path",
    "linear_predict",
    "linearity_measures",
    "linearized_outputs",
    "mutual_information",
    "parameter_delta",
    "performance_correlation",
    "reduce_linearity",
    "relu_agreement",
    "relu_patterns",
    "summarize_linearity",
]
