"""The trace of the Fisher information of each stage's weights at a checkpoint (`Fisher`).

Achille, Rovere and Soatto (ICLR 2019, "Critical learning periods in deep networks", section 4) read the
"effective connectivity" of a network off the Fisher information of its weights w,

    F = E_{x ~ Q(x)} E_{y ~ p_w(y|x)} [ grad_w log p_w(y|x) grad_w log p_w(y|x)^T ],

and follow its trace over training: it rises fast in the first epochs, then falls (their "loss of information
plasticity"). Note the inner expectation: y is drawn from the *model's* predictive distribution p_w(y|x), not
taken from the data. csn measures, at every selected checkpoint, on N examples x_i of an evaluation split:

    tr F_S = (1/N) sum_i E_{y ~ p_w(y|x_i)} || grad_{w_S} log p_w(y|x_i) ||^2

for the weights w_S of each stage S, for the parameters outside every stage ('other') and for all parameters
('all' = the sum of the stage rows and 'other'). A stage's weights are the parameters of the modules at its read
points (csn.core.units.stages: for a ResNet stage layer1, every parameter whose name starts with layer1.0.,
layer1.1., ...; conv weights and BatchNorm scales and shifts alike), the same tensors a stage rewind resets
(csn.training.interventions.rewind). A model whose read points hold no parameters (VGG's and the MLP's ReLUs)
gets stage rows of 0 parameters and its weights counted in 'other' (one note says so).

--labels picks how y is chosen:

- **sampled** (the default): one label per example drawn from p_w(y|x_i), by inverse CDF from a uniform u_i of a
  generator seeded with --seed (FISHER_SEED); u_i belongs to the example's place in the seeded subset, so the
  same examples get the same u_i at every checkpoint, in every run, in any chunking and under torchrun. Each term
  ||grad log p_w(y_i|x_i)||^2 is an unbiased one-sample Monte-Carlo estimate of the inner expectation, so the
  mean is an unbiased estimate of tr F, the quantity Achille et al. define (an independent reconstruction of
  their measurement, RoniLeor/critical-learning-periods src/clp/fisher.py, draws y from the model the same way;
  its protocol notes say the paper's own per-layer curves used a noise-based variational approximation of the
  Fisher instead, which csn does not implement: csn computes the definition directly). The default because it is
  the Fisher information, and costs one gradient per example.
- **true**: the data's labels y_i: the "empirical Fisher". It is not the Fisher: it measures the gradients of
  the data's labels, which for a model that does not yet fit the data (early training, exactly where the peak
  is) are the large gradients of its mistakes, not the curvature of its own predictive distribution (Kunstner,
  Hennig and Balles, NeurIPS 2019, "Limitations of the empirical Fisher approximation"). Kept for comparison
  with works that used it (e.g. EWC implementations).
- **exact**: the inner expectation in closed form, sum_y p_w(y|x_i) ||grad log p_w(y|x_i)||^2 (one gradient per
  class and example: up to C times the cost of 'sampled' for C classes, about 8x for the fmnist ResNet-8 with
  10); no label noise (trace_se is then the spread over the examples alone).

Computation: per-example gradients with torch.func (functional_call + vmap + grad; jacrev over the classes for
'exact'), in eval mode (BatchNorm with running statistics, re-estimated on a copy per the framework's BN policy
like every analysis), in chunks of --chunk examples to bound memory, sums of squares accumulated in float64.
For 'sampled' the label is drawn inside the vectorized function from the same forward pass (no extra pass).
Eval-mode BatchNorm enters the vectorized function as the per-channel affine map it is (affine_batchnorm: the same
function and parameters, a cheaper backward). Cost on one CPU thread (benchmarks/bench_fisher.py), fmnist
ResNet-8, 1,000 images: 2 to 2.7 plain eval passes in the analyses' batches of 1,000, about 4 to 4.3 in the
CPU's fastest batches (100); the floor of any per-example-gradient method is a forward and a backward pass
(about 3), and vmap's per-example conv weight gradients (grouped convolutions) cost most of the rest. A model as
small as the smoke preset's pays vmap's per-call overhead (about 5 eval passes, 0.2 s per 1,000 examples).

Defaults: --split test and --samples 1000 (a fixed seeded subset, SUBSET_SEED, like the other analyses: the
selectivity this is compared with is read on the test split; Achille et al.'s Q(x) is the training data, which
--split train measures; with sampled labels no label of the split is read, only its images). 1,000 examples
keep a checkpoint at about 1.5 s on one CPU thread for the fmnist model while trace_se says how precise the
estimate is; --samples all for more.

Table:

    tables/fisher.parquet  step, epoch, stage, trace, trace_se, n_params, trace_per_param, split, labels, n_images,
                           seed, bn_recalibrated

One row per checkpoint and stage (the model's stages in order, then 'other', then 'all'); trace_se = the
standard error of the trace over the N examples (and, for sampled labels, their draws): the sample standard
deviation of the per-example terms / sqrt(N), to tell a peak from noise; trace_per_param = trace / n_params (the mean diagonal entry of F_S; NaN for a stage without parameters); seed = --seed for
sampled labels, -1 otherwise (no label is drawn).

Under torchrun (default --distribute split) every process computes its contiguous share of the examples (its
labels drawn from the same uniforms as in one process) and the per-stage sums are all-reduced: the same rows as
one process up to the order of summation. --distribute checkpoints: each process takes whole checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

from csn import dist
from csn.analysis.base import SUBSET_SEED, Analysis, Context, Samples, Split, nonfinite_error, split_of, stage_summary
from csn.analysis.registry import register_analysis
from csn.core.schema import Int, Schema
from csn.core.units import split_batch, stages, to_device
from csn.data.loaders import shard_split, split_loader, subset
from csn.errors import CsnError
from csn.runs.run import Checkpoint
from csn.runs.table import TableSpec

FISHER_SEED = 6151
"""Default seed of the uniforms the sampled labels are drawn with (the same in every run and checkpoint)."""
DEFAULT_SAMPLES = 1000
"""Examples of the split (a fixed seeded subset) the traces are measured on by default."""
GRAD_BUDGET = 256 * 2**20
"""Bytes of per-example gradients one chunk may hold when --chunk is not given."""
ACT_BUDGET = 128 * 2**20
"""Bytes of activations (module outputs) of one chunk's examples when --chunk is not given."""
MAX_CHUNK = 512
"""Largest default chunk."""
OTHER, ALL = "other", "all"
Labels = Literal["sampled", "true", "exact"]

