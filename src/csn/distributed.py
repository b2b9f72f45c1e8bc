"""torchrun / DistributedDataParallel helpers. Without torchrun everything is a single process.

What lives here (PyTorch's own engine underneath: torch.distributed + DDP, nothing home-made):

- who am I: `is_dist`, `rank`, `world_size`, `local_rank`, `is_main`, `barrier`, `init_from_env`;
- training: `wrap_ddp`, `sync_batchnorm` (SyncBatchNorm under DDP on GPUs), `folder_loader` (torch
  DataLoader with worker processes and a per-epoch, resumable DistributedSampler),
  `all_reduce_with_grad` (the regularizer's global-batch class sums, differentiable);
- failing together: `same_outcome()` runs a block on every rank and, if it raises on any rank,
  raises the same one-line CsnError on every rank (no rank is left waiting in a collective);
- analyses: `shard_range`/`shard_split` give each rank a contiguous part of the evaluation split
  (a run of whole single-process batches, or equal chunks of examples), and `all_reduce_`/
  `all_reduce_tensors`/`reduce_class_stats`/`reduce_cka`/`reduce_ablation`/`reduce_linearity` sum
  the streamed statistics (class sums/counts, correct counts, HSIC terms, ...) so the result equals
  the single-process one; `broadcast_buffers_` gives every rank rank 0's BatchNorm statistics
  (re-estimated on every rank);
- writing: rank 0 alone writes. `main_lock` takes a run's writer lock on rank 0 only, `on_main`
  runs a step (read a table, decide what is left to do, write rows) on rank 0 and hands its result
  to every rank; both fail on every rank together (`same_outcome`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data.distributed import DistributedSampler

from csn.errors import CsnError


def is_dist() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    """Number of processes (1 without torchrun)."""
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; picks the GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0, the only rank that writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_dist():
        dist.barrier()


def _destroy() -> None:
    """At exit: free what still references the process group (a DDP model in a reference cycle), then destroy
    it, which joins gloo's worker threads while Python is still whole. Left to the interpreter's final
    garbage collection, a worker thread could free a tensor after Python had started to shut down and
    abort the process ("terminate called without an active exception", seen in about 1 of 10 runs)."""
    with contextlib.suppress(Exception):
        if dist.is_available() and dist.is_initialized():
            import gc

            gc.collect()
            dist.destroy_process_group()


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Initialize the default process group when launched by torchrun (WORLD_SIZE > 1); return whether it did.

    Backend: nccl with CUDA, else gloo (CPU). `timeout_s` (or the environment variable
    CSN_DIST_TIMEOUT, seconds) bounds how long a collective waits for a rank that never arrives.
    The group is destroyed at exit.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise CsnError("this torch build has no torch.distributed; run without torchrun or install a standard torch build.")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    timeout_s = timeout_s if timeout_s is not None else float(os.environ.get("CSN_DIST_TIMEOUT", "0") or 0)
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s and timeout_s > 0 else {}
    dist.init_process_group(backend=backend, **kwargs)
    atexit.register(_destroy)
    return True


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the model when running distributed, else the model itself.

    DDP averages gradients over ranks; with each rank's loss the mean over its equal share of the
    global batch, that is the gradient of the mean over the global batch (single-process value).
    """
    if not is_dist():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether the model holds any BatchNorm layer."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def sync_batchnorm(model: torch.nn.Module, device: torch.device, enabled: bool = True) -> tuple[torch.nn.Module, str]:
    """Under DDP, convert BatchNorm to SyncBatchNorm so training-mode statistics are the global batch's.

    Returns (model, mode) with mode one of "none" (no BatchNorm or a single process), "sync"
    (SyncBatchNorm: BN equals the single-process BN of the global batch), or "per-rank" (each rank
    normalizes with its own slice's statistics: when disabled, or on CPU/gloo where PyTorch's
    SyncBatchNorm is not implemented). The module keeps its identity, names and state-dict keys.
    """
    if not is_dist() or not has_batchnorm(model):
        return model, "none"
    if not enabled or device.type not in ("cuda", "xpu", "hpu"):
        return model, "per-rank"
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model), "sync"


