"""The regularizer's statistics (issue 23): csn's (class means over the global batch) and the study's (class sums
within groups of a process's batch, eps 1e-6), and how the stages combine (reduce mean / sum).

Every variant is checked against a float64 reference written here with explicit loops over groups, classes and
units (it does not call csn's CSI); then gradients, data parallelism (groups per process), `csn train` and errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from csn.cli import main as cli
from csn.core.stats import STUDY_EPS, batch_csi_nowait, group_csi_nowait
from csn.errors import CsnError
from csn.models import create_model
from csn.runs.config import TrainConfig, preset
from csn.runs.run import Run
from csn.training.loop import train
from csn.training.regularizer import SelectivityRegularizer, check_group_fits

HERE = Path(__file__).resolve()


# ================================================================================================
# the reference: explicit loops, float64, nothing from csn
# ================================================================================================

def _groups(n: int, group: int | str) -> list[list[int]]:
    """Example indices of each group: the whole batch, or runs of `group` consecutive examples (last one shorter)."""
    if group == "batch":
        return [list(range(n))]
    return [list(range(start, min(start + group, n))) for start in range(0, n, group)]


def _naive_unit_csi(acts: list[list[float]], labels: list[int], statistic: str, group: int | str,
                    eps: float) -> list[float] | None:
    """Per unit: the mean over contributing groups of the CSI over the classes present in the group; None if no
    group has two classes present."""
    per_unit = []
    for u in range(len(acts[0])):
        values = []
        for members in _groups(len(labels), group):
            classes = sorted({labels[i] for i in members})
            if len(classes) < 2:
                continue
            stat = []
            for k in classes:
                col = [acts[i][u] for i in members if labels[i] == k]
                stat.append(sum(col) if statistic == "sums" else sum(col) / len(col))
            top = max(stat)
            rest = (sum(stat) - top) / (len(stat) - 1)
            values.append((top - rest) / (top + rest + eps))
        if not values:
            return None
        per_unit.append(sum(values) / len(values))
    return per_unit


def _naive_r(acts_by_stage: dict[str, list[torch.Tensor]], labels: torch.Tensor, statistic: str, group: int | str,
             reduce: str, eps: float) -> tuple[dict[str, float], float] | None:
    """(stage values, R): each stage the mean over its units (all its layers), R their mean or sum."""
    y = [int(v) for v in labels]
    stage_vals = {}
    for stage, layers in acts_by_stage.items():
        units: list[float] = []
        for a in layers:
            got = _naive_unit_csi(a.double().tolist(), y, statistic, group, eps)
            if got is None:
                return None
            units += got
        stage_vals[stage] = sum(units) / len(units)
    total = sum(stage_vals.values())
    return stage_vals, (total / len(stage_vals) if reduce == "mean" else total)


def _post_relu(n: int, u: int, g: torch.Generator) -> torch.Tensor:
    """Post-ReLU-like activations: a third exact zeros, the rest skewed positive."""
    x = torch.randn(n, u, generator=g, dtype=torch.float64)
    return torch.relu(x + 0.4) ** 1.5


# labels with: unbalanced classes, a group holding one class only, a short last group (of 3, or of 1 image)
LABELS = {
    "groups-of-5": ([0, 1, 2, 0, 3,  2, 2, 2, 2, 2,  1, 1, 0, 3, 3,  4, 0, 1, 1, 2,  3, 0, 3], 5),
    "last-group-of-1": ([0, 1, 0, 1, 1, 1, 2, 2, 0, 3, 3], 5),
    "groups-of-2": ([0, 0, 1, 2, 3, 3, 4, 1, 2], 2),
    "one-group": ([4, 1, 1, 0, 2, 2, 2], 7),
}


@pytest.mark.parametrize("statistic", ["means", "sums"])
@pytest.mark.parametrize("case", sorted(LABELS))
def test_statistics_match_the_loop_reference(statistic, case):
    labels, group = LABELS[case]
    y = torch.tensor(labels)
    g = torch.Generator().manual_seed(len(labels) * 7 + group)
    acts = _post_relu(len(labels), 6, g)
    eps = STUDY_EPS if statistic == "sums" else 1e-7
    for grp in (group, "batch"):
        if grp == "batch":
            csi, present = batch_csi_nowait(acts, y, 5, eps, statistic == "sums")
            assert int(present) == len(set(labels))
        else:
            csi, contributing = group_csi_nowait(acts, y, 5, grp, eps, statistic == "sums")
            expected_groups = sum(len({labels[i] for i in m}) >= 2 for m in _groups(len(labels), grp))
            assert int(contributing) == expected_groups
        ref = _naive_unit_csi(acts.tolist(), labels, statistic, grp, eps)
        assert csi.dtype == torch.float64
        assert max(abs(a - b) for a, b in zip(csi.tolist(), ref, strict=True)) < 1e-10, (case, grp)


def test_a_group_of_the_whole_batch_is_the_batch_statistic_and_groups_without_two_classes_count_nothing():
    g = torch.Generator().manual_seed(3)
    acts = _post_relu(12, 4, g)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2, 2, 3, 3, 0, 1])
    for sums in (False, True):
        whole, n = group_csi_nowait(acts, y, 4, 12, 1e-7, sums)
        batch, _ = batch_csi_nowait(acts, y, 4, 1e-7, sums)
        assert int(n) == 1 and torch.allclose(whole, batch, rtol=1e-12, atol=1e-14)
    # every group of 3 holds one class: nothing contributes, the value is 0 (finite), and its gradient 0
    y1 = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    a = acts.clone().requires_grad_()
    csi, n = group_csi_nowait(a, y1, 4, 3, STUDY_EPS, True)
    assert int(n) == 0 and torch.equal(csi, torch.zeros(4, dtype=torch.float64))
    csi.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


def _mlp():
    torch.manual_seed(0)
    return create_model("mlp", num_classes=5, in_channels=1, image_size=6, width=0.2).double()


VARIANTS = [(s, grp, red) for s in ("means", "sums") for grp in ("batch", 4, 5) for red in ("mean", "sum")]


@pytest.mark.parametrize("statistic,group,reduce", VARIANTS)
def test_regularizer_r_matches_the_loop_reference(statistic, group, reduce):
    """Every variant of R through the model's hooks: stage values, R, value_nowait."""
    model = _mlp()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(23, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.tensor(LABELS["groups-of-5"][0])
    reg = SelectivityRegularizer(model, ["relu1", "relu2"], num_classes=5, statistic=statistic, group=group,
                                 reduce=reduce)
    assert reg.eps == (STUDY_EPS if statistic == "sums" else 1e-7)
    with reg:
        model(x)
        stage_vals = reg.stage_values(y)
        r = reg.value(y)
        r_nowait, counted = reg.value_nowait(y)
        acts = {k: v.detach() for k, v in reg.activations.items()}
    ref_stages, ref_r = _naive_r({"hidden1": [acts["relu1"]], "hidden2": [acts["relu2"]]}, y, statistic, group, reduce,
                                 reg.eps)
    assert set(stage_vals) == set(ref_stages)
    for s, v in ref_stages.items():
        assert abs(float(stage_vals[s].detach()) - v) < 1e-10
    assert abs(float(r.detach()) - ref_r) < 1e-10 and bool(counted) and torch.equal(r_nowait, r)


def test_reduce_sum_is_the_sum_of_the_stage_values():
    model = _mlp()
    x = torch.randn(16, 1, 6, 6, dtype=torch.float64)
    y = torch.arange(16) % 5
    with SelectivityRegularizer(model, ["relu1", "relu2"], num_classes=5, reduce="sum") as reg:
        model(x)
        vals = reg.stage_values(y)
        total = reg.value(y)
    with SelectivityRegularizer(model, ["relu1", "relu2"], num_classes=5) as mean_reg:
        model(x)
        mean = mean_reg.value(y)
    assert torch.equal(total, vals["hidden1"] + vals["hidden2"])
    assert abs(float(total) - 2 * float(mean)) < 1e-12


def test_batch_skipped_when_no_group_has_two_classes():
    model = _mlp()
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # two classes in the batch, one in each group of 4
    grouped = SelectivityRegularizer(model, ["relu1"], num_classes=5, statistic="sums", group=4)
    with grouped:
        model(x)
        assert grouped.value(y) is None
        r, counted = grouped.value_nowait(y)
    assert grouped.skipped == 1 and not bool(counted) and float(r) == 0.0
    with SelectivityRegularizer(model, ["relu1"], num_classes=5) as whole:  # the batch statistic counts it
        model(x)
        assert whole.value(y) is not None


# ================================================================================================
# gradients
# ================================================================================================

@pytest.mark.parametrize("sums", [False, True])
def test_gradcheck_grouped_statistic(sums):
    g = torch.Generator().manual_seed(2)
    acts = (torch.rand(8, 3, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    y = torch.tensor([0, 1, 1, 2, 2, 2, 0, 3])  # groups of 3: {0,1}, {2} (counts nothing), {0,3} (short)
    assert torch.autograd.gradcheck(lambda a: group_csi_nowait(a, y, 4, 3, STUDY_EPS, sums)[0], (acts,))


def test_gradcheck_through_the_model_with_groups_and_reduce_sum():
    model = _mlp()
    x = torch.randn(9, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 0, 0, 3, 4, 4])
    reg = SelectivityRegularizer(model, ["relu1", "relu2"], num_classes=5, statistic="sums", group=4, reduce="sum")

    def f(inp):
        with reg:
            model(inp)
            return reg.value(y)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(),), eps=1e-6, atol=1e-5)


