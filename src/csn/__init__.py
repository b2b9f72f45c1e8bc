"""csn: class-selective neurons across training.

Train with dense early checkpoints, measure class selectivity of every unit at every checkpoint,
ablate selective vs random units, measure linearity and CKA, regularize selectivity in windows,
and turn it all into one report.
"""

__version__ = "0.1.0"

from csn.errors import CsnError  # noqa: E402
from csn.models import create_model, list_models  # noqa: E402
from csn.runs.run import Run  # noqa: E402

__all__ = ["CsnError", "Run", "create_model", "list_models", "__version__"]
