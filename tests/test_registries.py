"""Registries at the definition (issue 24 item 4): models, dataset formats, analyses and report sections register
where they are defined, and create_model, load_dataset, the CLI and the report read the registries. Each part has a
toy registered here, in a test module, that appears without editing any other file."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from pydantic import Field
from torch import nn

import csn.analysis
from csn.analysis.base import Analysis, Context
from csn.analysis.registry import analyses, analysis, register_analysis
from csn.cli import main as cli
from csn.core.schema import Float, Schema
from csn.data import DATASETS, DataSplits, TensorSplit, load_dataset, register_dataset
from csn.errors import CsnError
from csn.models import MODELS, create_model, list_models, register_model
from csn.report.html import build_report
from csn.report.page import Page, Section, page_sections, section, table_item
from csn.runs.config import TrainConfig
from csn.runs.run import Checkpoint, Run
from csn.runs.table import TableSpec

# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------

OLD_MODELS = {"resnet8", "resnet14", "resnet20", "resnet32", "resnet56", "resnet18", "resnet34", "resnet50", "vgg16",
              "vgg16-nobn", "cnn", "mlp", "vit-tiny"}
"""The hand-kept model table before the registry (models/__init__.py's _REGISTRY)."""
OLD_NEEDS_SIZE = {"vgg16", "vgg16-nobn", "mlp", "vit-tiny"}
"""Its side table: the models that get image_size."""


def test_every_model_of_the_old_table_is_registered_beside_its_factory():
    assert {n for n in list_models() if not n.startswith("toy")} == OLD_MODELS
    assert {n for n, e in MODELS.items() if e.takes_image_size and not n.startswith("toy")} == OLD_NEEDS_SIZE
    for name, entry in MODELS.items():
        assert entry.summary, name
        assert entry.factory.__module__ != "csn.models" or name.startswith("toy"), f"{name} is registered in models/__init__.py, not beside it"


def test_registered_models_build_as_before():
    assert create_model("resnet20", in_channels=1).csn_stages["layer1"] == [f"layer1.{b}" for b in range(3)]
    assert len(create_model("resnet56").layer2) == 9
    assert create_model("mlp", in_channels=1, image_size=8).fc1.in_features == 64
    assert create_model("vgg16-nobn", image_size=8).features[1].__class__ is nn.ReLU
    assert create_model("resnet50", num_classes=5, width=0.125).fc.out_features == 5
    assert create_model("vit-tiny", in_channels=1, image_size=8, pool="cls").pool == "cls"


def test_unknown_model_names_every_valid_one():
    with pytest.raises(CsnError, match="unknown model 'resnet21'") as e:
        create_model("resnet21")
    for name in [*OLD_MODELS, "package.module:factory", "timm:NAME"]:
        assert name in str(e.value)


@register_model("toy-linear")
def _toy_linear(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 4) -> nn.Module:
    """A toy model registered in this test module."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))


def test_a_model_registered_in_a_test_module_is_created_listed_and_helped():
    assert "toy-linear" in list_models() and MODELS.get("toy-linear").takes_image_size
    m = create_model("toy-linear", num_classes=3, in_channels=1, image_size=5)
    assert m(torch.zeros(2, 1, 5, 5)).shape == (2, 3)
    with pytest.raises(CsnError, match="toy-linear"):
        create_model("toy-linea")
    assert "resnet20" in TrainConfig.model_fields["model"].description


def test_a_name_registered_twice_is_refused():
    with pytest.raises(CsnError, match="registered twice"):
        register_model("resnet20")(_toy_linear)


# ------------------------------------------------------------------------------------------------
# dataset formats
# ------------------------------------------------------------------------------------------------

OLD_DATASETS = ("fashion-mnist", "fmnist-pairs", "idx", "npz", "synthetic", "imagefolder")
"""The hand-kept tuple before the registry (data/__init__.py's DATASETS)."""


def test_every_dataset_format_of_the_old_list_is_registered_in_its_reader_module():
    assert set(OLD_DATASETS) <= set(DATASETS.names())
    for name, fmt in DATASETS.items():
        assert fmt.reader.__module__.startswith("csn.data.") or name.startswith("toy"), name
        assert fmt.reader.__module__ != "csn.data", f"{name} is registered in data/__init__.py, not beside its reader"
        assert fmt.summary, name


def test_unknown_dataset_is_one_sentence_naming_every_format():
    with pytest.raises(CsnError, match=r"^unknown dataset 'mnist' \(closest: '[a-z-]+'\); valid datasets are: ") as e:
        load_dataset("mnist")
    assert all(name in str(e.value) for name in OLD_DATASETS)


def test_options_are_checked_against_the_format():
    with pytest.raises(CsnError, match="unknown synthetic key 'foo'"):
        load_dataset("synthetic", foo=1)
    with pytest.raises(CsnError, match="takes no options"):
        load_dataset("idx", "somewhere", layout="NHWC")
    with pytest.raises(CsnError, match="unknown npz option 'layot'"):
        load_dataset("npz", "x.npz", layot="NHWC")
    with pytest.raises(CsnError, match="needs a directory"):
        load_dataset("idx")
    assert len(load_dataset("synthetic", num_train=8, num_test=8, num_classes=2).train) == 8


@register_dataset("toy-constant", options=("n",))
def _toy_constant(data_root: str | None = None, n: int = 6) -> DataSplits:
    """A toy dataset format registered in this test module: n gray 2x2 images, two classes."""
    x = torch.arange(n, dtype=torch.float32).repeat_interleave(4).reshape(n, 1, 2, 2)
    y = torch.arange(n) % 2
    return DataSplits("toy-constant", TensorSplit(x, y), TensorSplit(x, y), 2, 1, 2, ["a", "b"])


def test_a_dataset_format_registered_in_a_test_module_loads():
    assert "toy-constant" in DATASETS
    assert len(load_dataset("toy-constant", n=4).train) == 4
    with pytest.raises(CsnError, match="unknown toy-constant option 'm'"):
        load_dataset("toy-constant", m=4)
    with pytest.raises(CsnError, match="toy-constant"):
        load_dataset("toy-constan")


# ------------------------------------------------------------------------------------------------
# analyses
# ------------------------------------------------------------------------------------------------

OLD_ANALYSES = {"selectivity": "selectivity", "ablation": "ablate", "linearity": "linearity", "cka": "cka",
                "accuracy": "accuracy", "sparsity": "sparsity"}
"""Every Analysis subclass before the registry, with the command that runs it (sparsity had none: it gets one).
Analyses added since (probe, fisher, ...) need no entry here: adding one is its module and its test."""


def test_every_analysis_is_registered_where_it_is_defined():
    entries = {e.name: e for e in analyses() if not e.name.startswith("toy")}
    assert {n: entries[n].command for n in OLD_ANALYSES if n in entries} == OLD_ANALYSES
    defined = {c.name for m in pkgutil.walk_packages(csn.analysis.__path__, "csn.analysis.")
               for c in vars(importlib.import_module(m.name)).values()
               if isinstance(c, type) and issubclass(c, Analysis) and c is not Analysis and c.__module__ == m.name}
    assert set(entries) == defined  # every Analysis subclass in csn.analysis is registered, and only those
    for name, e in entries.items():
        assert e.cls.__module__.startswith("csn.analysis.") and e.cls.name == name and e.summary
    assert analysis("cka").table.step == "step_a" and analysis("cka").label == "CKA"
    with pytest.raises(CsnError, match=r"unknown analysis name 'selectivty' \(closest: 'selectivity'\); valid analysis names are"):
        analysis("selectivty")


class ToyMeanOptions(Schema):
    """Options of the toy analysis."""

    scale: Float = Field(1.0, description="Multiply the mean logit by this.")


TOY_TABLE = TableSpec("toy_mean", {"step": "int64", "epoch": "float64", "scale": "float64", "mean_logit": "float64"},
                      key=("step",), settings=("scale",), flags={"scale": "--scale"})


@register_analysis(label="toy mean logit")
class ToyMean(Analysis):
    """The mean logit of the first test batch at every checkpoint (a toy registered in a test module)."""

    name = "toy_mean"
    Options = ToyMeanOptions
    tables = (TOY_TABLE,)

    def settings(self, ctx: Context) -> dict:
        return {"toy_mean": {"scale": self.options.scale}}

    def expected(self, ctx: Context, ckpt: Checkpoint) -> dict:
        return {"toy_mean": pd.DataFrame({"step": [ckpt.step]})}

    def compute(self, ctx: Context, ckpt: Checkpoint, missing: Mapping) -> dict:
        x = next(iter(ctx.loader("test")))[0]
        with torch.no_grad():
            mean = float(ctx.model(ckpt).model(x).mean()) * self.options.scale
        return {"toy_mean": TOY_TABLE.frame([{"step": ckpt.step, "epoch": ckpt.epoch, "scale": self.options.scale,
                                              "mean_logit": mean}])}


def test_an_analysis_registered_in_a_test_module_is_a_csn_command(tiny_run):
    runner = CliRunner()
    listed = runner.invoke(cli, ["--help"])
    assert listed.exit_code == 0 and "toy_mean" in listed.output and "sparsity" in listed.output
    helped = runner.invoke(cli, ["toy_mean", "--help"])
    assert helped.exit_code == 0 and "--scale" in helped.output and "tables/toy_mean.parquet" in helped.output
    res = runner.invoke(cli, ["toy_mean", str(tiny_run), "--checkpoints", "first,last", "--scale", "2"])
    assert res.exit_code == 0, res.output
    assert "2 rows of toy_mean" in res.output
    table = Run(tiny_run).read("toy_mean")
    assert list(table["scale"]) == [2.0, 2.0] and len(table) == 2
    bad = runner.invoke(cli, ["toy_mean", str(tiny_run), "--scale", "x"])
    assert bad.exit_code == 2 and "error:" in bad.output


# ------------------------------------------------------------------------------------------------
# report sections
# ------------------------------------------------------------------------------------------------

OLD_SECTIONS = ["configuration", "training", "selectivity", "ablation", "linearity", "regularization",
                "how early is early", "which regularizer", "cka"]
"""The sections html.py built by hand before the registry, in page order (those added since need no entry here)."""


def test_every_report_section_is_registered_in_its_own_module_in_page_order():
    entries = [e for e in page_sections() if not e.name.startswith("toy")]
    names = [e.name for e in entries]
    assert [n for n in names if n in OLD_SECTIONS] == OLD_SECTIONS
    assert [e.order for e in entries] == sorted(e.order for e in entries)
    modules = [e.build.__module__ for e in entries]
    assert all(m.startswith("csn.report.sections.") for m in modules) and len(set(modules)) == len(modules)


@section("toy mean logit", order=95)
def _toy_section(page: Page) -> Section | None:
    """The toy analysis's section (registered in this test module): its table's rows, when a run has them."""
    have = page.runs_with("toy_mean")
    if not have:
        return None
    rows = [[run.name, int(r.step), f"{r.mean_logit:.3f}"] for _, runs in have for run in runs
            for r in page.table(run, "toy_mean").itertuples()]
    return Section("toy-mean", "Toy: mean logit", "A section registered in a test module.",
                   [table_item(["run", "step", "mean logit"], rows, "Mean logit per checkpoint.", numeric=(1, 2))])


def test_a_section_registered_in_a_test_module_is_on_the_page(tiny_run, tmp_path):
    assert page_sections()[-1].name == "toy mean logit"
    html = build_report([tiny_run], out=tmp_path / "before", progress=False).read_text()
    assert "Toy: mean logit" not in html  # no toy table yet: no section, no note
    assert CliRunner().invoke(cli, ["toy_mean", str(tiny_run), "--checkpoints", "last"]).exit_code == 0
    html = build_report([tiny_run], out=tmp_path / "after", progress=False).read_text()
    assert "Toy: mean logit" in html and html.index('id="toy-mean"') > html.index('id="training"')
