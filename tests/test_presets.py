"""Presets in one format: every shipped preset is a TOML file under csn/presets/<kind>/, loads and validates by its
kind's schema, is listed by `csn presets` and printed as a template that works as a file."""

import pytest
from click.testing import CliRunner

from csn.cli import main
from csn.core import presets
from csn.errors import CsnError
from csn.experiments.regime import RegimePreset, get_regime_preset
from csn.experiments.study import load_study
from csn.experiments.windows import WindowsPreset, get_windows_preset
from csn.runs.config import TrainConfig, preset


@pytest.mark.parametrize("kind, load, schema", [("train", preset, TrainConfig), ("windows", get_windows_preset, WindowsPreset),
                                                ("regime", get_regime_preset, RegimePreset)])
def test_every_shipped_preset_validates(kind, load, schema):
    names = presets.names(kind)
    assert len(names) >= 2
    for name in names:
        got = load(name)
        assert isinstance(got, schema) and got.name == name  # a file's name and its name key agree


def test_every_shipped_study_loads_and_names_a_training_preset():
    for name in presets.names("study"):
        _, cfg = load_study(name)
        assert cfg.train.name in presets.names("train") or name == "fmnist-vit"


def test_unknown_presets_are_one_sentence_with_the_closest():
    for kind, load in (("preset", preset), ("windows preset", get_windows_preset), ("regime preset", get_regime_preset)):
        with pytest.raises(CsnError, match=f"unknown {kind} 'smok' .closest: 'smoke'") as e:
            load("smok")
        assert "\n" not in str(e.value)


def test_csn_presets_lists_and_prints_a_template_that_runs_as_a_file(tmp_path):
    res = CliRunner().invoke(main, ["presets"])
    assert res.exit_code == 0
    for kind in presets.KINDS:
        assert f"{kind}:" in res.output
        for name in presets.names(kind):
            assert f"  {name} " in res.output
    res = CliRunner().invoke(main, ["presets", "study", "smoke"])
    assert res.exit_code == 0 and "[study]" in res.output
    path = tmp_path / "mine.toml"
    path.write_text(res.output)
    assert load_study(config=path)[1] == load_study("smoke")[1]
    res = CliRunner().invoke(main, ["presets", "windows", "nope"])
    assert res.exit_code == 2 and "unknown windows preset 'nope'" in res.output
