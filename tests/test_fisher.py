"""csn fisher: per-stage traces of the Fisher information (vmap vs a float64 loop, closed forms, the analysis)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from csn.analysis.fisher import (
    ALL,
    OTHER,
    Fisher,
    FisherSetup,
    fisher_frame,
    fisher_sums,
    label_uniforms,
    parameter_groups,
)
from csn.cli import main as cli
from csn.errors import CsnError
from csn.models import create_model
from csn.report.html import build_report
from csn.report.page import Page
from csn.report.sections.fisher import fisher_section
from csn.runs import Run
from tests.conftest import analyze


def _random_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random BatchNorm running statistics and affine parameters (so eval-mode BN is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * 0.1)
    return model


def _tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return _random_bn(create_model("resnet8", num_classes=5, in_channels=1, width=0.25)).double().eval()


def _inverse_cdf(p: list[float], u: float) -> int:
    """The reference draw: the first class whose cumulative probability reaches u (plain Python)."""
    acc = 0.0
    for k, pk in enumerate(p):
        acc += pk
        if acc >= u:
            return k
    return len(p) - 1


def _loop_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, labels: str,
                    groups: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per group, (1/N) sum_i sum_y w_y ||grad_group log p(y|x_i)||^2 by a plain loop over examples (and classes),
    one autograd.grad per (example, label): w = p(y|x_i) over every class ('exact'), else the one label; and the
    per-example terms [N, G]."""
    params = dict(model.named_parameters())
    out = np.zeros((len(x), len(groups)))
    for i in range(len(x)):
        lp = model(x[i:i + 1]).log_softmax(-1)[0]
        p = lp.detach().exp().tolist()
        if labels == "exact":
            pairs = list(enumerate(p))
        elif labels == "sampled":
            pairs = [(_inverse_cdf(p, float(y[i])), 1.0)]
        else:
            pairs = [(int(y[i]), 1.0)]
        for label, w in pairs:
            grads = dict(zip(params, torch.autograd.grad(lp[label], list(params.values()), retain_graph=True)))
            for j, names in enumerate(groups.values()):
                out[i, j] += w * sum(float(grads[n].pow(2).sum()) for n in names)
    return out.mean(0), out


# ------------------------------------------------------------------------------------------------
# 1. vmap per-example gradients vs a float64 loop over examples
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("labels", ["sampled", "true", "exact"])
def test_vmap_traces_equal_a_float64_loop_over_examples(labels, one_thread):
    model = _tiny_resnet()
    groups = parameter_groups(model, model.csn_stages)
    assert list(groups) == ["layer1", "layer2", "layer3", OTHER]
    assert sorted(n for names in groups.values() for n in names) == sorted(n for n, _ in model.named_parameters())
    assert groups[OTHER] == ["conv1.weight", "bn1.weight", "bn1.bias", "fc.weight", "fc.bias"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 1, 8, 8, generator=g, dtype=torch.float64)
    y = label_uniforms(13, 5) if labels == "sampled" else torch.randint(0, 5, (13,), generator=g)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]  # chunks of 4 straddle the batches: the sums do not care
    modules = list(model.modules())
    got = fisher_sums(model, batches, FisherSetup(labels, groups, chunk=4))
    assert list(model.modules()) == modules  # the BatchNorm modules are the model's own again (affine_batchnorm)
    assert got.n == 13 and got.sums.dtype == torch.float64
    ref, per = _loop_reference(model, x, y, labels, groups)
    assert (ref > 0).all()
    np.testing.assert_allclose(got.sums.numpy() / got.n, ref, rtol=1e-10, atol=0)
    squares = np.append((per**2).sum(0), (per.sum(1) ** 2).sum())  # per group, and of the sum over the groups
    np.testing.assert_allclose(got.squares.numpy(), squares, rtol=1e-10, atol=0)
    frame = fisher_frame(got, groups, {g: 1 for g in groups})
    se = np.append(per.std(0, ddof=1), per.sum(1).std(ddof=1)) / np.sqrt(13)
    np.testing.assert_allclose(frame["trace_se"].to_numpy(), se, rtol=1e-8)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # no .grad left behind