# ================================================================================================
# data parallelism: groups are per process, the batch statistic stays global
# ================================================================================================

def _worker_ddp(out: str) -> None:
    from csn import dist as distributed

    distributed.init_from_env()
    rank, world = distributed.rank(), distributed.world_size()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 1, 6, 6, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 1, 1, 1, 3, 3, 2, 4])
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=5, in_channels=1, image_size=6, width=0.2)
    sl = slice(rank * 16 // world, (rank + 1) * 16 // world)
    got = {}
    for name, kw in [("group", dict(statistic="sums", group=4)), ("batch", {}), ("study-whole", dict(statistic="sums",
                                                                                                      group=8))]:
        reg = SelectivityRegularizer(model, ["relu1", "relu2"], num_classes=5, **kw)
        with reg:
            model(x[sl])
            got[name] = float(reg.value(y[sl]).detach())
    every = distributed.all_gather_objects(got)
    if distributed.is_main():
        torch.save({"x": x, "y": y, "ranks": every, "world": world}, Path(out) / "ddp.pt")


def test_ddp_groups_are_per_process_and_the_batch_statistic_is_global(tmp_path):
    from tests.test_distributed import _ok, _torchrun

    _ok(_torchrun(tmp_path, str(HERE), "ddp", str(tmp_path), module=True))
    saved = torch.load(tmp_path / "ddp.pt")
    x, y, ranks, world = saved["x"], saved["y"], saved["ranks"], saved["world"]
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=5, in_channels=1, image_size=6, width=0.2)

    def single(kw, sl):
        with SelectivityRegularizer(model, ["relu1", "relu2"], num_classes=5, **kw) as reg:
            model(x[sl])
            return float(reg.value(y[sl]).detach())

    for rank in range(world):
        sl = slice(rank * 16 // world, (rank + 1) * 16 // world)
        assert ranks[rank]["group"] == pytest.approx(single(dict(statistic="sums", group=4), sl), abs=1e-6)
        assert ranks[rank]["study-whole"] == pytest.approx(single(dict(statistic="sums", group=8), sl), abs=1e-6)
        assert ranks[rank]["batch"] == pytest.approx(single({}, slice(None)), abs=1e-6)  # the global batch's CSI
    assert ranks[0]["group"] != pytest.approx(ranks[1]["group"], abs=1e-4)  # each process its own value
    assert ranks[0]["batch"] == ranks[1]["batch"]


# ================================================================================================
# configuration, `csn train`, bitwise default
# ================================================================================================

def test_reg_mode_resolves_and_is_recorded():
    base = preset("smoke")
    assert base.reg_resolved == {"statistic": "means", "group": "batch", "eps": 1e-7, "reduce": "mean"}
    study = base.override(["reg_mode=study"])  # a preset's recorded csn values do not pin the statistic
    assert study.reg_resolved == {"statistic": "sums", "group": 32, "eps": 1e-6, "reduce": "mean"}
    assert study.override(["reg_statistic=sums", "reg_group=32", "reg_reduce=sum"]).reg_resolved["reduce"] == "sum"
    custom = base.override(["reg_statistic=sums", "reg_group=64"])  # the study's statistic in groups of 64
    assert custom.reg_resolved == {"statistic": "sums", "group": 64, "eps": 1e-6, "reduce": "mean"}
    # the record round-trips: run.json's config (with reg_resolved) reads back as the same config
    for cfg in (base, study, custom):
        back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg and back.reg_resolved == cfg.reg_resolved
    assert base.override(['reg_group="16"']).reg_group == 16 and base.override(["reg_group=batch"]).reg_group == "batch"


def _sha(run: Run) -> list[str]:
    return [c.sha256 for c in run.checkpoints]


def test_default_keys_train_bitwise_as_explicit_csn_keys(tmp_path):
    """reg_statistic=means, reg_group=batch (csn's) take the existing code path: the same weights, bit for bit."""
    kw = dict(epochs=0.5, reg_alpha=-3.0, reg_window="0:end", synthetic=dict(num_train=256, num_test=64, num_classes=4,
                                                                          channels=1, size=12))
    default = train(preset("smoke").replace(**kw), tmp_path / "default", progress=False)
    explicit = train(preset("smoke").replace(reg_mode="csn", reg_statistic="means", reg_group="batch",
                                             reg_reduce="mean", **kw), tmp_path / "explicit", progress=False)
    assert len(_sha(default)) >= 2 and _sha(default) == _sha(explicit)
    study = train(preset("smoke").replace(reg_mode="study", **kw), tmp_path / "study", progress=False)
    assert _sha(study)[0] == _sha(default)[0] and _sha(study)[-1] != _sha(default)[-1]  # same init, other statistic


def test_csn_train_study_mode_runs_and_records_what_it_ran(tmp_path):
    out = tmp_path / "study"
    res = CliRunner().invoke(cli, ["train", "--preset", "smoke", "--reg-mode", "study", "--reg-alpha", "-20",
                                   "--reg-window", "0:end", "--out", str(out), "--quiet", "epochs=0.5"])
    assert res.exit_code == 0, res.output
    run = Run(out)
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["reg_mode"] == "study"
    assert config["reg_resolved"] == {"statistic": "sums", "group": 32, "eps": 1e-6, "reduce": "mean"}
    assert run.config.reg_resolved["group"] == 32
    log = run.read("training")
    assert (log["alpha"] == -20).all() and log["reg_value"].notna().all()


# ================================================================================================
# errors: one line each
# ================================================================================================

@pytest.mark.parametrize("pairs,msg", [
    (["reg_group=1"], "reg_group.*>= 2"),
    (["reg_group=0"], "reg_group.*>= 2"),
    (["reg_group=-32"], "reg_group.*>= 2"),
    (["reg_group=2.5"], "reg_group.*>= 2"),
    (["reg_group=true"], "reg_group"),
    (["reg_group=all"], "reg_group.*'batch'"),
    (["reg_statistic=mean"], "'means' or 'sums'"),
    (["reg_reduce=max"], "'mean' or 'sum'"),
    (["reg_mode=paper"], "'csn' or 'study'"),
    (["reg_mode=study", "reg_statistic=means"], "drop reg_statistic, or set reg_mode=csn"),
    (["reg_mode=study", "reg_group=64"], "reg_mode=csn reg_statistic=sums reg_group=64"),
    (["reg_mode=study", "reg_group=batch"], "drop reg_group"),
])
def test_bad_config_values_are_one_line_errors(pairs, msg):
    with pytest.raises(CsnError, match=msg) as e:
        preset("smoke").override(pairs)
    assert "\n" not in str(e.value)


def test_group_larger_than_the_process_batch_is_refused_at_start_up(tmp_path):
    cfg = preset("smoke").replace(reg_alpha=-1.0, reg_window="0:end", reg_group=128, epochs=0.5)
    with pytest.raises(CsnError, match=r"reg_group=128 is larger than the 64 images .*choose reg_group <= 64") as e:
        train(cfg, tmp_path / "bad", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "bad" / "checkpoints").exists()
    with pytest.raises(CsnError, match="32 images each process .*batch_size=64 over 2 processes"):
        check_group_fits(48, 64, 2)
    check_group_fits(32, 64, 2)
    check_group_fits("batch", 1, 8)


def test_bad_regularizer_arguments_are_one_line_errors():
    model = _mlp()
    for kw, msg in [(dict(statistic="mean"), "unknown regularizer statistic 'mean'"),
                    (dict(reduce="max"), "unknown regularizer reduce 'max'"),
                    (dict(group=1), "group must be 'batch' or a number of images >= 2"),
                    (dict(group=True), "group must be"), (dict(group="32"), "group must be"),
                    (dict(group=2.0), "group must be")]:
        with pytest.raises(CsnError, match=msg) as e:
            SelectivityRegularizer(model, ["relu1"], num_classes=5, **kw)
        assert "\n" not in str(e.value)


def test_cli_bad_group_is_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["train", "--preset", "smoke", "--reg-group", "1", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "reg_group" in lines[0], res.output


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"ddp": _worker_ddp}[sys.argv[1]](*sys.argv[2:])
