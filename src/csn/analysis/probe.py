"""Class information per stage: a linear probe on each stage's units at every checkpoint (`Probe`).

CSI and eta² are per-unit measures. When a selectivity regularizer lowers them, two readings are possible:
suppression *removed* class information from a stage, or it *spread* that information over many units (each
less selective, the stage as informative as before). A linear probe on all units of a stage tells them apart
(SPEC "Mechanism"): probe accuracy falls in the first case and stays in the second.

Features: the same units and read points as the selectivity analysis (csn.analysis.selectivity: each read
point's channels, spatially averaged; csn.core.units), in eval mode, with the BatchNorm policy of every
analysis. A stage's features are the units of its read points side by side (csn.core.units.stages / stage_of;
with --layers, each chosen read point joins its stage, or stands alone when it belongs to none).

The probe is multinomial softmax regression fit on a fixed, seeded subset of the *training* split
(--train-samples, default 2,000 images, seed PROBE_SEED, unaugmented) and scored on the evaluation split
(--split, --samples; default the whole test split, which is disjoint from the training subset; with --split
train the evaluation images include the probe's own):

- features are standardized with the training subset's mean and standard deviation; a feature constant on the
  training subset (a dead unit) is set to 0 everywhere, so it carries no weight;
- the objective is the mean cross-entropy over the training subset plus lambda * ||W||² / 2 (--l2 lambda,
  default 1e-3; the bias is not penalized). The penalty makes the objective strictly convex in W, so the
  optimum is unique and finite even where a stage separates its 2,000 training images perfectly (with
  hundreds of units it often does, and then the unpenalized optimum lies at infinity), and the result does
  not depend on the solver. 1e-3 on standardized features is light (scikit-learn's C = 1 / (lambda n): its
  default C = 1 at n = 1,000, C = 0.5 at n = 2,000), so it costs little accuracy, and it bounds the problem's
  condition number. The softmax is unchanged by a shift shared by all biases, which the penalty does not fix: the
  biases are identified by sum_k b_k = 0;
- the fit is a truncated Newton method (Newton-CG) in float64 from zero: each iteration solves H s = g for the
  Newton step by conjugate gradients on Hessian-vector products (never forming the Hessian, so memory and cost per
  product stay O(n D K) for any stage and number of classes), to a relative residual of min(0.5, sqrt(|g|)) (the
  step becomes exact as the fit converges, so convergence is superlinear), then an Armijo backtracking line search
  (the full step is also taken when it halves the largest gradient entry: near the optimum a step's decrease of
  the objective falls below its float64 rounding, while the gradient still measures progress). It stops at a
  largest absolute gradient entry of GRAD_TOL * POLISH = 1e-12, once converged steps stop halving it (float64's
  limit), or after MAX_ITER Newton iterations: deterministic on a CPU. On the Fashion-MNIST study's stages (16-64
  units, 2,000 images) it takes about 10 Newton iterations (200-700 conjugate-gradient steps) to a gradient of
  1e-12 or below, where full-batch L-BFGS (the solver before 2026-12-05) took 400-5,000 iterations,
  10-35x the time, and sometimes stopped at its cap short of 1e-8. `iterations` (Newton iterations), `grad_norm`
  (the largest absolute entry of the gradient of W and b at the end) and `converged` (grad_norm <= GRAD_TOL = 1e-8)
  are recorded per row. The training subset must hold every class (else a bias has no finite optimum).

Table:

    tables/probe.parquet  step, epoch, stage, n_features, n_constant, acc, loss, train_acc, train_loss,
                          iterations, grad_norm, converged, l2, train_samples, split, n_images, layers,
                          bn_recalibrated

acc / loss: top-1 accuracy and mean cross-entropy (nats) on the evaluation split; train_acc / train_loss the
same on the training subset (without the penalty). The activations are kept on the CPU (float32) and the fits run
there in float64, whatever the model's device. Under torchrun every process computes the whole (small)
probe of a checkpoint on the unsharded data, and rank 0 writes; `--distribute checkpoints` spreads the
checkpoints over the processes instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from csn.analysis.base import Analysis, Context, Samples, Split, eval_loader, split_of, stage_summary, traced_batches
from csn.analysis.registry import register_analysis
from csn.core.schema import CommaList, Float, Int, Schema
from csn.core.units import resolve_layers, stage_of
from csn.data.loaders import split_loader, subset
from csn.data.split import split_labels
from csn.data.validate import require_every_class
from csn.errors import CsnError
from csn.runs.run import Checkpoint
from csn.runs.table import TableSpec

PROBE_SEED = 6161
"""Seed of the fixed subset of the training split the probes are fit on (the same in every run and checkpoint;
not SUBSET_SEED, so that --split train --samples N does not score on the probe's training images alone)."""
TRAIN_SAMPLES = 2000
"""Default size of the probe's training subset: 200 images per class with 10 classes, 10x the features of the
largest ResNet-20 stage, and a fit that takes well under a second."""
L2 = 1e-3
"""Default penalty lambda (lambda * ||W||² / 2 on the mean loss, standardized features); see the module docstring."""
MAX_ITER = 100
"""Newton iteration cap of one fit (a fit from zero takes about 10; see the module docstring)."""
GRAD_TOL = 1e-8
"""A fit has converged when the largest absolute entry of the objective's gradient is at most this at the end."""
POLISH = 1e-4
"""Once converged, the fit goes on while each Newton step halves the largest gradient entry, down to
GRAD_TOL * POLISH = 1e-12 (one or two more steps; weights then agree with the exact optimum to about 1e-12 / the
smallest curvature, the penalty lambda at least): as exact as float64 allows, not just as GRAD_TOL asks."""
CG_FORCING = 0.5
"""Largest relative residual |H s - g| / |g| of a Newton step's conjugate-gradient solve (the forcing term is
min(CG_FORCING, sqrt(|g|)): loose far from the optimum, exact near it)."""

PROBE = TableSpec(
    "probe",
    {"step": "int64", "epoch": "float64", "stage": "str", "n_features": "int64", "n_constant": "int64",
     "acc": "float64", "loss": "float64", "train_acc": "float64", "train_loss": "float64", "iterations": "int64",
     "grad_norm": "float64", "converged": "bool", "l2": "float64", "train_samples": "int64", "split": "str",
     "n_images": "int64", "layers": "str", "bn_recalibrated": "int64"},
    key=("step", "stage"), settings=("split", "n_images", "train_samples", "l2", "layers"),
    row_settings=("bn_recalibrated",), same_set=("stage",),
    flags={"split": "--split", "n_images": "--samples", "train_samples": "--train-samples", "l2": "--l2",
           "layers": "--layers"},
    row_scope={"bn_recalibrated": ("step",)},
    labels={"bn_recalibrated": "BatchNorm statistics re-estimated from {} batches"})
"""tables/probe.parquet: one row per checkpoint and stage."""


class ProbeOptions(Schema):
    """Options of the Probe analysis."""

    split: Split = Field("test", description="Evaluation split the probes are scored on (no augmentation).")
    samples: Samples = Field(None, description="Score on a fixed random subset of N images of the split [default: "
                             "all].", json_schema_extra={"metavar": "N|all"})
    train_samples: Int = Field(TRAIN_SAMPLES, ge=2, description="Images of the training split (a fixed seeded "
                               "subset, unaugmented) each probe is fit on; it must hold every class.",
                               json_schema_extra={"metavar": "N"})
    l2: Float = Field(L2, gt=0, description="Penalty lambda * ||W||^2 / 2 on the probe's mean cross-entropy "
                      "(standardized features, bias unpenalized); > 0 keeps the optimum unique and finite.",
                      json_schema_extra={"metavar": "LAMBDA"})
    layers: Annotated[tuple[str, ...], CommaList] | None = Field(
        None, description="Read points (module names or globs), grouped by the stage each belongs to; default: the "
        "model's declared read points.", json_schema_extra={"metavar": "PATTERN", "multiple": True})


# ------------------------------------------------------------------------------------------------
# the probe: standardization, fit, score
# ------------------------------------------------------------------------------------------------

@dataclass
class ProbeFit:
    """A fitted probe on standardized features: logits = x @ weight + bias (float64)."""

    weight: Tensor      # [D, K]
    bias: Tensor        # [K], sum 0
    objective: float    # mean cross-entropy + l2 * ||W||² / 2 at the end
    iterations: int
    grad_norm: float    # largest absolute gradient entry at the end
    converged: bool


def standardize(train: Tensor, *others: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
    """(train, others, constant): features in float64 centred and scaled by the training rows' mean and population
    standard deviation; a feature constant on the training rows (max == min, e.g. a dead unit) is 0 in every
    matrix. `constant` is the boolean mask of those features."""
    x = train.double()
    constant = (x.max(0).values == x.min(0).values) if len(x) else torch.ones(x.shape[1], dtype=torch.bool)
    mean = torch.where(constant, 0.0, x.mean(0))
    std = torch.where(constant, 1.0, x.std(0, unbiased=False))

    def scale(a: Tensor) -> Tensor:
        return ((a.double() - mean) / std).masked_fill(constant, 0.0)
    return scale(x), [scale(o) for o in others], constant


def probe_objective(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor, l2: float) -> Tensor:
    """mean_i CE(x_i @ W + b, y_i) + l2 * ||W||² / 2."""
    return F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()


def fit_probe(x: Tensor, y: Tensor, num_classes: int, l2: float = L2, *, max_iter: int = MAX_ITER,
              tol: float = GRAD_TOL) -> ProbeFit:
    """Minimize probe_objective over W [D, K] and b [K] (float64, from zero) by Newton-CG (module docstring): at most
    max_iter Newton iterations, down to every gradient entry <= tol * POLISH in size (or float64's limit, see
    POLISH); converged: the final gradient's entries are <= tol. Every step keeps sum_k b_k = 0 (the start's: the
    bias part of the gradient and of every Hessian-vector product sums to zero over classes), which identifies the
    biases; it is re-imposed at the end."""
    if l2 <= 0:
        raise CsnError(f"the probe's penalty must be > 0, got {l2}; pass --l2 1e-3 (the default) or another "
                       "positive value.")
    x, y = x.double(), y.long()
    n, d, k = x.shape[0], x.shape[1], int(num_classes)
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64, device=x.device)], 1)  # the bias is the last row of W
    onehot = F.one_hot(y, k).double()
    penalty = torch.full((d + 1, 1), float(l2), dtype=torch.float64, device=x.device)
    penalty[d] = 0.0
    theta = torch.zeros(d + 1, k, dtype=torch.float64, device=x.device)

    def objective(t: Tensor) -> float:
        logits = xa @ t
        return float((torch.logsumexp(logits, 1) - (logits * onehot).sum(1)).mean() + 0.5 * l2 * t[:d].pow(2).sum())

    def gradient(t: Tensor) -> tuple[Tensor, Tensor]:  # (softmax probabilities [n, K], gradient [D + 1, K])
        p = torch.softmax(xa @ t, 1)
        return p, xa.T @ (p - onehot) / n + penalty * t

    def newton_step(p: Tensor, g: Tensor) -> Tensor:  # s with |H s - g| <= forcing |g|, by conjugate gradients
        g_norm = float(g.norm())
        target = min(CG_FORCING, g_norm ** 0.5) * g_norm
        s, r = torch.zeros_like(g), g.clone()
        q, rr = r.clone(), float((r * r).sum())
        for _ in range(2 * g.numel() + 20):  # CG ends in <= numel steps in exact arithmetic; rounding may need more
            v = xa @ q  # H q = X^T [p * (v - <p, v>)] / n + penalty * q
            hq = xa.T @ (p * (v - (p * v).sum(1, keepdim=True))) / n + penalty * q
            alpha = rr / float((q * hq).sum())
            s += alpha * q
            r -= alpha * hq
            rr_next = float((r * r).sum())
            if rr_next ** 0.5 <= target:
                break
            q = r + (rr_next / rr) * q
            rr = rr_next
        return s

    iterations, previous = 0, float("inf")
    p, g = gradient(theta)
    value = objective(theta)
    while iterations < max_iter:
        largest = float(g.abs().max())
        if largest <= tol * POLISH or (largest <= tol and largest > 0.5 * previous):
            break  # as exact as asked, or converged and no longer halving the gradient: float64's limit
        previous = largest
        step = newton_step(p, g)
        slope = float((g * step).sum())  # > 0: the CG step is a descent direction for -step
        t, accepted = 1.0, None
        for _ in range(40):  # Armijo backtracking
            trial = theta - t * step
            trial_value = objective(trial)
            if trial_value <= value - 1e-4 * t * slope:
                accepted = trial, trial_value, *gradient(trial)
                break
            if t == 1.0:  # near the optimum the decrease (about g² / curvature) is below the objective's rounding:
                p1, g1 = gradient(trial)  # take the full Newton step if it halves the largest gradient entry
                if float(g1.abs().max()) <= 0.5 * float(g.abs().max()):
                    accepted = trial, trial_value, p1, g1
                    break
            t *= 0.5
        if accepted is None:  # no decrease of the objective nor of the gradient: float64 has the last word
            break
        theta, value, p, g = accepted
        iterations += 1
    theta[d] -= theta[d].mean()
    _, g = gradient(theta)
    grad = float(g.abs().max()) if g.numel() else 0.0
    w, b = theta[:d].clone(), theta[d].clone()
    return ProbeFit(w, b, objective(theta), iterations, grad, grad <= tol)


