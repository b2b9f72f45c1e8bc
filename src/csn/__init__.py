"""csn: class-selective neurons across training.

Train with dense early checkpoints, measure class selectivity of every unit at every checkpoint,
ablate selective vs random units, measure linearity and CKA, regularize selectivity in windows,
and turn it all into one report.

    import csn
    run = csn.train(csn.preset("fmnist"), "runs/fmnist")                 # a run directory
    sel = csn.run_analysis(run, csn.Selectivity(layers=["layer2.*"]))     # tables/selectivity.parquet
    model = csn.create_model("resnet20", num_classes=10, in_channels=1)
    table = csn.class_selectivity(model, loader)                         # any nn.Module + DataLoader
    csn.reproduce(config="study.toml")                                   # the whole study, judged
"""

from csn._version import __version__  # noqa: E402
from csn.analysis.ablation import Ablation, ablate_units, ablation_sweep  # noqa: E402
from csn.analysis.base import RunOptions, run_analysis  # noqa: E402
from csn.analysis.cka import Cka, cka  # noqa: E402
from csn.analysis.linearity import Linearity, linearity_measures  # noqa: E402
from csn.analysis.selectivity import Selectivity, class_selectivity  # noqa: E402
from csn.core.trace import TraceDict, run_with_cache  # noqa: E402
from csn.errors import CsnError  # noqa: E402
from csn.experiments.judge import judge  # noqa: E402
from csn.experiments.reproduce import reproduce  # noqa: E402
from csn.experiments.study import Study, load_study  # noqa: E402
from csn.models import create_model, list_models  # noqa: E402
from csn.runs.config import TrainConfig, load_config_file, preset  # noqa: E402
from csn.runs.run import Run  # noqa: E402
from csn.training.loop import train  # noqa: E402
from csn.training.regularizer import SelectivityRegularizer  # noqa: E402

__all__ = [
    "__version__", "CsnError", "Run", "TrainConfig", "preset", "load_config_file", "train", "create_model",
    "list_models", "run_analysis", "RunOptions", "Selectivity", "Ablation", "Linearity", "Cka", "class_selectivity",
    "ablation_sweep", "ablate_units", "linearity_measures", "cka", "TraceDict", "run_with_cache",
    "SelectivityRegularizer", "reproduce", "load_study", "Study", "judge",
]
