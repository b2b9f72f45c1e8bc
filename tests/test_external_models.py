"""Models beyond csn's: 'package.module:factory', 'timm:NAME' (with a stub timm; timm is never required),
read points from a run's `layers` patterns, used alike by the analyses and the regularizer."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from csn.analysis.base import run_analysis
from csn.analysis.selectivity import Selectivity
from csn.core.units import resolve_layers, stages, stages_from_patterns
from csn.errors import CsnError
from csn.models import create_model
from csn.runs.config import build_model_for
from csn.training.regularizer import SelectivityRegularizer, default_reg_layers
from tests.conftest import tiny_config

INFO = {"num_classes": 4, "in_channels": 1, "image_size": 8}

FACTORY = '''
import torch
from torch import nn


class Net(nn.Module):
    """No csn_stages: read points must come from `layers`."""

    def __init__(self, num_classes, in_channels, width=1.0):
        super().__init__()
        c = max(1, round(8 * width))
        self.features = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def build(num_classes, in_channels, width=1.0):
    return Net(num_classes, in_channels, width)


def fixed():
    return Net(4, 1)


def declared(num_classes, in_channels):
    m = Net(num_classes, in_channels)
    m.csn_stages = {"conv": ["features.1", "features.3"]}
    return m


def not_a_module():
    return 3


def ten_classes():
    return Net(10, 1)


class Picky(Net):
    """A forward that needs real tensors (.item()): fine on a CPU, impossible on the meta device."""

    def forward(self, x):
        assert x.abs().sum().item() >= 0
        return super().forward(x)


def picky(num_classes, in_channels):
    return Picky(num_classes, in_channels)
'''

STUB_TIMM = '''
"""A stand-in for timm: create_model and list_models with timm's signatures, two architectures."""
from torch import nn


class TinyViT(nn.Module):
    def __init__(self, img_size=224, num_classes=1000, in_chans=3):
        super().__init__()
        self.img_size = img_size
        self.patch = nn.Conv2d(in_chans, 8, 4, stride=4)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(t).mean(dim=1))


class TinyResNet(nn.Module):
    def __init__(self, num_classes=1000, in_chans=3):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(in_chans, 4, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean(dim=(2, 3)))


_MODELS = {"tinyvit": TinyViT, "tinyresnet": TinyResNet}
calls = []


def list_models(pattern=None):
    return sorted(_MODELS)


def create_model(name, pretrained=False, **kw):
    calls.append((name, pretrained, dict(kw)))
    return _MODELS[name](**kw)