def score(fit: ProbeFit, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy in nats) of a fitted probe on standardized features x and labels y."""
    if len(y) == 0:
        return float("nan"), float("nan")
    with torch.no_grad():
        logits = x.double() @ fit.weight + fit.bias
        return float((logits.argmax(1) == y).double().mean()), float(F.cross_entropy(logits, y.long()))


# ------------------------------------------------------------------------------------------------
# unit activations of a split
# ------------------------------------------------------------------------------------------------

def collect_units(model: torch.nn.Module, loader: Iterable[Any], layers: list[str],
                  device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], Tensor]:
    """One eval-mode, no-grad pass: ({layer: unit activations [N, U] (float32, CPU)}, labels [N])."""
    acts: dict[str, list[Tensor]] = {name: [] for name in layers}
    labels = []
    for out, y in traced_batches(model, loader, layers, device):
        for name in layers:
            acts[name].append(out[name].float().cpu())
        labels.append(y.cpu().long())
    if not labels:
        raise CsnError("the data yielded no examples; measure on a non-empty split.")
    return {name: torch.cat(v) for name, v in acts.items()}, torch.cat(labels)


def stage_groups(model: torch.nn.Module, layers: Iterable[str]) -> dict[str, list[str]]:
    """{stage: its read points among `layers`}, in the order the stages first appear."""
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(stage_of(model, name), []).append(name)
    return groups


@dataclass
class StageData:
    """One stage's features: the training subset's and the evaluation split's, with their labels."""

    train: Tensor
    train_y: Tensor
    test: Tensor
    test_y: Tensor


