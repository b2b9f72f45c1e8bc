"""Linear CKA between layers, streamed over minibatches with the unbiased HSIC estimator.

Source: Nguyen, Raghu, Kornblith (2021), "Do wide and deep networks learn the same things?",
minibatch CKA (their eq. 2-3), built on the unbiased HSIC estimator of Song et al. (2012); CKA
itself: Kornblith, Norouzi, Lee, Hinton (2019), "Similarity of neural network representations
revisited".

For a batch of n > 3 examples and features X [n, p], Y [n, q]:

    K = X X^T,  L = Y Y^T,  both with their diagonals set to zero
    HSIC1(K, L) = [ tr(KL) + (1'K1)(1'L1) / ((n-1)(n-2)) - 2/(n-2) * 1'KL1 ] / (n(n-3))
    CKA(X, Y)   = mean_b HSIC1(K_b, L_b) / sqrt( mean_b HSIC1(K_b, K_b) * mean_b HSIC1(L_b, L_b) )

where b runs over batches. Everything is accumulated in float64. Because HSIC1 is unbiased, the
batch means converge to the population value as batches accumulate (unlike the biased estimator,
whose value depends on the batch size).

Cost: for m layers, one Gram matrix per layer and batch (m Grams, not one or two per pair); all
m x m values of tr(K_i K_j) come from one matmul of the flattened Grams, and 1'K_i K_j 1 from one
matmul of their row sums.

Features are read through csn.core.trace.TraceDict: per-unit activations (csn.core.units: the
spatial mean of each channel) by default, or the flattened outputs; the layer name "logits" means
the model output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from csn.core.trace import TraceDict
from csn.core.units import (
    batch_inputs,
    eval_mode,
    first_tensor,
    model_device,
    resolve_layers,
    to_device,
)
from csn.errors import CsnError

LOGITS = "logits"
"""The layer name that means the model output."""
_SMALL = "CKA needs batches of more than 3 examples"
_SMALL_BATCH = f"{_SMALL}; increase the batch size."


# ------------------------------------------------------------------------------------------------
# the estimator
# ------------------------------------------------------------------------------------------------

def _zero_diag_grams(features: Sequence[Tensor]) -> Tensor:
    """Stack the float64 Gram matrices X X^T of each [n, d_i] feature, diagonals zeroed: [m, n, n]."""
    n = features[0].shape[0]
    if n <= 3:
        raise CsnError(_SMALL_BATCH)
    grams = []
    for i, x in enumerate(features):
        if x.shape[0] != n:
            raise CsnError(f"CKA features must share the batch size; feature {i} has {x.shape[0]} rows, feature 0 has {n}.")
        x = x.detach().reshape(n, -1).to(torch.float64)
        grams.append(x @ x.T)
    g = torch.stack(grams)
    g.diagonal(dim1=1, dim2=2).zero_()
    return g


def hsic1_matrix(grams: Tensor) -> Tensor:
    """Unbiased HSIC1(K_i, K_j) (Song et al. 2012) for all pairs of zero-diagonal Grams [m, n, n]: returns [m, m].

    HSIC1(K, L) = [tr(KL) + (1'K1)(1'L1)/((n-1)(n-2)) - 2/(n-2) 1'KL1] / (n(n-3)).
    tr(K_i K_j) = sum(K_i * K_j) (Grams are symmetric) for all pairs in one matmul of the flattened
    Grams; 1'K_i 1 are total sums; 1'K_i K_j 1 = (K_i 1) . (K_j 1) in one matmul of row sums.
    """
    m, n, _ = grams.shape
    if n <= 3:
        raise CsnError(_SMALL_BATCH)
    flat = grams.reshape(m, n * n)
    trace = flat @ flat.T                       # tr(K_i K_j)
    rows = grams.sum(dim=2)                     # K_i 1, [m, n]
    total = rows.sum(dim=1)                     # 1'K_i 1, [m]
    cross = rows @ rows.T                       # 1'K_i K_j 1
    return (trace + torch.outer(total, total) / ((n - 1) * (n - 2)) - cross * (2.0 / (n - 2))) / (n * (n - 3))


def cka_from_hsic(hsic: Tensor) -> Tensor:
    """CKA matrix from a (mean or summed) HSIC matrix: hsic_ij / sqrt(hsic_ii hsic_jj) (Kornblith et al. 2019).

    Entries whose self-similarity is not positive (constant features; or, with very few small
    batches, a negative unbiased estimate) are NaN rather than a misleading number.
    """
    d = torch.diagonal(hsic)
    denom = torch.outer(d, d)
    out = hsic / denom.clamp_min(0).sqrt()
    return torch.where(denom > 0, out, torch.full_like(out, float("nan")))


class CKAAccumulator:
    """Streaming all-pairs linear CKA over minibatches (unbiased minibatch HSIC, float64; Nguyen et al. 2021).

    Within one set of layers: ``CKAAccumulator(m)``; call ``update([x_1, ..., x_m])`` per batch,
    ``result()`` gives the [m, m] CKA matrix.

    Between two sets (two models, two runs, two checkpoints on the same batches):
    ``CKAAccumulator(m_a, m_b)``; call ``update_pair(feats_a, feats_b)`` per batch, ``result()``
    gives the [m_a, m_b] block (``result_full()`` the whole (m_a+m_b)-square matrix). The two lists
    are concatenated and the off-diagonal block is read, so the self-terms come for free.

    Data parallel: ``for t in acc.tensors(): dist.all_reduce(t)`` (sum; csn.analysis.cka.reduce_cka)
    before ``result()`` gives the CKA of all ranks' batches; every rank must create its accumulator
    on the same device kind (pass ``device`` so ranks that saw no batch still hold tensors there).
    """

    def __init__(self, num_layers: int, num_layers_b: int | None = None, *, device: torch.device | str | None = None):
        if num_layers < 1 or (num_layers_b is not None and num_layers_b < 1):
            raise CsnError("CKA needs at least one layer on each side; pass at least one layer.")
        self.num_layers_a = int(num_layers)
        self.num_layers_b = None if num_layers_b is None else int(num_layers_b)
        m = self.num_layers_a + (self.num_layers_b or 0)
        self._device_fixed = device is not None
        self._updated = False
        self.hsic_sum = torch.zeros(m, m, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def num_layers(self) -> int:
        return self.hsic_sum.shape[0]

    def update(self, features: Sequence[Tensor]) -> None:
        """Add one batch: a list of [n, d_i] features (same n, same examples), one per layer."""
        if len(features) != self.num_layers:
            raise CsnError(f"CKA accumulator expects {self.num_layers} feature tensors per batch, got {len(features)}.")
        grams = _zero_diag_grams(features)
        hsic = hsic1_matrix(grams)
        if not self._device_fixed and not self._updated and self.hsic_sum.device != hsic.device:
            self.hsic_sum = self.hsic_sum.to(hsic.device)
            self.count = self.count.to(hsic.device)
        self.hsic_sum += hsic.to(self.hsic_sum.device)
        self.count += 1
        self._updated = True

    def update_pair(self, feats_a: Sequence[Tensor], feats_b: Sequence[Tensor]) -> None:
        """Add one batch of two feature sets computed on the same examples (cross form only)."""
        if self.num_layers_b is None:
            raise CsnError("update_pair needs an accumulator built as CKAAccumulator(m_a, m_b); use update() for one set.")
        if len(feats_a) != self.num_layers_a or len(feats_b) != self.num_layers_b:
            raise CsnError(
                f"CKA accumulator expects {self.num_layers_a} + {self.num_layers_b} feature tensors, "
                f"got {len(feats_a)} + {len(feats_b)}."
            )
        self.update(list(feats_a) + list(feats_b))

    def tensors(self) -> list[Tensor]:
        """The state to all-reduce (sum) under data parallelism: [summed HSIC matrix, batch count]."""
        return [self.hsic_sum, self.count]

    def merge(self, other: CKAAccumulator) -> CKAAccumulator:
        """Add another accumulator's batches to this one (same layout)."""
        if other.hsic_sum.shape != self.hsic_sum.shape:
            raise CsnError("cannot merge CKA accumulators over different numbers of layers.")
        self.hsic_sum += other.hsic_sum.to(self.hsic_sum.device)
        self.count += other.count.to(self.count.device)
        return self

    def mean_hsic(self) -> Tensor:
        """Mean unbiased HSIC1 over batches: [m, m] (m = m_a + m_b in the cross form)."""
        if self.count.item() == 0:
            raise CsnError("CKA saw no batches; give a loader with at least one batch of more than 3 examples.")
        return self.hsic_sum / self.count

    def result_full(self) -> Tensor:
        """The full square CKA matrix over all accumulated layers (float64, CPU)."""
        return cka_from_hsic(self.mean_hsic()).cpu()

    def result(self) -> Tensor:
        """CKA matrix: [m, m] for one set; the [m_a, m_b] block in the cross form (float64, CPU)."""
        full = self.result_full()
        if self.num_layers_b is None:
            return full
        return full[: self.num_layers_a, self.num_layers_a:]


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Unbiased linear CKA of two feature matrices [n, p], [n, q] on the same n > 3 examples (one batch)."""
    acc = CKAAccumulator(1, 1)
    acc.update_pair([x], [y])
    return float(acc.result()[0, 0])


# ------------------------------------------------------------------------------------------------
# layers and features of models
# ------------------------------------------------------------------------------------------------

def resolve_cka_layers(model: nn.Module, layers: Sequence[str] | str | None) -> list[str]:
    """Layer patterns -> module names in model order, plus 'logits' (the model output) where asked.

    None = the declared read points + logits. An unknown name raises a CsnError listing the names.
    """
    if layers is None:
        return resolve_layers(model, None) + [LOGITS]
    if isinstance(layers, str):
        layers = [p.strip() for p in layers.split(",") if p.strip()]
    layers = list(layers)
    if not layers:
        raise CsnError("pass at least one layer (a module name, a glob such as 'layer2.*', or 'logits').")
    pats = [p for p in layers if p != LOGITS]
    try:
        names = resolve_layers(model, pats) if pats else []
    except CsnError as e:
        msg = str(e).rstrip(".")
        raise CsnError(f"{msg}, or '{LOGITS}' for the model output.") from None
    return names + ([LOGITS] if LOGITS in layers else [])


def _trace(model: nn.Module, layers: Sequence[str], flatten: bool) -> TraceDict:
    """Hooks retaining per-batch features of `layers` ('logits' excluded): unit activations, or whole outputs."""
    return TraceDict(model, [n for n in layers if n != LOGITS], retain="output" if flatten else "units")


@torch.no_grad()
def collect_features(model: nn.Module, loader: Iterable[Any], layers: Sequence[str],
                     device: torch.device | str) -> list[list[Tensor]]:
    """Per batch (of more than 3 examples), the [n, units] float features of each layer ('logits' = the output).

    Kept in memory so one pass over a checkpoint serves every comparison that needs it.
    """
    out: list[list[Tensor]] = []
    dev = torch.device(device)
    with _trace(model, layers, flatten=False) as cache:
        for batch in loader:
            x = batch_inputs(batch)
            if x.shape[0] <= 3:
                continue
            y = first_tensor(model(to_device(x, dev)))
            out.append([(y if name == LOGITS else cache[name]).detach().reshape(x.shape[0], -1).float()
                        for name in layers])
            cache.clear()
    return out


def cka_blocks(*feature_sets: list[list[Tensor]], num_layers: int | None = None,
               reduce: Callable[[CKAAccumulator], Any] | None = None) -> Tensor:
    """The full CKA matrix over the concatenated layers of several feature sets computed on the same batches.

    num_layers: layers per feature set (default: read from the first batch). reduce: applied to the
    accumulator before the result (under torchrun, csn.analysis.cka.reduce_cka sums the HSIC terms
    and batch counts of every rank's shard of whole batches; a rank whose shard has no batch of
    more than 3 examples then contributes nothing).
    """
    nb = len(feature_sets[0]) if feature_sets else 0
    if any(len(s) != nb for s in feature_sets):
        raise CsnError("CKA feature sets cover different numbers of batches; compare them on the same loader.")
    if num_layers is None and nb:
        num_layers = len(feature_sets[0][0])
    acc = CKAAccumulator(len(feature_sets) * num_layers) if num_layers else None
    for b in range(nb):
        acc.update([f for s in feature_sets for f in s[b]])
    if reduce is not None and acc is not None:
        reduce(acc)
    if acc is None or acc.count.item() == 0:
        raise CsnError(f"{_SMALL}; none of the evaluation batches has more than 3 examples (use a larger --batch-size "
                       "or --samples).")
    return acc.result_full()


def _batch_features(out: Any, cache: dict[str, Tensor], layers: Sequence[str], flatten: bool) -> list[Tensor]:
    """The features of one batch, in layer order ('logits' = the model output)."""
    out = first_tensor(out)
    feats = []
    for name in layers:
        t = out if name == LOGITS else cache[name]
        feats.append(t.detach().flatten(1) if flatten or t.dim() != 2 else t.detach())
    return feats


def cka(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable[Any],
    layers_a: Sequence[str] | str | None = None,
    layers_b: Sequence[str] | str | None = None,
    *,
    device: torch.device | str | None = None,
    flatten: bool = False,
    max_batches: int | None = None,
) -> pd.DataFrame:
    """Linear CKA between every layer of model_a and every layer of model_b on the same batches.

    Features are per-unit activations [n, U] (csn.core.units: spatial mean per channel) by default,
    or the whole flattened output with ``flatten=True``. The layer name ``"logits"`` means the model
    output; ``layers=None`` means the model's declared read points plus the logits. ``model_b`` may
    be ``model_a`` itself (layer x layer within one model; one forward pass per batch).

    Models are run in eval mode (restored afterwards) under no_grad. With ``device`` given, the
    models are moved there; otherwise inputs go to the device of model_a's parameters. Batches of
    3 or fewer examples (typically a loader's last, partial batch) are skipped; if every batch is
    that small, a CsnError says to increase the batch size.

    Returns a tidy DataFrame with columns layer_a, layer_b, cka (one row per pair).
    """
    names_a = resolve_cka_layers(model_a, layers_a)
    names_b = resolve_cka_layers(model_b, layers_b)
    same = model_b is model_a
    if device is not None:
        device = torch.device(device)
        model_a.to(device)
        model_b.to(device)
    else:
        device = model_device(model_a)
    acc = CKAAccumulator(len(names_a), len(names_b), device=device)
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(eval_mode(model_a, model_b))
        if same:
            cache_a = cache_b = stack.enter_context(_trace(model_a, list(dict.fromkeys(names_a + names_b)), flatten))
        else:
            cache_a = stack.enter_context(_trace(model_a, names_a, flatten))
            cache_b = stack.enter_context(_trace(model_b, names_b, flatten))
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = batch_inputs(batch)
            if x.shape[0] <= 3:
                continue
            x = to_device(x, device)
            out_a = model_a(x)
            out_b = out_a if same else model_b(x)
            acc.update_pair(_batch_features(out_a, cache_a, names_a, flatten),
                            _batch_features(out_b, cache_b, names_b, flatten))
    if acc.count.item() == 0:
        raise CsnError(_SMALL_BATCH)
    mat = acc.result()
    rows = [{"layer_a": la, "layer_b": lb, "cka": float(mat[i, j])}
            for i, la in enumerate(names_a) for j, lb in enumerate(names_b)]
    return pd.DataFrame(rows, columns=["layer_a", "layer_b", "cka"])


__all__ = [
    "LOGITS",
    "CKAAccumulator",
    "cka",
    "cka_blocks",
    "cka_from_hsic",
    "collect_features",
    "hsic1_matrix",
    "linear_cka",
    "resolve_cka_layers",
]
