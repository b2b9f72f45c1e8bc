"""How linear is the network at a checkpoint? Three measures (SPEC "Linearity (C3)").

The study's public code has no linearity measure, so csn offers three, each with its formula and
source below:

1. Agreement with a linear model (Kalimeris et al. 2019, "SGD on neural networks learns functions
   of increasing complexity", NeurIPS): the performance correlation
   mu_Y(F; L) = I(F; Y) - I(F; Y | L) between the network's predictions F, a linear classifier's
   predictions L and the labels Y, from their empirical joint distribution; it is at most I(L; Y).
2. Distance to the linearized network (the first-order Taylor model of Lee et al. 2019, "Wide
   neural networks of any depth evolve as linear models under gradient descent"; Fort et al. 2020,
   "Deep learning versus kernel learning"): f_lin(x) = f(x; theta_0) + J(theta_0)(theta_t - theta_0),
   computed with one forward-mode Jacobian-vector product per batch; report prediction agreement
   and ||f_t - f_lin|| / ||f_t - f_0|| (Frobenius norm over the whole evaluation split).
3. ReLU pattern stability (a piecewise-linear network is linear where its activation pattern does
   not change; cf. Hanin & Rolnick 2019, "Deep ReLU networks have surprisingly few activation
   patterns"): the fraction of (ReLU output position, input) pairs whose on/off state is the same
   in two models, e.g. checkpoint t vs initialization and vs the previous checkpoint.

Every forward hook goes through csn.core.trace.TraceDict (retain nothing, an `edit` that records or
compares the on/off state and keeps the output).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from csn.core.trace import TraceDict
from csn.core.units import (
    batch_inputs,
    eval_mode,
    first_tensor,
    model_device,
    relu_modules,
)
from csn.dist import all_gather_objects, all_reduce_, is_dist, same_outcome
from csn.errors import CsnError

# ---------------------------------------------------------------------------------------------
# 1. Linear classifier and information measures


def fit_linear_classifier(
    x_train: Tensor,
    y_train: Tensor,
    num_classes: int,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    seed: int = 0,
    weight_decay: float = 0.0,
    batch_size: int = 256,
) -> nn.Linear:
    """Softmax regression on flattened inputs: logits = W x + b, fit by cross-entropy.

    Method (deterministic on CPU given `seed`): inputs are standardized per feature with the
    training mean and std (std < 1e-6 treated as 1), W and b start at zero (the problem is convex),
    and Adam (lr, coupled L2 `weight_decay` on the standardized-space weights) runs `epochs` passes
    of minibatch steps over a permutation drawn from a torch.Generator seeded with `seed`. The
    standardization is then folded into the returned layer (W' = W / std, b' = b - W' mean), so it
    takes raw flattened inputs: ``linear(x.flatten(1))``.
    """
    x = x_train.reshape(x_train.shape[0], -1).float()
    y = torch.as_tensor(y_train).long().to(x.device)
    if x.shape[0] != y.shape[0]:
        raise CsnError(f"linear classifier: {x.shape[0]} inputs but {y.shape[0]} labels; pass one label per input.")
    if x.shape[0] == 0:
        raise CsnError("linear classifier: the training split is empty; pass at least one example.")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise CsnError(f"linear classifier: labels must lie in [0, {num_classes}); got {int(y.min())}..{int(y.max())}.")
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    layer = nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    opt = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    for _ in range(int(epochs)):
        perm = torch.randperm(n, generator=gen).to(x.device)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            xb = (x[idx] - mean) / std
            loss = nn.functional.cross_entropy(layer(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        w = layer.weight / std
        layer.bias.sub_(w @ mean)
        layer.weight.copy_(w)
    layer.requires_grad_(False)
    return layer


@torch.no_grad()
def linear_predict(linear: nn.Module, x: Tensor, *, batch_size: int = 4096) -> Tensor:
    """Class predictions (argmax) of a linear classifier on flattened inputs: [N] int64."""
    dev = model_device(linear)
    out = [linear(x[i:i + batch_size].reshape(min(batch_size, x.shape[0] - i), -1).to(dev).float()).argmax(1).cpu()
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(linear: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 4096) -> float:
    """Top-1 accuracy of a linear classifier (as from fit_linear_classifier) on flattened inputs."""
    pred = linear_predict(linear, x, batch_size=batch_size)
    return float((pred == torch.as_tensor(y).cpu().long()).float().mean())


def _as_labels(v: Any) -> Tensor:
    t = torch.as_tensor(np.asarray(v.cpu() if isinstance(v, Tensor) else v)).reshape(-1)
    if t.is_floating_point():
        raise CsnError("information measures need integer labels (class predictions), not floating-point values.")
    return t.long()


def _entropy(*vs: Tensor) -> float:
    """Joint Shannon entropy (bits) of integer label vectors from their empirical joint frequencies."""
    n = vs[0].shape[0]
    if n == 0:
        raise CsnError("information measures need at least one example.")
    if any(v.shape[0] != n for v in vs):
        raise CsnError("information measures need label vectors of equal length (one entry per example).")
    _, counts = torch.unique(torch.stack(vs, dim=1), dim=0, return_counts=True)
    p = counts.double() / n
    return float(-(p * torch.log2(p)).sum())


def mutual_information(a: Any, b: Any) -> float:
    """I(A; B) in bits from the empirical joint frequencies of two integer label vectors.

    I(A; B) = sum_{a,b} p(a,b) log2[p(a,b) / (p(a) p(b))] = H(A) + H(B) - H(A, B).
    """
    a, b = _as_labels(a), _as_labels(b)
    return max(0.0, _entropy(a) + _entropy(b) - _entropy(a, b))


def conditional_mutual_information(a: Any, b: Any, c: Any) -> float:
    """I(A; B | C) in bits from empirical joint frequencies.

    I(A; B | C) = sum_c p(c) I(A; B | C=c) = H(A, C) + H(B, C) - H(A, B, C) - H(C).
    """
    a, b, c = _as_labels(a), _as_labels(b), _as_labels(c)
    return max(0.0, _entropy(a, c) + _entropy(b, c) - _entropy(a, b, c) - _entropy(c))


def performance_correlation(f: Any, y: Any, l: Any) -> dict[str, float]:
    """Kalimeris et al. (2019) performance correlation of network predictions F with a linear model L.

    mu_Y(F; L) = I(F; Y) - I(F; Y | L): how much of what F knows about the labels Y is shared with
    the linear model L. It is at most I(L; Y) (reached when F = L), equals I(F; Y) whenever F is a
    function of L (then I(F; Y | L) = 0), and is 0 when L is constant (conditioning on it changes
    nothing). It can be negative when F and L are synergistic about Y (mu_Y is the interaction
    information I(F; Y; L) = I(L; Y) - I(L; Y | F)). Returns mu_y_bits, i_fy_bits, i_fy_given_l_bits,
    i_ly_bits (the upper bound) and agreement (fraction of examples with F == L).
    """
    f, y, l = _as_labels(f), _as_labels(y), _as_labels(l)
    i_fy = mutual_information(f, y)
    i_fy_l = conditional_mutual_information(f, y, l)
    return {
        "mu_y_bits": i_fy - i_fy_l,
        "i_fy_bits": i_fy,
        "i_fy_given_l_bits": i_fy_l,
        "i_ly_bits": mutual_information(l, y),
        "agreement": float((f == l).double().mean()),
    }


# ---------------------------------------------------------------------------------------------
# 2. Linearized network


def _check_same_architecture(model_t: nn.Module, model_0: nn.Module) -> None:
    pt = {n: p.shape for n, p in model_t.named_parameters()}
    p0 = {n: p.shape for n, p in model_0.named_parameters()}
    if pt != p0:
        diff = sorted(set(pt) ^ set(p0)) or [n for n in pt if pt[n] != p0[n]]
        raise CsnError(
            f"the two models differ in their parameters ({', '.join(diff[:5])}); "
            "linearization needs two checkpoints of the same architecture."
        )


def parameter_delta(model_t: nn.Module, model_0: nn.Module) -> dict[str, Tensor]:
    """theta_t - theta_0 per named parameter (the tangent of the linearization), on model_0's devices."""
    _check_same_architecture(model_t, model_0)
    p0 = dict(model_0.named_parameters())
    return {n: (p.detach().to(p0[n].device) - p0[n].detach()) for n, p in model_t.named_parameters()}


def _linearize(model_0: nn.Module, delta: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """(f_lin, f_0) for a batch, by one torch.func.jvp of f(x; .) at theta_0 in the direction delta.

    Buffers (BatchNorm running statistics) are model_0's; model_0 must be in eval mode.
    """
    params = {n: p.detach() for n, p in model_0.named_parameters()}
    buffers = {n: b for n, b in model_0.named_buffers()}

    def f(p: dict[str, Tensor]) -> Tensor:
        return first_tensor(functional_call(model_0, (p, buffers), (x,)))

    with torch.no_grad(), warnings.catch_warnings():
        # torch's jvp decompositions call the deprecated torch.jit.script on first use (torch-internal)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
        f0, jv = jvp(f, (params,), ({n: delta[n] for n in params},))
    return f0 + jv, f0


def linearized_outputs(model_t: nn.Module, model_0: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Outputs of the network at theta_t, of its linearization around theta_0, and at theta_0.

    f_lin(x) = f(x; theta_0) + J_theta f(x; theta_0) (theta_t - theta_0), from ONE forward-mode
    JVP (torch.func.jvp over torch.func.functional_call) that yields f_0 and J delta together.
    Both models run in eval mode (restored afterwards); the buffers of the linearization (BatchNorm
    running statistics) are model_0's, so f_t - f_lin also contains the change of those statistics.
    Returns (f_t, f_lin, f_0).
    """
    delta = parameter_delta(model_t, model_0)
    with eval_mode(model_t, model_0), torch.no_grad():
        f_lin, f0 = _linearize(model_0, delta, x)
        ft = first_tensor(model_t(x))
    return ft, f_lin, f0


# ---------------------------------------------------------------------------------------------
# 3. ReLU patterns


@contextmanager
def relu_patterns(model: nn.Module) -> Iterator[dict[str, list[Tensor]]]:
    """Context manager recording, per forward pass, the on/off state (output > 0) of every nn.ReLU.

    Yields {module name: [bool mask per call]}; a module called several times in one forward (e.g.
    torchvision's BasicBlock reuses self.relu) gets one mask per call, in call order. Clear the dict
    between batches. Only nn.ReLU *modules* are seen: functional calls (F.relu, torch.relu,
    Tensor.relu) are invisible, as are other activations; csn's models use one nn.ReLU module per use.
    """
    names = relu_modules(model)
    if not names:
        raise CsnError(f"{type(model).__name__} has no nn.ReLU modules; the ReLU-pattern measure needs nn.ReLU "
                       "modules (functional relu calls cannot be seen).")
    store: dict[str, list[Tensor]] = {}

    def record(name: str, out: Tensor) -> None:
        store.setdefault(name, []).append(out.detach() > 0)

    with TraceDict(model, names, retain=None, edit=record):
        yield store


@contextmanager
def _relu_compare(model: nn.Module, reference: dict[str, list[Tensor]], counts: Tensor | list[int]) -> Iterator[None]:
    """During forwards of `model`, compare each nn.ReLU call's on/off state with `reference` on the fly.

    Adds [equal, total] into `counts`; no mask of `model` is kept. Enter once per forward pass.
    """
    calls: dict[str, int] = {}

    def compare(name: str, out: Tensor) -> None:
        k = calls.get(name, 0)
        calls[name] = k + 1
        ref = reference.get(name, [])
        if k >= len(ref) or ref[k].shape != out.shape:
            raise CsnError(f"ReLU {name!r} is called differently in the two models; compare checkpoints of one "
                           "architecture.")
        counts[0] += ((out.detach() > 0) == ref[k]).sum()  # a tensor: no device sync per call
        counts[1] += ref[k].numel()

    with TraceDict(model, relu_modules(model), retain=None, edit=compare):
        yield


def relu_agreement(model_a: nn.Module, model_b: nn.Module, batches: Iterable[Any]) -> float:
    """Fraction of (ReLU output position, input) on/off states equal in model_a and model_b.

    Streams over `batches` (tensors or (x, y) pairs): per batch, model_a's masks are recorded, model_b
    is compared against them in its hooks, counts are accumulated and the masks dropped. Both models
    run in eval mode (restored afterwards) on model_a's device.
    """
    counts: list[Any] = [0, 0]
    dev = model_device(model_a)
    if model_b is model_a:
        model_b = copy.deepcopy(model_a)
    with eval_mode(model_a, model_b), torch.no_grad(), relu_patterns(model_a) as ref:
        for batch in batches:
            x = batch_inputs(batch).to(dev)
            ref.clear()
            model_a(x)
            with _relu_compare(model_b, ref, counts):
                model_b(x)
            ref.clear()
    if counts[1] == 0:
        raise CsnError("no ReLU outputs were seen; pass at least one batch.")
    return int(counts[0]) / counts[1]


# ---------------------------------------------------------------------------------------------
# All measures for one checkpoint


class LinearityAccumulator:
    """What linearity_measures streams over its loader: counts and squared norms in one float64 vector
    (`sums`, summed across processes under torchrun) and per-example predictions (`preds`, gathered).

    Layout of `sums`: correct, total; per reference k with the linearization: agree_k, n_k, num_k
    (||f_t - f_lin||^2), den_k (||f_t - f_ref||^2); per reference k with ReLU patterns: equal_k, seen_k.
    """

    def __init__(self, refs: Sequence[str], *, linearized: bool, relu: bool, device: torch.device) -> None:
        names = ["correct", "total"]
        names += [f"{q}_{k}" for k in refs if linearized for q in ("agree", "n", "num", "den")]
        names += [f"{q}_{k}" for k in refs if relu for q in ("relu_equal", "relu_seen")]
        self.index = {n: i for i, n in enumerate(names)}
        self.refs, self.linearized, self.relu = list(refs), linearized, relu
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        self.preds: dict[str, Any] = {"f": [], "y": [], "l": []}  # per-batch lists; close(): tensors or None

    def add(self, name: str, value: Tensor | int) -> None:
        """sums[name] += value (a tensor stays on the device: no host sync per batch)."""
        self.sums[self.index[name]] += value

    def relu_counts(self, ref: str) -> Tensor:
        """The [equal, seen] view of `sums` for reference `ref` (what _relu_compare adds into)."""
        i = self.index[f"relu_equal_{ref}"]
        return self.sums[i:i + 2]

    def close(self) -> LinearityAccumulator:
        """Concatenate the per-batch predictions (CPU tensors)."""
        self.preds = {k: torch.cat(v) if v else None for k, v in self.preds.items()}
        return self

    def result(self) -> dict[str, float]:
        """The measures (see linearity_measures)."""
        v = dict(zip(self.index, self.sums.tolist()))
        if v["total"] == 0:
            raise CsnError("linearity saw no batches; give a non-empty evaluation loader.")
        out: dict[str, float] = {"test_acc": v["correct"] / v["total"]}
        f_all, y_all, l_all = self.preds["f"], self.preds["y"], self.preds["l"]
        if l_all is not None:
            pc = performance_correlation(f_all, y_all, l_all)
            out["linear_agreement"] = pc["agreement"]
            out["linear_acc"] = float((l_all == y_all).double().mean())
            for key in ("mu_y_bits", "i_fy_bits", "i_fy_given_l_bits", "i_ly_bits"):
                out[key] = pc[key]
        for k in self.refs:
            if self.linearized:
                out[f"linearized_agreement_{k}"] = v[f"agree_{k}"] / v[f"n_{k}"]
                den = v[f"den_{k}"]
                out[f"linearized_rel_dist_{k}"] = math.sqrt(v[f"num_{k}"] / den) if den > 0 else float("nan")
            if self.relu:
                seen = v[f"relu_seen_{k}"]
                out[f"relu_same_as_{k}"] = v[f"relu_equal_{k}"] / seen if seen else float("nan")
        return out


def reduce_linearity(acc: LinearityAccumulator) -> LinearityAccumulator:
    """Sum a LinearityAccumulator's counts and squared norms across ranks and gather its per-example
    predictions (rank order = the order of the single-process pass over the sharded split); returns it."""
    if not is_dist():
        return acc
    all_reduce_(acc.sums)
    every = all_gather_objects({k: None if v is None else v.cpu() for k, v in acc.preds.items()})
    for k in acc.preds:
        parts = [p[k] for p in every if p[k] is not None]
        acc.preds[k] = torch.cat(parts) if parts else None
    return acc


@dataclass(frozen=True)
class MeasureSettings:
    """How linearity_measures runs (its keyword settings): which measures, where, over how much data."""

    device: torch.device | str | None = None
    linearized: bool = True
    relu: bool = True
    max_batches: int | None = None
    reduce: bool = False


def linearity_measures(model_t: nn.Module, model_0: nn.Module, loader: Iterable[Any], *,
                       model_prev: nn.Module | None = None, linear_model: nn.Module | None = None,
                       **settings: Any) -> dict[str, float]:
    """All linearity measures of checkpoint `model_t` over an evaluation loader of (x, y), one pass.

    Keys (those whose inputs are None or switched off are left out):
      test_acc                       top-1 accuracy of model_t
      linear_agreement, linear_acc   F == L rate and the linear model's accuracy (needs linear_model)
      mu_y_bits, i_fy_bits, i_fy_given_l_bits, i_ly_bits   performance correlation (Kalimeris 2019)
      linearized_agreement_init      argmax f_t == argmax f_lin, linearized around model_0
      linearized_rel_dist_init       ||f_t - f_lin||_F / ||f_t - f_0||_F over the split (NaN if f_t == f_0)
      linearized_agreement_prev, linearized_rel_dist_prev   the same around model_prev
      relu_same_as_init, relu_same_as_prev                  ReLU on/off agreement with model_0 / model_prev

    Models run in eval mode (restored afterwards) under no_grad. With `device` the models are moved
    there; otherwise batches go to model_t's device. Per-example predictions (ints) are kept for the
    information measures; ReLU masks are kept for one batch only. reduce=True (under torchrun, each
    rank passing its shard of the evaluation data): counts and norms are summed and predictions
    gathered across ranks (reduce_linearity), so every rank returns the measures of the whole split.
    The settings (device, linearized, relu, max_batches, reduce) are the fields of MeasureSettings.
    """
    o = MeasureSettings(**settings)
    with same_outcome(enabled=o.reduce):  # an error on one rank stops every rank before the reduction
        acc = _accumulate(model_t, model_0, loader, model_prev, linear_model, o)
    if o.reduce:
        reduce_linearity(acc)
    return acc.result()


def _accumulate(model_t: nn.Module, model_0: nn.Module, loader: Iterable[Any], model_prev: nn.Module | None,
                linear_model: nn.Module | None, o: MeasureSettings) -> LinearityAccumulator:
    """One pass of linearity_measures over this process's loader."""
    device, linearized, relu, max_batches = o.device, o.linearized, o.relu, o.max_batches
    if device is not None:
        device = torch.device(device)
        for m in (model_t, model_0, model_prev, linear_model):
            if m is not None:
                m.to(device)
    else:
        device = model_device(model_t)
    refs = {"init": model_0} if model_prev is None else {"init": model_0, "prev": model_prev}
    # The same object as model_t (e.g. step 0 vs itself) would see model_t's recording hooks: copy it.
    refs = {k: copy.deepcopy(m) if m is model_t else m for k, m in refs.items()}
    deltas = {k: parameter_delta(model_t, m) for k, m in refs.items()} if linearized else {}
    if relu and not relu_modules(model_t):
        relu = False  # no nn.ReLU modules: the measure does not apply
    acc = LinearityAccumulator(list(refs), linearized=linearized, relu=relu, device=device)
    models = [m for m in (model_t, *refs.values(), linear_model) if m is not None]
    with ExitStack() as stack:
        stack.enter_context(eval_mode(*models))
        stack.enter_context(torch.no_grad())
        ref_masks = stack.enter_context(relu_patterns(model_t)) if relu else None
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise CsnError("linearity needs a loader of (inputs, labels) batches.")
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            _measure_batch(acc, model_t, x, y, refs, deltas, linear_model, ref_masks)
    return acc.close()


def _measure_batch(acc: LinearityAccumulator, model_t: nn.Module, x: Tensor, y: Tensor, refs: dict[str, nn.Module],
                   deltas: dict[str, dict[str, Tensor]], linear_model: nn.Module | None,
                   ref_masks: dict[str, list[Tensor]] | None) -> None:
    """One batch of _accumulate: model_t's predictions (its ReLU masks recorded), then every reference's
    linearization and ReLU comparison; the masks are dropped at the end."""
    if ref_masks is not None:
        ref_masks.clear()
    ft = first_tensor(model_t(x))
    pred = ft.argmax(dim=1)
    acc.add("correct", (pred == y).sum())
    acc.add("total", int(y.shape[0]))
    acc.preds["f"].append(pred.cpu())
    acc.preds["y"].append(y.cpu())
    if linear_model is not None:
        xl = x.reshape(x.shape[0], -1).float().to(model_device(linear_model))
        acc.preds["l"].append(linear_model(xl).argmax(1).cpu())
    for k, ref in refs.items():
        if k in deltas:
            f_lin, f_ref = _linearize(ref, deltas[k], x)
            acc.add(f"agree_{k}", (f_lin.argmax(1) == pred).sum())
            acc.add(f"n_{k}", int(x.shape[0]))
            acc.add(f"num_{k}", (ft.double() - f_lin.double()).pow(2).sum())
            acc.add(f"den_{k}", (ft.double() - f_ref.double()).pow(2).sum())
        if ref_masks is not None:
            with _relu_compare(ref, ref_masks, acc.relu_counts(k)):
                ref(x)
    if ref_masks is not None:
        ref_masks.clear()


__all__ = [
    "LinearityAccumulator",
    "MeasureSettings",
    "accuracy",
    "conditional_mutual_information",
    "fit_linear_classifier",
    "linear_predict",
    "linearity_measures",
    "linearized_outputs",
    "mutual_information",
    "parameter_delta",
    "performance_correlation",
    "reduce_linearity",
    "relu_agreement",
    "relu_patterns",
]