def test_sampled_labels_follow_the_uniforms_and_differ_from_true_labels(one_thread):
    """The sampled trace is the loop's with the labels drawn by inverse CDF from the uniforms, and differs from the
    trace of other (true) labels: the mode is not silently ignored."""
    model = _tiny_resnet()
    groups = parameter_groups(model, model.csn_stages)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u = label_uniforms(8, 11)
    drawn = torch.tensor([_inverse_cdf(model(x[i:i + 1]).softmax(-1)[0].tolist(), float(u[i])) for i in range(8)])
    a = fisher_sums(model, [(x, u)], FisherSetup("sampled", groups, chunk=3)).sums
    b = fisher_sums(model, [(x, drawn)], FisherSetup("true", groups, chunk=8)).sums
    c = fisher_sums(model, [(x, (drawn + 1) % 5)], FisherSetup("true", groups, chunk=8)).sums
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)
    assert not np.allclose(a.numpy(), c.numpy(), rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# 2. a known answer: softmax regression
# ------------------------------------------------------------------------------------------------

def _softmax_regression(d: int = 6, c: int = 4) -> tuple[nn.Module, dict]:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(d, c)).double()
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # confident enough that p is far from uniform
    return model, {"weight": ["0.weight"], "bias": ["0.bias"]}


def test_softmax_regression_exact_and_true_fisher_have_closed_forms():
    """For p = softmax(Wx + b): grad_W log p(y|x) = (e_y - p) x^T and grad_b = e_y - p, so
    E_y ||grad_W||^2 = (1 - ||p||^2) ||x||^2 and E_y ||grad_b||^2 = 1 - ||p||^2 (exact), and with a given y
    ||grad_W||^2 = (1 - 2 p_y + ||p||^2) ||x||^2 (true)."""
    model, groups = _softmax_regression()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (50,), generator=g)
    with torch.no_grad():
        p = model(x).softmax(-1)
    sq_x, sq_p = x.pow(2).sum(1), p.pow(2).sum(1)
    exact = fisher_sums(model, [(x, y)], FisherSetup("exact", groups, chunk=16)).sums
    n = 50
    expect = torch.stack([((1 - sq_p) * sq_x).mean(), (1 - sq_p).mean()])
    np.testing.assert_allclose(exact.numpy() / n, expect.numpy(), rtol=1e-12)
    true = fisher_sums(model, [(x, y)], FisherSetup("true", groups, chunk=16)).sums
    p_y = p.gather(1, y[:, None])[:, 0]
    expect_true = torch.stack([((1 - 2 * p_y + sq_p) * sq_x).mean(), (1 - 2 * p_y + sq_p).mean()])
    np.testing.assert_allclose(true.numpy() / n, expect_true.numpy(), rtol=1e-12)
    assert not np.allclose(true.numpy(), exact.numpy(), rtol=0.05)  # the empirical Fisher is not the Fisher


def test_sampled_fisher_is_unbiased_for_the_closed_form():
    """Many independent draws per example: the mean of the sampled estimates approaches the closed form (the
    sampled estimate is unbiased), within 4 standard errors of the Monte-Carlo mean."""
    model, groups = _softmax_regression()
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    reps = 400
    xs = x.repeat(reps, 1)
    u = label_uniforms(len(xs), 21)
    per = []
    for i in range(0, len(xs), 10):
        s = fisher_sums(model, [(xs[i:i + 10], u[i:i + 10])], FisherSetup("sampled", groups, chunk=10)).sums
        per.append(s.numpy() / 10)
    per = np.array(per)  # [reps, 2]: one sampled estimate of tr F per repetition
    with torch.no_grad():
        p = model(x).softmax(-1)
    closed = np.array([((1 - p.pow(2).sum(1)) * x.pow(2).sum(1)).mean(), (1 - p.pow(2).sum(1)).mean()])
    se = per.std(0, ddof=1) / np.sqrt(reps)
    assert (np.abs(per.mean(0) - closed) < 4 * se).all(), (per.mean(0), closed, se)
    assert (se < 0.05 * closed).all()  # the check has power: 4 SE is a few percent of the value


