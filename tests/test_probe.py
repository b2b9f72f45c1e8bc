"""The linear probe (csn.analysis.probe): planted linear separability gives the expected accuracy, the fit equals an
independent naive float64 Newton reference on the same objective, and `csn probe` end to end on the tiny run
(resume, --checkpoints, determinism, bad options, --plot)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from csn.analysis.base import analysis_model, split_of
from csn.analysis.probe import (
    GRAD_TOL,
    PROBE_SEED,
    Probe,
    StageData,
    fit_probe,
    probe_objective,
    probe_stage,
    score,
    standardize,
)
from csn.cli import main as cli
from csn.core.units import default_layers
from csn.errors import CsnError
from csn.report.html import build_report
from csn.report.page import Page
from csn.report.sections.probe import probe_section
from csn.runs.run import Run
from tests.conftest import analyze

# ------------------------------------------------------------------------------------------------
# planted separability
# ------------------------------------------------------------------------------------------------


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _two_gaussians(n: int, d: int, sep: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two equiprobable classes N(±mu, I) in d dimensions with ||mu|| = sep / 2, one direction random: the Bayes
    rule is linear and its accuracy is Phi(sep / 2)."""
    y = torch.randint(0, 2, (n,), generator=gen)
    u = torch.randn(d, generator=gen, dtype=torch.float64)
    mu = u / u.norm() * sep / 2
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) + (2 * y[:, None] - 1) * mu
    return x * torch.linspace(0.5, 3.0, d, dtype=torch.float64) + 7.0, y  # scaled and shifted: standardization's job


@pytest.mark.parametrize("sep", [1.0, 2.0, 4.0])
def test_planted_gaussians_give_the_bayes_accuracy(sep):
    """Three feature sets with known Bayes accuracies (0.69, 0.84, 0.98): a probe fit on 20,000 images scores within
    0.01 of it on 20,000 others (binomial SD <= 0.0033; the probe's estimation excess is ~d/n)."""
    gen = torch.Generator().manual_seed(int(sep * 10))
    x, y = _two_gaussians(40_000, 8, sep, gen)
    data = StageData(x[:20_000], y[:20_000], x[20_000:], y[20_000:])
    out = probe_stage(data, 2, 1e-3)
    bayes = _phi(sep / 2)
    assert out["converged"] and out["n_features"] == 8 and out["n_constant"] == 0
    assert abs(out["acc"] - bayes) < 0.01, (out["acc"], bayes)


def test_perfectly_separable_classes_give_accuracy_one_and_noise_gives_chance():
    gen = torch.Generator().manual_seed(1)
    k, n = 4, 4000
    y = torch.randint(0, k, (2 * n,), generator=gen)
    centres = torch.eye(k, 6, dtype=torch.float64) * 10
    sep = centres[y] + 0.5 * torch.rand(2 * n, 6, generator=gen, dtype=torch.float64)  # bounded noise: a margin
    out = probe_stage(StageData(sep[:n], y[:n], sep[n:], y[n:]), k, 1e-3)
    assert out["acc"] == 1.0 and out["train_acc"] == 1.0 and out["converged"]
    noise = torch.randn(2 * n, 6, generator=gen, dtype=torch.float64)  # features independent of the labels
    out = probe_stage(StageData(noise[:n], y[:n], noise[n:], y[n:]), k, 1e-3)
    sd = math.sqrt(0.25 * 0.75 / n)  # binomial SD of the test accuracy at chance
    assert abs(out["acc"] - 0.25) < 4 * sd, out["acc"]
    assert out["loss"] > math.log(k) - 0.01  # no information: at least the chance cross-entropy (up to noise)