'''


@pytest.fixture()
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mynets"
    sys.modules.pop("mynets", None)


@pytest.fixture()
def stub_timm(tmp_path, monkeypatch):
    d = tmp_path / "stub"
    d.mkdir()
    (d / "timm.py").write_text(textwrap.dedent(STUB_TIMM))
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    import timm

    yield timm
    sys.modules.pop("timm", None)


def test_factory_gets_the_arguments_its_signature_names(factory_module):
    m = create_model("mynets:build", num_classes=3, in_channels=2, width=0.5, image_size=8)
    assert m.head.out_features == 3 and m.features[0].in_channels == 2 and m.features[0].out_channels == 4
    assert create_model("mynets:fixed", num_classes=4, in_channels=1, image_size=8).head.out_features == 4
    assert create_model("mynets:Net", num_classes=4, in_channels=1, image_size=8).head.out_features == 4  # a class


@pytest.mark.parametrize("name, match", [
    ("nosuchmodule_xyz:build", "cannot be imported"),
    ("mynets:nope", "has no attribute 'nope'"),
    ("mynets:torch", "not callable"),
    ("mynets:not_a_module", "not a torch.nn.Module"),
    ("mynets:ten_classes", r"returns \(2, 10\) for 2 images, not logits of shape \(2, 4\)"),
    ("mynets:", "neither a csn model name"),
    ("my nets:build", "neither a csn model name"),
])
def test_factory_errors_name_the_fix(factory_module, name, match):
    with pytest.raises(CsnError, match=match):
        create_model(name, num_classes=4, in_channels=1, image_size=8)


def test_width_needs_a_width_parameter_and_images_must_fit(factory_module):
    with pytest.raises(CsnError, match="takes no width argument"):
        create_model("mynets:fixed", num_classes=4, in_channels=1, width=2.0, image_size=8)
    with pytest.raises(CsnError, match="fails on a batch of 3-channel 8x8 images"):
        create_model("mynets:fixed", num_classes=4, in_channels=3, image_size=8)


def test_unknown_model_lists_the_forms():
    with pytest.raises(CsnError, match=r"closest: 'resnet20'.*package\.module:factory.*timm:NAME"):
        create_model("resnt20")


def test_timm_missing_is_one_sentence_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError, installed or not
    with pytest.raises(CsnError, match=r"needs timm, which is not installed; install it with `pip install 'csn\[timm\]'`"):
        create_model("timm:vit_tiny_patch16_224", num_classes=10, in_channels=1, image_size=28)


def test_timm_models_through_a_stub(stub_timm):
    vit = create_model("timm:tinyvit", num_classes=4, in_channels=1, image_size=8)
    assert vit.img_size == 8 and stub_timm.calls[-1] == ("tinyvit", False, {"num_classes": 4, "in_chans": 1, "img_size": 8})
    res = create_model("timm:tinyresnet", num_classes=4, in_channels=1, image_size=8)  # takes no img_size: retried
    assert stub_timm.calls[-1] == ("tinyresnet", False, {"num_classes": 4, "in_chans": 1})
    assert stages(res) == {"layer1": ["layer1.0", "layer1.1"], "layer2": ["layer2.0", "layer2.1"]}
    with pytest.raises(CsnError, match="timm has no model 'nope'"):
        create_model("timm:nope", num_classes=4, in_channels=1, image_size=8)
    with pytest.raises(CsnError, match="width=2 applies to csn's own models only"):
        create_model("timm:tinyvit", num_classes=4, in_channels=1, width=2.0, image_size=8)


def test_layers_give_the_read_points_and_stages(factory_module):
    cfg = tiny_config(model="mynets:build", layers="features.1,features.3")
    m = build_model_for(cfg, INFO)
    assert m.csn_stages == {"features.1": ["features.1"], "features.3": ["features.3"]}
    assert default_reg_layers(m) == ["features.1"]  # the regularizer: every stage but the last
    assert resolve_layers(m) == ["features.1", "features.3"]  # the analyses' default read points
    named = build_model_for(tiny_config(model="mynets:build", layers={"all": "features.1, features.3"}), INFO)
    assert named.csn_stages == {"all": ["features.1", "features.3"]}
    resnet = create_model("resnet20", in_channels=1)
    assert stages_from_patterns(resnet, ["layer1.*", "layer3.*"]) == {"layer1": ["layer1.0", "layer1.1", "layer1.2"],
                                                                     "layer3": ["layer3.0", "layer3.1", "layer3.2"]}
    assert stages_from_patterns(resnet, ["layer*.0", "layer*.2"]) == {"stage1": ["layer1.0", "layer2.0", "layer3.0"],
                                                                     "stage2": ["layer1.2", "layer2.2", "layer3.2"]}
    declared = build_model_for(tiny_config(model="mynets:declared", width=1.0), INFO)
    assert declared.csn_stages == {"conv": ["features.1", "features.3"]}


def test_layers_errors(factory_module):
    with pytest.raises(CsnError, match=r"declares no read points; give them as layer patterns.*layers = \["):
        build_model_for(tiny_config(model="mynets:build", width=1.0), INFO)
    with pytest.raises(CsnError, match="matches no module; available names"):
        build_model_for(tiny_config(model="mynets:build", layers=["featurs.1"]), INFO)
    with pytest.raises(CsnError, match="is in stages"):
        build_model_for(tiny_config(model="mynets:build", layers={"a": ["features.1"], "b": ["features.*"]}), INFO)
    with pytest.raises(CsnError, match="at least one pattern per stage"):
        build_model_for(tiny_config(model="mynets:build", layers={"a": []}), INFO)


def test_a_foreign_model_trains_regularized_and_is_analysed_at_its_layers(stub_timm, tmp_path):
    """timm:tinyvit (no declared read points) with layers: the regularizer and selectivity use the same units."""
    from csn.training.loop import train

    cfg = tiny_config(model="timm:tinyvit", width=1.0, layers=["blocks.0", "blocks.1", "blocks.2"], epochs=1.0,
                      reg_alpha=-1.0, reg_window="0:end")
    run = train(cfg, tmp_path / "timm", progress=False)
    model = run.build_model()
    assert model.csn_stages == {"blocks.0": ["blocks.0"], "blocks.1": ["blocks.1"], "blocks.2": ["blocks.2"]}
    reg = SelectivityRegularizer(model, num_classes=4)
    assert reg.layers == ["blocks.0", "blocks.1"]
    log = run.read("training")
    assert (log["reg_value"].notna()).all()
    sel = run_analysis(run, Selectivity(), checkpoints="first,last", progress=False).rows
    assert sorted(set(sel["layer"])) == ["blocks.0", "blocks.1", "blocks.2"]
    assert set(sel["stage"]) == {"blocks.0", "blocks.1", "blocks.2"}
    assert len(sel) == 2 * 3 * 8  # 2 checkpoints x 3 layers x 8 units (tokens averaged, features kept)


def test_block_patterns_on_a_csn_model_with_deeper_read_points():
    vit = create_model("vit-tiny", num_classes=4, in_channels=1, image_size=8, width=0.25)
    assert stages_from_patterns(vit, ["blocks.*"]) == {"blocks": [f"blocks.{i}" for i in range(6)]}
    vgg = nn.Sequential()  # a model without declared read points: 'x.*' names the direct children
    vgg.add_module("features", nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    assert resolve_layers(vgg, "features.*") == ["features.0", "features.1"]
    assert torch.is_tensor(vit(torch.zeros(1, 1, 8, 8)))


def test_a_model_whose_forward_needs_real_tensors_trains(factory_module, tmp_path):
    """The size check builds a skeleton on the meta device; the start-up forward check runs on the real model only."""
    from csn.training.loop import train

    run = train(tiny_config(model="mynets:picky", width=1.0, layers=["features.1", "features.3"], epochs=1.0),
                tmp_path / "p",
                progress=False)
    assert run.checkpoints[-1].metrics["test_acc"] >= 0