# ------------------------------------------------------------------------------------------------
# 3. the analysis on a tiny trained run
# ------------------------------------------------------------------------------------------------

def test_fisher_analysis_rows_resume_and_determinism(tiny_run, tmp_path):
    res = analyze(Fisher, tiny_run, checkpoints="first,last", samples=48, chunk=7)
    df = res.rows
    steps = sorted(df["step"].unique())
    assert len(steps) == 2 and steps[0] == 0 and len(res.computed) == 2
    assert list(df[df["step"] == steps[0]]["stage"]) == ["layer1", "layer2", "layer3", OTHER, ALL]
    model = Run(tiny_run).build_model()
    for _, d in df.groupby("step"):
        d = d.set_index("stage")
        assert d.loc[ALL, "n_params"] == sum(p.numel() for p in model.parameters())
        assert d.loc[ALL, "trace"] == pytest.approx(d.drop(ALL)["trace"].sum(), rel=1e-12)
        assert d.loc[ALL, "n_params"] == d.drop(ALL)["n_params"].sum()
        assert (d["trace"] > 0).all() and (d["trace_se"] > 0).all() and (d["trace_se"] < d["trace"]).all()
        assert d["trace_per_param"].to_numpy() == pytest.approx((d["trace"] / d["n_params"]).to_numpy())
    assert set(df["split"]) == {"test"} and set(df["labels"]) == {"sampled"} and set(df["n_images"]) == {48}
    assert set(df["seed"]) == {6151}
    assert df.loc[df["step"] == 0, "bn_recalibrated"].iloc[0] > 0  # the BN policy applies (before epoch 1)
    again = analyze(Fisher, tiny_run, checkpoints="first,last", samples=48)
    assert again.computed == []  # resumed: nothing computed (the chunk does not change the result)
    pd.testing.assert_frame_equal(again.rows, df, check_dtype=False)
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    (other / "tables" / "fisher.parquet").unlink()
    third = analyze(Fisher, other, checkpoints="last,first", samples=48)  # another chunk, another order
    pd.testing.assert_frame_equal(third.rows.sort_values(["step"], kind="stable").reset_index(drop=True),
                                  df.reset_index(drop=True), check_dtype=False, check_exact=False,
                                  rtol=1e-6)


def test_fisher_checkpoint_selection_and_labels(tiny_run):
    run = Run(tiny_run)
    last = run.checkpoints[-1].step
    res = analyze(Fisher, tiny_run, checkpoints="end", samples=32, labels="exact", tag="exact")
    assert set(res.rows["step"]) == {last} and set(res.rows["seed"]) == {-1}
    assert run.table_path("fisher-exact").is_file() and not run.table_path("fisher").exists()
    sampled = analyze(Fisher, tiny_run, checkpoints=f"step={last}", samples=32).rows
    true = analyze(Fisher, tiny_run, checkpoints="end", samples=32, labels="true", tag="true").rows
    exact = res.rows.set_index("stage")["trace"]
    s, t = sampled.set_index("stage")["trace"], true.set_index("stage")["trace"]
    assert (s != exact).any() and (t != exact).any()
    assert s[ALL] == pytest.approx(exact[ALL], rel=0.5)  # one draw per example estimates the expectation
    with pytest.raises(CsnError, match="--labels"):
        analyze(Fisher, tiny_run, checkpoints="end", samples=32, labels="true")  # the default table is 'sampled'
    with pytest.raises(CsnError, match="--samples"):
        analyze(Fisher, tiny_run, checkpoints="end", samples=16)