FISHER = TableSpec(
    "fisher",
    {"step": "int64", "epoch": "float64", "stage": "str", "trace": "float64", "trace_se": "float64", "n_params": "int64",
     "trace_per_param": "float64", "split": "str", "labels": "str", "n_images": "int64", "seed": "int64",
     "bn_recalibrated": "int64"},
    key=("step", "stage"), settings=("split", "labels", "n_images", "seed"), row_settings=("bn_recalibrated",),
    same_set=("stage",), flags={"split": "--split", "labels": "--labels", "n_images": "--samples", "seed": "--seed"},
    row_scope={"bn_recalibrated": ("step",)},
    labels={"bn_recalibrated": "BatchNorm statistics re-estimated from {} batches"})
"""tables/fisher.parquet: one row per checkpoint and stage (the stages, 'other', 'all')."""


class FisherOptions(Schema):
    """Options of the Fisher analysis."""

    split: Split = Field("test", description="Evaluation split (no augmentation).")
    samples: Samples = Field(DEFAULT_SAMPLES, description="A fixed random subset of N examples of the split ('all' = "
                             "the whole split).", json_schema_extra={"metavar": "N|all"})
    labels: Labels = Field("sampled", description="y ~ the model's p(y|x), one seeded draw per example (the Fisher "
                           "information; default), true (the data's labels: the empirical Fisher), or exact (the "
                           "expectation over every class: C times the cost).")
    seed: Int = Field(FISHER_SEED, ge=0, description="Seed of the sampled labels (the same draw at every checkpoint).")
    chunk: Int | None = Field(None, ge=1, description="Examples per vectorized gradient [default: as many as fit 128 MiB "
                              f"of activations and 256 MiB of per-example gradients, at most {MAX_CHUNK}]; changes "
                              "speed and memory, not the result.",
                              json_schema_extra={"metavar": "N"})


# ------------------------------------------------------------------------------------------------
# the computation
# ------------------------------------------------------------------------------------------------