def test_dead_and_constant_features_are_zeroed_and_carry_no_weight():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    x[:, 1] = 0.0   # a dead unit
    x[:, 3] = 2.5   # a constant one
    test = torch.randn(50, 5, generator=gen, dtype=torch.float64)  # alive on the evaluation images
    xs, (ts,), constant = standardize(x, test)
    assert constant.tolist() == [False, True, False, True, False]
    assert (xs[:, [1, 3]] == 0).all() and (ts[:, [1, 3]] == 0).all()
    assert torch.allclose(xs[:, 0].mean(), torch.zeros((), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(xs[:, 0].std(unbiased=False), torch.ones((), dtype=torch.float64))
    y = (x[:, 0] > 0).long()
    fit = fit_probe(xs, y, 2, 1e-3)
    assert (fit.weight[[1, 3]] == 0).all()


# ------------------------------------------------------------------------------------------------
# an independent naive float64 reference: Newton's method in numpy on the same objective
# ------------------------------------------------------------------------------------------------

def _newton_reference(x: np.ndarray, y: np.ndarray, k: int, l2: float) -> tuple[np.ndarray, np.ndarray, float]:
    """argmin over W [D, K], b [K] of mean CE(xW + b) + l2/2 ||W||^2 with sum(b) = 0: Newton steps on z = [W; b]
    with the explicit Hessian, plus (sum b)^2 / 2 (zero at the constrained optimum; it makes the Hessian
    invertible along the shift of the biases that the softmax ignores)."""
    n, d = x.shape
    xt = np.hstack([x, np.ones((n, 1))])                  # [N, D+1]: the bias as a feature
    onehot = np.eye(k)[y]
    z = np.zeros((d + 1, k))
    for _ in range(100):
        logits = xt @ z
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = xt.T @ (p - onehot) / n
        grad[:d] += l2 * z[:d]
        grad[d] += z[d].sum()
        hess = np.zeros((d + 1, k, d + 1, k))
        for i in range(n):                                 # naive: one example at a time
            s = np.diag(p[i]) - np.outer(p[i], p[i])
            hess += np.einsum("a,b,jl->ajbl", xt[i], xt[i], s) / n
        for a in range(d):
            for j in range(k):
                hess[a, j, a, j] += l2
        for j in range(k):
            for m in range(k):
                hess[d, j, d, m] += 1.0
        step = np.linalg.solve(hess.reshape((d + 1) * k, -1), grad.reshape(-1)).reshape(d + 1, k)
        z -= step
        if np.abs(step).max() < 1e-15:
            break
    w, b = z[:d], z[d]
    logits = x @ w + b
    logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    loss = float(np.mean(logz - logits[np.arange(n), y]) + 0.5 * l2 * (w ** 2).sum())
    return w, b, loss


@pytest.mark.parametrize("l2", [1e-3, 0.1])
@pytest.mark.parametrize("case", ["independent", "correlated", "separable"])
def test_probe_equals_a_naive_newton_reference(l2, case):
    """Independent features; features mixed by a random matrix (correlated: an ill-conditioned objective at lambda
    1e-3, where weights agree only if the fit runs to float64's limit, not just to GRAD_TOL); and 24 features that
    separate 6 classes perfectly (the case of a wide late stage: the optimum is held finite by the penalty alone,
    the hardest conditioning)."""
    gen = torch.Generator().manual_seed({"independent": 3, "correlated": 5, "separable": 7}[case])
    n, d, k = {"independent": (240, 6, 3), "correlated": (300, 8, 4), "separable": (300, 24, 6)}[case]
    y = torch.arange(n) % k
    spread = 4.0 if case == "separable" else 1.0
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) + spread * torch.randn(k, d, generator=gen,
                                                                                     dtype=torch.float64)[y]
    if case == "correlated":
        x = x @ torch.randn(d, d, generator=gen, dtype=torch.float64)
    xs, _, _ = standardize(x)
    fit = fit_probe(xs, y, k, l2)
    w, b, loss = _newton_reference(xs.numpy(), y.numpy(), k, l2)
    if case == "separable":
        assert score(fit, xs, y)[0] == 1.0
    assert fit.converged and fit.grad_norm <= GRAD_TOL / 100 and 0 < fit.iterations <= 30
    assert np.abs(fit.weight.numpy() - w).max() < 1e-8
    assert np.abs(fit.bias.numpy() - b).max() < 1e-8
    assert abs(fit.objective - loss) < 1e-12
    assert abs(float(probe_objective(fit.weight, fit.bias, xs, y, l2)) - loss) < 1e-12
    assert abs(float(fit.bias.sum())) < 1e-12


def test_a_fit_cut_short_says_it_did_not_converge():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(200, 10, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + 0.3 * torch.randn(200, generator=gen, dtype=torch.float64) > 0).long()
    short = fit_probe(x, y, 2, 1e-3, max_iter=2)
    assert short.iterations == 2 and not short.converged and short.grad_norm > GRAD_TOL
    with pytest.raises(CsnError, match="must be > 0"):
        fit_probe(x, y, 2, 0.0)


# ------------------------------------------------------------------------------------------------
# the analysis of a run
# ------------------------------------------------------------------------------------------------

def test_probe_analysis_end_to_end(tiny_run, one_thread):
    res = analyze(Probe, tiny_run, train_samples=128, checkpoints="first,last", progress=False)
    rows = res["probe"]
    run = Run(tiny_run)
    steps = [run.checkpoints[0].step, run.checkpoints[-1].step]
    assert sorted(rows["step"].unique().tolist()) == steps and res.computed == steps
    assert rows["stage"].tolist()[:3] == ["layer1", "layer2", "layer3"] and len(rows) == 6
    assert rows["converged"].all() and (rows["grad_norm"] <= GRAD_TOL).all() and (rows["iterations"] > 0).all()
    assert (rows["train_samples"] == 128).all() and (rows["n_images"] == 128).all() and (rows["l2"] == 1e-3).all()
    assert ((rows["acc"] >= 0) & (rows["acc"] <= 1)).all() and (rows["loss"] > 0).all()
    last = rows[rows["step"] == steps[-1]]
    assert (last["acc"] > 0.5).all()  # 4 classes, a trained network: far above chance
    units = {"layer1": 8, "layer2": 16, "layer3": 32}  # resnet8 at width 0.5: one block of 8/16/32 channels
    assert dict(zip(last["stage"], last["n_features"])) == units
    # resume: nothing left to compute; a new checkpoint adds only its rows
    again = analyze(Probe, tiny_run, train_samples=128, checkpoints="first,last", progress=False)
    assert again.computed == []
    pd.testing.assert_frame_equal(again["probe"], rows, check_dtype=False)
    more = analyze(Probe, tiny_run, train_samples=128, checkpoints="step=8", progress=False)
    assert more.computed == [8] and len(run.read("probe")) == 9
    # determinism: the same numbers from scratch
    run.table_path("probe").unlink()
    fresh = analyze(Probe, tiny_run, train_samples=128, checkpoints="first,last", progress=False)["probe"]
    cols = ["acc", "loss", "train_acc", "train_loss", "iterations", "grad_norm"]
    pd.testing.assert_frame_equal(fresh[cols], rows[cols])


def test_probe_fits_the_seeded_training_subset_and_scores_the_split(tiny_run, one_thread):
    """train_acc/train_loss are the probe's own numbers on the PROBE_SEED subset: refit here from activations read
    independently (a hand-written pass) and compare."""
    run = Run(tiny_run)
    ckpt = run.checkpoints[-1]
    row = analyze(Probe, tiny_run, train_samples=96, checkpoints="last", progress=False)["probe"]
    model = analysis_model(run, ckpt, run.dataset(), shared=False).model
    split = split_of(run.dataset(), "train").subset(96, seed=PROBE_SEED)
    acts = {}
    hooks = [dict(model.named_modules())[n].register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o.mean((2, 3))))
             for n in default_layers(model)]
    with torch.no_grad():
        model(split.normalize(split.images))
    for h in hooks:
        h.remove()
    r = row[row["stage"] == "layer3"].iloc[0]
    xs, _, _ = standardize(acts["layer3.0"])
    fit = fit_probe(xs, split.labels, 4, 1e-3)
    pred = (xs @ fit.weight + fit.bias).argmax(1)
    assert abs(float((pred == split.labels).double().mean()) - r["train_acc"]) < 1e-12