# ------------------------------------------------------------------------------------------------
# failing together
# ------------------------------------------------------------------------------------------------

def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; [obj] in a single process."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (the object itself in a single process)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def same_outcome(enabled: bool = True) -> Iterator[None]:
    """Run a block on every rank; if it raised on any rank, raise on every rank, so no rank hangs.

    enabled=False runs the block as is (for code shared by both cases: ranks working on different
    jobs, whose outcomes an enclosing same_outcome collects).

    A CsnError keeps its one-line message on every rank (the lowest failing rank's message); any other
    exception is re-raised unchanged on the rank that hit it, while the others get a CsnError naming
    that rank and the exception. In a single process the block runs as is. Every rank must enter the
    block (it ends in one collective), and the block itself must hold no collective (a rank that failed
    early would meet the others' collective with its own gather): wrap set-up and rank-0 writes in it.
    A failure inside collectives (mid-training) ends the job through torchrun, which stops the other
    workers when one exits non-zero (or through the process-group timeout, CSN_DIST_TIMEOUT).
    """
    if not enabled or not is_dist():
        yield
        return
    err: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - shared, then re-raised below
        err = e
    msg = None
    if isinstance(err, CsnError):
        msg = str(err)
    elif err is not None:
        first_line = str(err).splitlines()[0] if str(err) else ""
        msg = f"process {rank()} failed with {type(err).__name__}" + (f" ({first_line})" if first_line else "") + \
            "; see its traceback above."
    msgs = all_gather_objects(msg)
    if err is not None and not isinstance(err, CsnError):
        raise err
    first = next((m for m in msgs if m), None)
    if first is not None:
        if isinstance(err, CsnError) and str(err) == first:
            raise err
        raise CsnError(first)


# ------------------------------------------------------------------------------------------------
# analyses: shard the evaluation split, reduce the statistics
# ------------------------------------------------------------------------------------------------