def parameter_groups(model: nn.Module, stage_map: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """{group: [parameter names]}: each stage's parameters (those of the modules at its read points, matched by
    name prefix), then OTHER (every parameter in no stage), each parameter in exactly one group."""
    names = [n for n, _ in model.named_parameters()]
    groups: dict[str, list[str]] = {}
    taken: set[str] = set()
    for stage, points in stage_map.items():
        if stage in (OTHER, ALL):
            raise CsnError(f"the model declares a stage named {stage!r}, which the Fisher table uses for its own rows; "
                           "rename the stage (config key layers).")
        prefixes = tuple(f"{p}." for p in points)
        groups[stage] = [n for n in names if n.startswith(prefixes) and n not in taken]
        taken.update(groups[stage])
    groups[OTHER] = [n for n in names if n not in taken]
    return groups


def label_uniforms(n: int, seed: int) -> Tensor:
    """The uniforms [n] (float64, CPU) the sampled labels of the n examples of the subset are drawn with."""
    return torch.rand(n, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)


def sample_label(log_probs: Tensor, u: Tensor) -> Tensor:
    """The label drawn from softmax(log_probs) [C] with the uniform u: the first class whose cumulative
    probability (float64) reaches u (inverse CDF; vmap-able)."""
    cdf = log_probs.detach().double().exp().cumsum(-1)
    return (cdf < u).sum().clamp_max(log_probs.shape[-1] - 1)


@dataclass(frozen=True)
class FisherSetup:
    """How to measure: labels ('sampled', 'true', 'exact'), the parameter groups, examples per chunk."""

    labels: str
    groups: Mapping[str, Sequence[str]]
    chunk: int


def _squared_norms(model: nn.Module, labels: str) -> Callable[..., dict[str, Tensor]]:
    """f(params, buffers, x, extra) -> {parameter: E_y ||grad log p(y|x)||^2 of one example} (vmap over x, extra):
    extra is the uniform (sampled) or the label (true), unused (exact)."""
    def log_probs(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return out.squeeze(0).log_softmax(-1)

    def score(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, extra: Tensor) -> Tensor:
        lp = log_probs(params, buffers, x)
        y = sample_label(lp, extra) if labels == "sampled" else extra
        return lp.gather(-1, y.view(1)).squeeze(0)

    def per_label(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, extra: Tensor) -> dict[str, Tensor]:
        g = grad(score)(params, buffers, x, extra)
        return {k: torch.linalg.vector_norm(v).square() for k, v in g.items()}  # one pass, faster than square().sum()

    def with_probs(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        lp = log_probs(params, buffers, x)
        return lp, lp.detach().exp()

    def expected(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, extra: Tensor) -> dict[str, Tensor]:
        jac, p = jacrev(with_probs, has_aux=True)(params, buffers, x)  # jac: {name: [C, *shape]}
        return {k: (p * torch.linalg.vector_norm(v.flatten(1), dim=1).square()).sum() for k, v in jac.items()}

    return expected if labels == "exact" else per_label


def activation_bytes(model: nn.Module, example: Tensor) -> int:
    """Bytes of the outputs of every leaf module for one example (one eval-mode forward without gradients): what
    the backward pass of one example keeps, roughly."""
    total = 0

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal total
        outs = output if isinstance(output, (tuple, list)) else [output]
        total += sum(t.numel() * t.element_size() for t in outs if isinstance(t, Tensor))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example.unsqueeze(0))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


class _AffineBatchNorm(nn.Module):
    """An eval-mode BatchNorm as the per-channel affine map it is, y = x * s + (b - mean * s) with
    s = w / sqrt(var + eps), holding the module's own parameters and buffers under their names (so gradients and
    functional_call are the module's): its backward is two elementwise products and two sums, a fraction of
    native_batch_norm_backward's (benchmarks/bench_fisher.py)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        self.weight, self.bias = bn.weight, bn.bias
        for name, buf in bn.named_buffers(recurse=False):
            self.register_buffer(name, buf)

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # the channel dimension of [N, C, ...]
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return x * scale.view(shape) + shift.view(shape)


@contextmanager
def affine_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every eval-mode BatchNorm1d/2d/3d that reads running statistics replaced by
    _AffineBatchNorm (the same function), restored on exit."""
    swapped = []
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if (type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and not child.training
                    and child.running_mean is not None and child.running_var is not None):
                setattr(parent, name, _AffineBatchNorm(child))
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def default_chunk(model: nn.Module, example: Tensor, labels: str, num_classes: int) -> int:
    """Examples per chunk: their activations within ACT_BUDGET and their per-example gradients (times the classes
    for 'exact') within GRAD_BUDGET, at most MAX_CHUNK. Large chunks amortize vmap's per-call overhead (what small
    models pay for), chunks past the caches run slower (what large activations pay for): bench_fisher.py."""
    per_class = num_classes if labels == "exact" else 1
    grads = sum(p.numel() * p.element_size() for p in model.parameters()) * per_class
    acts = activation_bytes(model, example) * per_class
    return int(max(1, min(MAX_CHUNK, GRAD_BUDGET // max(1, grads), ACT_BUDGET // max(1, acts))))


@dataclass
class FisherSums:
    """What the examples add up to (float64): per group (setup.groups' order) the sum over examples of
    E_y ||grad_{w_group} log p(y|x)||^2 (`sums` [G]) and of its square (`squares` [G + 1], the last one that of the
    sum over the groups), and the number of examples `n`. Sums, so shards add up (`reduce_`)."""

    sums: Tensor
    squares: Tensor
    n: int

    def reduce_(self) -> FisherSums:
        """Sum every rank's sums in place (under torchrun; nothing in one process)."""
        count = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sums.device)
        dist.all_reduce_tensors([self.sums, self.squares, count])
        self.n = int(count.item())
        return self


def fisher_sums(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], setup: FisherSetup,
                device: torch.device | str = "cpu") -> FisherSums:
    """The FisherSums of the examples of `batches`, which yields (x, extra): extra the uniforms [B] of 'sampled',
    the labels [B] of 'true', anything of [B] for 'exact'. The model is read in eval mode, its weights untouched."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    index = {name: i for i, names in enumerate(setup.groups.values()) for name in names}
    fn = vmap(_squared_norms(model, setup.labels), in_dims=(None, None, 0, 0))
    g = len(setup.groups)
    out = FisherSums(torch.zeros(g, dtype=torch.float64, device=device),
                     torch.zeros(g + 1, dtype=torch.float64, device=device), 0)
    was_training = model.training
    model.eval()
    try:
        with affine_batchnorm(model):
            for x, extra in batches:
                x, extra = to_device(x, device), to_device(extra, device)
                for i in range(0, len(x), setup.chunk):
                    sq = fn(params, buffers, x[i:i + setup.chunk].contiguous(), extra[i:i + setup.chunk])
                    per = torch.zeros(len(x[i:i + setup.chunk]), g, dtype=torch.float64, device=device)
                    for name, v in sq.items():
                        per[:, index[name]] += v.double()
                    per = torch.cat([per, per.sum(1, keepdim=True)], 1)
                    out.sums += per[:, :g].sum(0)
                    out.squares += per.square().sum(0)
                out.n += len(x)
    finally:
        model.train(was_training)
    if not (torch.isfinite(out.sums).all() and torch.isfinite(out.squares).all()):
        raise nonfinite_error("the Fisher information's gradients")
    return out


# ------------------------------------------------------------------------------------------------
# the analysis
# ------------------------------------------------------------------------------------------------

def fisher_batches(ctx: Context, options: FisherOptions) -> Iterable[tuple[Tensor, Tensor]]:
    """(x, extra) batches of this process's examples of the split's seeded subset: extra = each example's uniform
    (sampled; indexed by its place in the subset, so shards and chunks draw what one process draws), its label
    (true), or its label, unused (exact). Under torchrun with a shared checkpoint: this rank's contiguous share."""
    s = subset(split_of(ctx.data, options.split), options.samples, SUBSET_SEED)
    rows = dist.shard_range(len(s)) if ctx.shared else range(len(s))
    part = shard_split(s) if ctx.shared else s
    cfg = ctx.run.config
    loader = split_loader(part, cfg.eval_batch_size, ctx.device, run_seed=cfg.seed, workers=cfg.workers,
                          channels_last=False)
    u = label_uniforms(len(s), options.seed)[rows.start:rows.stop]
    at = 0
    for item in loader:
        x, y = split_batch(item)
        extra = u[at:at + len(x)] if options.labels == "sampled" else torch.as_tensor(y).long()
        at += len(x)
        yield x, extra


def fisher_frame(s: FisherSums, groups: Mapping[str, Sequence[str]], sizes: Mapping[str, int]) -> pd.DataFrame:
    """One row per group and one for ALL: stage, trace (the mean over examples), trace_se (its standard error over
    the examples: sample standard deviation / sqrt(n); NaN for one example), n_params, trace_per_param."""
    n = s.n
    total = s.sums.double().cpu().numpy() / n
    names = [*groups, ALL]
    trace = np.append(total, total.sum())
    var = (s.squares.double().cpu().numpy() - n * trace**2) / (n - 1) if n > 1 else np.full(len(trace), np.nan)
    se = np.sqrt(np.maximum(var, 0.0) / n)
    counts = np.array([sizes[g] for g in groups] + [sum(sizes.values())], dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.where(counts > 0, trace / np.maximum(counts, 1), np.nan)
    return pd.DataFrame({"stage": names, "trace": trace, "trace_se": se, "n_params": counts, "trace_per_param": per})


@register_analysis()
class Fisher(Analysis):
    """The trace of the Fisher information of each stage's weights at every checkpoint (Achille et al. 2019)."""

    name = "fisher"
    Options = FisherOptions
    tables = (FISHER,)

    def setup(self, ctx: Context) -> None:
        o = self.options
        model = ctx.run.build_model()
        try:
            stage_map = stages(model)
        except CsnError:
            stage_map = {}
            ctx.log(f"note: run {ctx.run.name}'s model declares no stages; only the rows '{OTHER}' and '{ALL}' "
                    "are measured (declare stages with the config key layers for per-stage rows).")
        groups = parameter_groups(model, stage_map)
        sizes = dict(model.named_parameters())
        ctx.own["groups"] = groups
        ctx.own["sizes"] = {g: int(sum(sizes[n].numel() for n in names)) for g, names in groups.items()}
        empty = [g for g in stage_map if not groups[g]]
        if empty:
            ctx.log(f"note: stage(s) {', '.join(empty)} of run {ctx.run.name} hold no parameters at their read points "
                    f"(their rows are 0; the weights are in '{OTHER}'); declare stages whose read points are the "
                    "modules that hold the weights (config key layers) to split them.")
        ctx.own["n_images"] = ctx.split_size(o.split, o.samples)
        if ctx.num_classes is None and o.labels == "exact":
            raise CsnError(f"run {ctx.run.name} records no number of classes (run.json data.num_classes); use "
                           "--labels sampled, or train it with csn.")
        classes = int(ctx.num_classes or 1)
        if o.chunk is None:
            first = split_loader(split_of(ctx.data, o.split), 1, "cpu", run_seed=ctx.run.config.seed, workers=0)
            ctx.own["chunk"] = default_chunk(model, split_batch(next(iter(first)))[0][0], o.labels, classes)
        else:
            ctx.own["chunk"] = o.chunk

    def settings(self, ctx: Context) -> dict[str, dict[str, Any]]:
        o = self.options
        return {"fisher": {"split": o.split, "labels": o.labels, "n_images": ctx.own["n_images"],
                           "seed": o.seed if o.labels == "sampled" else -1}}

    def sets(self, ctx: Context) -> dict[str, dict[str, Iterable[Any]]]:
        return {"fisher": {"stage": [*ctx.own["groups"], ALL]}}

    def expected(self, ctx: Context, ckpt: Checkpoint) -> dict[str, pd.DataFrame]:
        keys = pd.DataFrame({"step": np.int64(ckpt.step), "stage": [*ctx.own["groups"], ALL]})
        return {"fisher": keys.assign(bn_recalibrated=np.int64(ctx.bn[ckpt.step]))}

    def summary(self, rows: Mapping[str, pd.DataFrame]) -> dict[str, float]:
        """Each stage's Fisher trace (and the whole model's, stage 'all')."""
        return stage_summary(rows["fisher"], ("trace",))

    def compute(self, ctx: Context, ckpt: Checkpoint, missing: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        o = self.options
        am = ctx.model(ckpt)
        setup = FisherSetup(o.labels, ctx.own["groups"], ctx.own["chunk"])
        sums = fisher_sums(am.model, fisher_batches(ctx, o), setup, ctx.device)
        if ctx.shared:
            sums.reduce_()
        if sums.n == 0:
            raise CsnError("the evaluation data yielded no examples; measure on a non-empty split.")
        df = fisher_frame(sums, ctx.own["groups"], ctx.own["sizes"])
        df.insert(0, "step", np.int64(ckpt.step))
        df.insert(1, "epoch", float(ckpt.epoch))
        return {"fisher": FISHER.frame(df.assign(
            split=o.split, labels=o.labels, n_images=np.int64(ctx.own["n_images"]),
            seed=np.int64(o.seed if o.labels == "sampled" else -1), bn_recalibrated=np.int64(am.bn_recalibrated)))}


__all__ = ["FISHER_SEED", "DEFAULT_SAMPLES", "FISHER", "FisherOptions", "FisherSetup", "parameter_groups",
           "label_uniforms", "sample_label", "affine_batchnorm", "activation_bytes", "default_chunk", "FisherSums", "fisher_sums", "fisher_batches", "fisher_frame", "Fisher"]
