"""Generic torchrun collectives. Without torchrun everything is a single process.

PyTorch's own engine underneath (torch.distributed), nothing home-made, and nothing that knows an
analysis's data layout (each analysis reduces its own statistics with these):

- who am I: `is_dist`, `rank`, `world_size`, `local_rank`, `is_main`, `barrier`, `init_from_env`;
- failing together: `same_outcome()` runs a block on every rank and, if it raises on any rank,
  raises the same one-line CsnError on every rank (no rank is left waiting in a collective);
- sharding and reducing: `shard_range` (this rank's contiguous part of an evaluation split),
  `all_reduce_`/`all_reduce_tensors` (sums), `all_reduce_with_grad` (the regularizer's global-batch
  class sums, differentiable), `broadcast_`/`broadcast_buffers_`, `all_gather_objects`/`broadcast_object`;
- rank 0 writes: `main_only(cm)` enters a context manager (a run's writer lock) on rank 0 alone, and
  `on_main` runs a step (read a table, decide what is left to do, write rows) on rank 0 and hands its
  result to every rank; both fail on every rank together (`same_outcome`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

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


# ------------------------------------------------------------------------------------------------
# rank 0 writes
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def main_only(cm: contextlib.AbstractContextManager) -> Iterator[None]:
    """Enter the context manager `cm` on rank 0 alone (e.g. a run's writer lock: rank 0 is the only writer).

    An error entering it (a busy lock) is raised on every rank together. In a single process: `cm` itself.
    """
    with contextlib.ExitStack() as stack:
        with same_outcome():
            if is_main():
                stack.enter_context(cm)
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




GPU_SHARE_ENV = "CSN_GPU_MEMORY_SHARE"
"""Set by csn's runner in a worker that shares its GPU with other workers: the fraction of the GPU's memory the
worker's runs may hold (torch.cuda.set_per_process_memory_fraction), applied when a CUDA device is resolved."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> this rank's CUDA device when available (torchrun's LOCAL_RANK), else the CPU; or the named device.
    A CUDA device in a runner worker that shares its GPU gets the worker's memory share (GPU_SHARE_ENV)."""
    if name == "auto":
        device = torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise CsnError(f"unknown device {name!r}; use auto, cpu or cuda[:N].") from None
        _check_available(device)
    if device.type == "cuda" and (share := _gpu_share()) < 1.0:
        torch.cuda.set_per_process_memory_fraction(share, device)
    return device


def _gpu_share() -> float:
    """GPU_SHARE_ENV as a fraction in (0, 1] (1 when unset)."""
    text = os.environ.get(GPU_SHARE_ENV, "1")
    try:
        share = float(text)
    except ValueError:
        share = float("nan")
    if not 0.0 < share <= 1.0:
        raise CsnError(f"{GPU_SHARE_ENV}={text!r} is not a share of a GPU's memory in (0, 1]; unset it (csn's runner "
                       "sets it in its workers).")
    return share


def _check_available(device: torch.device) -> None:
    """Refuse a device this machine does not have (before anything is allocated on it)."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise CsnError(f"device {str(device)!r} is not available ({why}); use --device cpu or auto.")
        if device.index is not None and device.index >= count:
            raise CsnError(f"device {str(device)!r} does not exist: this machine has {count} GPU(s), cuda:0 to "
                           f"cuda:{count - 1}; use one of those or --device auto.")
    elif device.type != "cpu":
        backend = getattr(torch.backends, device.type, None) if device.type == "mps" else getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise CsnError(f"device {str(device)!r} is not available on this machine; use --device cpu or auto.")


__all__ = [
    "is_dist", "rank", "world_size", "local_rank", "is_main", "barrier", "init_from_env", "all_gather_objects",
    "broadcast_object", "same_outcome", "shard_range", "all_reduce_", "all_reduce_with_grad", "all_reduce_tensors",
    "broadcast_", "broadcast_buffers_", "main_only", "on_main", "resolve_device", "GPU_SHARE_ENV",
]