def probe_stage(data: StageData, num_classes: int, l2: float) -> dict[str, Any]:
    """Standardize, fit and score one stage's probe: the table's per-stage measures."""
    xtr, (xte,), constant = standardize(data.train, data.test)
    fit = fit_probe(xtr, data.train_y, num_classes, l2)
    acc, loss = score(fit, xte, data.test_y)
    train_acc, train_loss = score(fit, xtr, data.train_y)
    return {"n_features": int(xtr.shape[1]), "n_constant": int(constant.sum()), "acc": acc, "loss": loss,
            "train_acc": train_acc, "train_loss": train_loss, "iterations": fit.iterations,
            "grad_norm": fit.grad_norm, "converged": fit.converged}


# ------------------------------------------------------------------------------------------------
# the analysis of a run's checkpoints
# ------------------------------------------------------------------------------------------------

def probe_train_split(ctx: Context, n: int) -> Any:
    """The fixed seeded subset of n images of the training split (unaugmented) the probes are fit on."""
    return subset(split_of(ctx.data, "train"), n, PROBE_SEED)


@register_analysis()
class Probe(Analysis):
    """Linear-probe accuracy and cross-entropy of each stage's units at every checkpoint (class information)."""

    name = "probe"
    Options = ProbeOptions
    tables = (PROBE,)
    every_class = False  # the evaluation split may be any subset; the training subset is checked in setup

    def setup(self, ctx: Context) -> None:
        o = self.options
        model = ctx.run.build_model()
        layers = resolve_layers(model, o.layers)  # unknown pattern: CsnError
        ctx.own["stages"] = stage_groups(model, layers)
        ctx.own["layers"] = ",".join(layers)
        ctx.own["n_images"] = ctx.split_size(o.split, o.samples)
        if ctx.num_classes is None:
            raise CsnError(f"run {ctx.run.name} records no number of classes (run.json data.num_classes); "
                           "train it with csn to fit probes.")
        n_train = len(split_of(ctx.data, "train"))
        if o.train_samples > n_train:
            raise CsnError(f"--train-samples {o.train_samples} is more than the {n_train:,} images of run "
                           f"{ctx.run.name}'s training split; give --train-samples {n_train} or fewer.")
        labels = split_labels(probe_train_split(ctx, o.train_samples))
        if labels is not None:
            require_every_class(labels, int(ctx.num_classes), f"the probe's {o.train_samples:,}-image training "
                                "subset (--train-samples)", "raise --train-samples so that every class has an example")

    def settings(self, ctx: Context) -> dict[str, dict[str, Any]]:
        o = self.options
        return {"probe": {"split": o.split, "n_images": ctx.own["n_images"], "train_samples": o.train_samples,
                          "l2": float(o.l2), "layers": ctx.own["layers"]}}

    def sets(self, ctx: Context) -> dict[str, dict[str, Iterable[Any]]]:
        return {"probe": {"stage": list(ctx.own["stages"])}}

    def expected(self, ctx: Context, ckpt: Checkpoint) -> dict[str, pd.DataFrame]:
        keys = pd.DataFrame({"step": np.int64(ckpt.step), "stage": list(ctx.own["stages"])})
        return {"probe": keys.assign(bn_recalibrated=np.int64(ctx.bn[ckpt.step]))}

    def summary(self, rows: Mapping[str, pd.DataFrame]) -> dict[str, float]:
        """Each stage's probe accuracy and loss on the evaluation split."""
        return stage_summary(rows["probe"], ("acc", "loss"))

    def compute(self, ctx: Context, ckpt: Checkpoint, missing: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        o = self.options
        am = ctx.model(ckpt)
        layers = [name for names in ctx.own["stages"].values() for name in names]
        bs, cfg = ctx.run.config.eval_batch_size, ctx.run.config
        train_loader = split_loader(probe_train_split(ctx, o.train_samples), bs, ctx.device, run_seed=cfg.seed,
                                    workers=cfg.workers, channels_last=cfg.channels_last)
        test_loader = eval_loader(ctx.run, ctx.data, o.split, device=ctx.device, samples=o.samples)  # whole, unsharded
        train, ytr = collect_units(am.model, train_loader, layers, ctx.device)
        test, yte = collect_units(am.model, test_loader, layers, ctx.device)
        rows = []
        for stage, names in ctx.own["stages"].items():
            data = StageData(torch.cat([train[n] for n in names], 1), ytr, torch.cat([test[n] for n in names], 1), yte)
            rows.append({"step": ckpt.step, "epoch": float(ckpt.epoch), "stage": stage,
                         **probe_stage(data, int(ctx.num_classes), float(o.l2)), "l2": float(o.l2),
                         "train_samples": len(ytr), "split": o.split, "n_images": len(yte), "layers": ctx.own["layers"],
                         "bn_recalibrated": am.bn_recalibrated})
        return {"probe": PROBE.frame(rows)}


def describe_probe(table: pd.DataFrame) -> list[str]:
    """Compact lines: per stage, probe accuracy at the first checkpoint, its maximum (epoch) and at the last, and
    how many fits did not converge."""
    lines = []
    stages = list(dict.fromkeys(table["stage"].tolist()))
    width = max((len(str(s)) for s in stages), default=5)
    for stage in stages:
        d = table[table["stage"] == stage].sort_values("step")
        best = d.iloc[int(np.argmax(d["acc"].to_numpy()))]
        bad = int((~d["converged"].astype(bool)).sum())
        lines.append(f"{str(stage):<{width}}  probe accuracy first {d['acc'].iloc[0]:.3f}, max {best['acc']:.3f} at "
                     f"epoch {best['epoch']:.4g}, last {d['acc'].iloc[-1]:.3f} ({int(d['n_features'].iloc[-1])} "
                     f"features)" + (f"; {bad} fit(s) did not converge" if bad else ""))
    return lines


__all__ = ["PROBE_SEED", "TRAIN_SAMPLES", "L2", "MAX_ITER", "GRAD_TOL", "POLISH", "CG_FORCING", "PROBE", "ProbeOptions", "ProbeFit",
           "standardize", "probe_objective", "fit_probe", "score", "collect_units", "stage_groups", "StageData",
           "probe_stage", "probe_train_split", "Probe", "describe_probe"]