@pytest.mark.parametrize("kw, match", [
    (dict(labels="model"), r"labels.*'sampled', 'true' or 'exact'|labels"),
    (dict(samples=0), "samples"),
    (dict(chunk=0), "chunk"),
    (dict(seed=-1), "seed"),
    (dict(split="val"), "split"),
])
def test_bad_options_are_one_sentence(tiny_run, kw, match):
    with pytest.raises(CsnError, match=match) as e:
        analyze(Fisher, tiny_run, checkpoints="end", **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.rstrip().endswith(".")


def test_bad_checkpoint_selection_is_one_sentence(tiny_run):
    with pytest.raises(CsnError) as e:
        analyze(Fisher, tiny_run, checkpoints="step=zz", samples=32)
    assert "\n" not in str(e.value)


def test_a_stage_named_all_is_refused():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(CsnError, match="rename the stage"):
        parameter_groups(model, {"all": ["0"]})
    groups = parameter_groups(model, {"relus": ["1"]})  # read points without parameters: all in 'other'
    assert groups == {"relus": [], OTHER: ["0.weight", "0.bias"]}


def test_csn_fisher_command_writes_the_table_and_the_figure(tiny_run):
    runner = CliRunner()
    res = runner.invoke(cli, ["fisher", str(tiny_run), "--checkpoints", "first,last", "--samples", "32", "--plot",
                              "--quiet"])
    assert res.exit_code == 0, res.output
    assert "2 checkpoints (2 computed), 10 rows of fisher" in res.output and "peaks at step" in res.output
    run = Run(tiny_run)
    assert len(run.read("fisher")) == 10
    assert (run.report_dir / "fisher.png").is_file() and (run.report_dir / "fisher.svg").is_file()
    helped = runner.invoke(cli, ["fisher", "--help"])
    assert helped.exit_code == 0 and "--labels" in helped.output and "--seed" in helped.output
    bad = runner.invoke(cli, ["fisher", str(tiny_run), "--labels", "model"])
    assert bad.exit_code == 2 and "'model' is not one of 'sampled', 'true', 'exact'" in bad.output
    mixed = runner.invoke(cli, ["fisher", str(tiny_run), "--checkpoints", "last", "--samples", "32", "--labels", "true"])
    assert mixed.exit_code == 2 and mixed.output.startswith("error: ") and "--labels" in mixed.output
    assert mixed.output.strip().count("\n") == 0


def test_fisher_under_torchrun_equals_one_process(tiny_run_master, tmp_path):
    """2 gloo processes, each its share of the examples (sums all-reduced) or whole checkpoints: the rows of one
    process (the labels drawn from the same uniforms)."""
    import json

    from tests.test_distributed import _assert_tables_equal, _torchrun

    runs = {k: tmp_path / k / "tiny" for k in ("single", "split", "ckpt")}
    for d in runs.values():
        shutil.copytree(tiny_run_master, d)
    args = ["--checkpoints", "first,f0.5,last", "--samples", "50", "--quiet"]  # 50: shares of 25, 2 batches of 48 + 2
    res = CliRunner().invoke(cli, ["fisher", str(runs["single"]), *args])
    assert res.exit_code == 0, res.output
    jobs = [["fisher", str(runs["split"]), *args], ["fisher", str(runs["ckpt"]), *args, "--distribute", "checkpoints"]]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    p = _torchrun(tmp_path, "cli", str(tmp_path / "jobs.json"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    single = Run(runs["single"]).read("fisher")
    for k in ("split", "ckpt"):
        _assert_tables_equal(single, Run(runs[k]).read("fisher"), f"fisher ({k})")


def test_report_shows_the_fisher_section_with_a_fisher_table(tiny_run, tmp_path):
    """No fisher table, no section; with one: the figure, and per stage the peak step read from the table."""
    assert fisher_section(Page(tmp_path, [], None, print)) is None
    res = CliRunner().invoke(cli, ["fisher", str(tiny_run), "--checkpoints", "first,last", "--samples", "32", "--quiet"])
    assert res.exit_code == 0, res.output
    html = build_report([tiny_run], out=tmp_path / "after", progress=False).read_text()
    assert 'id="fisher"' in html and "Fisher information per stage" in html and "could not be drawn" not in html
    t = Run(tiny_run).read("fisher")
    layer1 = t[t["stage"] == "layer1"].sort_values("step")
    peak = int(layer1["step"].iloc[int(np.argmax(layer1["trace"].to_numpy()))])
    table = html[html.index('id="fisher"'):]
    assert re.search(rf"<td>layer1</td>\s*<td>{peak}</td>", table), table[:2000]