def shard_range(num_examples: int, batch_size: int | None = None, rank_: int | None = None,
                world: int | None = None) -> range:
    """The examples of this rank's shard of a split, a contiguous range; the ranks' ranges cover it in order.

    batch_size None: equal chunks of ceil(n / world) examples, for statistics that are sums over
    examples (class sums and counts, correct counts, linearity counts and norms), which do not depend
    on batch boundaries. batch_size B: a contiguous run of the single-process batches (batch b =
    examples [b*B, (b+1)*B)), the runs differing by at most one batch, for per-batch statistics such
    as minibatch HSIC; with fewer batches than ranks the last ranks get an empty range.
    """
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    if batch_size is None:
        batch_size, nb = max(1, -(-num_examples // w)), w
    elif batch_size <= 0:
        raise CsnError(f"batch size must be positive, got {batch_size}.")
    else:
        nb = -(-num_examples // batch_size)
    lo, hi = -(-nb * r // w), -(-nb * (r + 1) // w)  # with fewer batches than ranks, the first ranks work
    return range(min(lo * batch_size, num_examples), min(hi * batch_size, num_examples))


def shard_split(split: Any, batch_size: int | None = None, rank_: int | None = None, world: int | None = None) -> Any:
    """This rank's shard (see shard_range) of a split: a TensorSplit slice, or a torch Subset of a Dataset.

    Returns the split itself in a single process.
    """
    w = world_size() if world is None else int(world)
    if w <= 1:
        return split
    idx = shard_range(len(split), batch_size, rank_, w)
    if hasattr(split, "images") and hasattr(split, "labels"):
        from csn.data.tensors import TensorSplit

        sl = slice(idx.start, idx.stop)
        return TensorSplit(split.images[sl], split.labels[sl], split.mean, split.std)
    from torch.utils.data import Subset

    return Subset(split, list(idx))


def _in_place(t: Tensor, collective) -> Tensor:
    """Apply a tensor collective in place; with the nccl backend a CPU tensor goes through a GPU copy."""
    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        tmp = t.to(torch.device("cuda", torch.cuda.current_device()))
        collective(tmp)
        t.copy_(tmp)
    else:
        collective(t)
    return t


def all_reduce_(t: Tensor) -> Tensor:
    """In-place sum across ranks (no-op in a single process); usable as collect_class_stats(reduce=...)."""
    if is_dist():
        _in_place(t, lambda x: dist.all_reduce(x, op=dist.ReduceOp.SUM))
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """In place, rank `src`'s values on every rank (no-op in a single process)."""
    if is_dist():
        _in_place(t, lambda x: dist.broadcast(x, src=src))
    return t


def broadcast_buffers_(model: torch.nn.Module, src: int = 0) -> torch.nn.Module:
    """Every rank's buffers (BatchNorm statistics) become rank `src`'s, in place (no-op in a single process).

    Used after BatchNorm re-estimation, which every rank runs on the same training batches:
    non-deterministic kernels could make the ranks' statistics differ in the last bits; after this,
    every rank scores its shard with one and the same model.
    """
    if is_dist():
        with torch.no_grad():
            for t in model.buffers():
                broadcast_(t.data, src)
    return model


class _AllReduceSum(torch.autograd.Function):
    """Sum across ranks whose backward sums the incoming gradients across ranks (every rank's output
    is the same sum, so d(sum of all ranks' losses)/d(input) is the sum of their output gradients)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # noqa: D102
        return all_reduce_(t.clone())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return all_reduce_(grad.clone())


def all_reduce_with_grad(t: Tensor) -> Tensor:
    """Out of place sum across ranks that autograd differentiates (the regularizer's class sums and
    counts); `t` itself in a single process.

    torch.distributed.nn.functional.all_reduce does the same but is deprecated (a FutureWarning in
    torch 2.13, pointing to a private module); this is its few lines on top of dist.all_reduce.
    """
    return _AllReduceSum.apply(t) if is_dist() else t


def all_reduce_tensors(tensors: Iterable[Tensor]) -> list[Tensor]:
    """Sum each tensor in place across ranks (every rank passes the same shapes, in the same order)."""
    out = list(tensors)
    for t in out:
        all_reduce_(t)
    return out


def reduce_class_stats(stats: Mapping[str, Any]) -> Mapping[str, Any]:
    """Sum every ClassStats (sums, sumsq, counts) across ranks in place; returns `stats`.

    Equivalent to collect_class_stats(..., reduce=all_reduce_). Every rank needs the same layers in
    the same order and a fixed num_classes (so the shapes agree).
    """
    for name in sorted(stats):
        all_reduce_tensors(stats[name].tensors())
    return stats


def reduce_cka(acc: Any) -> Any:
    """Sum a CKAAccumulator's HSIC terms and batch count across ranks in place; returns it."""
    all_reduce_tensors(acc.tensors())
    return acc


def reduce_ablation(df: Any) -> Any:
    """Sum an ablation_sweep frame over ranks (each rank scored its shard) and recompute top1/top5/loss.

    Rows must align across ranks (same plan, grid, orders, draws and seeds: they do, as the sweep is
    deterministic). Counts (correct, top-5 correct, total) are exact; the loss is a float sum.
    Returns a new frame on every rank (the frame itself in a single process).
    """
    if not is_dist():
        return df
    import numpy as np

    total = df["total"].to_numpy(np.float64)
    top5 = df["top5"].to_numpy(np.float64)
    has5 = ~np.isnan(top5)
    cols = np.stack([df["correct"].to_numpy(np.float64), np.where(has5, np.rint(top5 * total), 0.0),
                     df["loss"].to_numpy(np.float64) * total, total], axis=1)
    t = all_reduce_(torch.from_numpy(np.ascontiguousarray(cols))).numpy()
    out = df.copy()
    out["correct"] = np.rint(t[:, 0]).astype(np.int64)
    out["total"] = np.rint(t[:, 3]).astype(np.int64)
    out["top1"] = t[:, 0] / t[:, 3]
    out["top5"] = np.where(has5, t[:, 1] / t[:, 3], np.nan)
    out["loss"] = t[:, 2] / t[:, 3]
    return out


def reduce_linearity(acc: Any) -> Any:
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


# ------------------------------------------------------------------------------------------------
# rank 0 writes
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def main_lock(run_dir: Any, what: str) -> Iterator[None]:
    """The run's writer lock (csn.runs.run_lock) held by rank 0 alone, the only rank that writes.

    A busy lock (another csn process writing there) is raised on every rank. In a single process this
    is run_lock itself.
    """
    from csn.runs import run_lock

    with contextlib.ExitStack() as stack:
        with same_outcome():
            if is_main():
                stack.enter_context(run_lock(run_dir, what))
        yield


def on_main(fn, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) run on rank 0 alone, its (picklable) result handed to every rank.

    For the steps of an analysis that read or write the run's tables (what is left to do, appending
    rows): every rank then works on the same list, and an error on rank 0 is raised on every rank.
    In a single process: fn(*args, **kwargs).
    """
    if not is_dist():
        return fn(*args, **kwargs)
    out = None
    with same_outcome():
        if is_main():
            out = fn(*args, **kwargs)
    return broadcast_object(out)


# ------------------------------------------------------------------------------------------------
# ImageFolder-style datasets: torch DataLoader with worker processes
# ------------------------------------------------------------------------------------------------

class EpochSampler(DistributedSampler):
    """DistributedSampler (per-epoch shuffle from (seed, epoch), this rank's share) that can start mid-epoch.

    `set_epoch(epoch, start=k)` skips this rank's first k indices without loading them (exact resume
    of the order; random augmentation in workers is not replayed).
    """

    def __init__(self, dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int, drop_last: bool) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.start = int(start)

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def folder_loader(split, cfg, *, train: bool, device: torch.device):
    """A torch DataLoader with worker processes over a torchvision-style dataset.

    train=True: each rank loads its share of every global batch (batch_size / world size), in an
    order shuffled per epoch (DistributedSampler semantics, drop_last), resumable mid-epoch.
    train=False: the split as given, in order (pass a shard_split for this rank's part of it).
    """
    from torch.utils.data import DataLoader

    from csn.data.tensors import _mix

    w, r = world_size(), rank()
    pin = device.type == "cuda"
    if train:
        if cfg.batch_size % w:
            raise CsnError(f"global batch size {cfg.batch_size} is not divisible by the world size {w}; choose a multiple.")
        sampler = EpochSampler(split, num_replicas=w, rank=r, shuffle=True, seed=cfg.seed, drop_last=True)
        loader = DataLoader(split, batch_size=cfg.batch_size // w, sampler=sampler, num_workers=cfg.workers,
                            pin_memory=pin, drop_last=True, persistent_workers=cfg.workers > 0,
                            generator=torch.Generator().manual_seed(_mix(cfg.seed, r, 3)))
    else:
        loader = DataLoader(split, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.workers,
                            pin_memory=pin, drop_last=False)
    return _DeviceLoader(loader, device, cfg.channels_last and device.type != "mps")


class _DeviceLoader:
    """Moves DataLoader batches to the device; set_epoch reseeds the sampler's shuffle and sets where to start."""

    def __init__(self, loader, device: torch.device, channels_last: bool) -> None:
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.start_batch = 0
        self._len = len(loader)

    def __len__(self) -> int:
        """Batches in a whole epoch (also while an epoch is started mid-way)."""
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        sampler = self.loader.sampler
        if isinstance(sampler, EpochSampler):
            sampler.set_epoch(epoch, start=start_batch * self.loader.batch_size)
            self.start_batch = 0
        else:
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            self.start_batch = start_batch

    def __iter__(self):
        for i, (x, y) in enumerate(self.loader):
            if i < self.start_batch:
                continue
            x = x.to(self.device, non_blocking=True)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
        self.start_batch = 0
        if isinstance(self.loader.sampler, EpochSampler):
            self.loader.sampler.start = 0


__all__ = [
    "is_dist", "rank", "world_size", "local_rank", "is_main", "barrier", "init_from_env", "wrap_ddp",
    "has_batchnorm", "sync_batchnorm", "all_gather_objects", "broadcast_object", "same_outcome", "shard_range",
    "shard_split", "all_reduce_", "all_reduce_with_grad", "all_reduce_tensors", "broadcast_", "broadcast_buffers_", "reduce_class_stats",
    "reduce_cka", "reduce_ablation", "reduce_linearity", "main_lock", "on_main", "EpochSampler",
    "folder_loader",
]