def test_probe_refuses_bad_options_in_one_sentence(tiny_run):
    with pytest.raises(CsnError, match=r"--train-samples 1000 is more than the 256 images of run tiny's training "
                                       r"split; give --train-samples 256 or fewer\.$"):
        analyze(Probe, tiny_run, train_samples=1000, progress=False)
    with pytest.raises(CsnError, match=r"must be > 0, got -0\.1"):
        Probe(l2=-0.1)
    with pytest.raises(CsnError, match=r"must be > 0"):
        Probe(l2=0)
    with pytest.raises(CsnError, match="no example of"):
        analyze(Probe, tiny_run, train_samples=2, progress=False)
    analyze(Probe, tiny_run, train_samples=128, checkpoints="last", progress=False)
    with pytest.raises(CsnError, match=r"l2=0\.001 but this request asks for l2=0\.01; pass --l2 0\.001"):
        analyze(Probe, tiny_run, train_samples=128, l2=0.01, checkpoints="last", progress=False)


def test_csn_probe_command_with_plot(tiny_run):
    runner = CliRunner()
    res = runner.invoke(cli, ["probe", str(tiny_run), "--checkpoints", "first,last", "--train-samples", "128",
                              "--plot", "--quiet", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "2 checkpoints (2 computed, 0 already in the table), 3 stages" in res.output
    assert "layer3  probe accuracy first" in res.output
    assert (tiny_run / "report" / "probe.png").is_file() and (tiny_run / "report" / "probe.svg").is_file()
    bad = runner.invoke(cli, ["probe", str(tiny_run), "--l2", "-1"])
    assert bad.exit_code == 2 and "error: --l2 must be > 0, got '-1'." in bad.output
    assert "--train-samples" in runner.invoke(cli, ["probe", "--help"]).output


def test_report_shows_the_probe_section_with_a_probe_table(tiny_run, tmp_path):
    """(Without a probe table the section returns None: test_registries builds the tiny run's page without one.)"""
    assert probe_section(Page(tmp_path, [], None, print)) is None
    analyze(Probe, tiny_run, train_samples=128, checkpoints="first,last", progress=False)
    html = build_report([tiny_run], out=tmp_path / "after", progress=False).read_text()
    assert 'id="probe"' in html and "Class information per stage (linear probe)" in html
    assert html.index('id="probe"') > html.index('id="training"')
    assert (tmp_path / "after" / "probe.png").is_file() and "could not be drawn" not in html
