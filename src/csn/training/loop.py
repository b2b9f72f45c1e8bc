"""The one training loop: SGD, lr schedule, dense checkpoints, optional selectivity regularizer, resume."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

import csn
from csn import distributed as dist_utils
from csn.data import BatchLoader
from csn.errors import CsnError
from csn.runs import (Checkpoint, Run, lock_holder, read_manifest, run_lock, save_tensors, write_json, write_manifest,
                      write_table)
from csn.training.config import TrainConfig, build_model_for, data_info, load_data
from csn.training.schedules import alpha_schedule, checkpoint_steps, lr_at

AUGMENT = {"none": {}, "flip": {"flip": True}, "crop": {"crop_pad": 2}, "crop+flip": {"crop_pad": 2, "flip": True},
           "cifar": {"crop_pad": 4, "flip": True}, "imagenet": {}}


def resolve_device(name: str) -> torch.device:
    """'auto' -> the local CUDA device when available, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_utils.local_rank())
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CsnError(f"unknown device {name!r}; use auto, cpu or cuda[:N].") from None


def make_loader(split, cfg: TrainConfig, *, train: bool, device: torch.device, epoch_seed: int = 0,
                shard: bool = False):
    """A loader over a split: in-memory BatchLoader for tensor datasets, torch DataLoader for ImageFolder.

    Training: every rank gets its slice of the same global batch. Evaluation: the whole split, or with
    shard=True (under torchrun) this rank's contiguous part of it, for statistics summed over ranks.
    """
    rank, world = dist_utils.rank(), dist_utils.world_size()
    if shard and not train and world > 1:
        split = dist_utils.shard_split(split)  # sums (correct, loss): one contiguous chunk of examples per rank
    if hasattr(split, "images"):
        if cfg.augment not in AUGMENT:
            from csn.errors import unknown
            raise unknown("augmentation", cfg.augment, AUGMENT)
        return BatchLoader(split, cfg.batch_size if train else cfg.eval_batch_size, shuffle=train, seed=cfg.seed,
                           augment=AUGMENT[cfg.augment] if train else None, drop_last=train, rank=rank if train else 0,
                           world_size=world if train else 1, device=device,
                           channels_last=cfg.channels_last and device.type != "mps")
    return dist_utils.folder_loader(split, cfg, train=train, device=device)


def evaluate(model: torch.nn.Module, loader, device: torch.device, *, amp: bool = False, max_samples: int | None = None,
             reduce: bool = False) -> dict:
    """Top-1 accuracy and mean cross-entropy of a model over a loader, in eval mode.

    reduce=True (under torchrun, with each rank holding a shard of the split) sums the counts over
    ranks, so every rank gets the metrics of the whole split.
    """
    correct, loss, n = _eval_sums(model, loader, device, amp=amp, max_samples=max_samples, reduce=reduce)
    return {"test_acc": correct / max(n, 1), "test_loss": loss / max(n, 1)}


def _eval_sums(model: torch.nn.Module, loader, device: torch.device, *, amp: bool, max_samples: int | None,
               reduce: bool) -> tuple[int, float, int]:
    """(correct, summed cross-entropy, examples) over a loader in eval mode, optionally summed over ranks."""
    was = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        for x, y in loader:
            out = model(x).float()
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
            if max_samples and n >= max_samples:
                break
    model.train(was)
    if reduce and dist_utils.is_dist():
        t = dist_utils.all_reduce_(torch.tensor([correct, loss, n], dtype=torch.float64, device=device)).tolist()
        correct, loss, n = int(t[0]), t[1], int(t[2])
    return correct, loss, n


def _eval_subset(split, n: int | None, seed: int):
    """A fixed seeded subset of n examples of an evaluation split (the whole split if n is None or >= its size)."""
    if not n or n >= len(split):
        return split
    if hasattr(split, "subset"):
        return split.subset(n, seed=seed)
    from torch.utils.data import Subset

    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(split, idx.tolist())


def _state_file(step: int) -> str:
    return f"state-{step:08d}.safetensors"


def _weights_file(step: int) -> str:
    return f"step-{step:08d}.safetensors"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, (p, st) in enumerate((p, opt.state.get(p, {})) for g in opt.param_groups for p in g["params"]):
        if "momentum_buffer" in st and st["momentum_buffer"] is not None:
            out[f"momentum.{i}"] = st["momentum_buffer"]
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        buf = tensors.get(f"momentum.{i}")
        if buf is not None:
            opt.state[p]["momentum_buffer"] = buf.to(device=p.device, dtype=p.dtype).clone()


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, force: bool = False, progress: bool = True,
          stop_after_step: int | None = None) -> Run:
    """Train `cfg` into run directory `out`; with resume=True continue from its last checkpoint.

    Writes checkpoints at the schedule's steps (weights + optimizer state, safetensors), the manifest,
    tables/training.parquet, and run.json. `stop_after_step` ends early (tests of resume).
    """
    out = Path(out)
    main = dist_utils.is_main()
    with contextlib.ExitStack() as stack:
        with dist_utils.same_outcome():  # under torchrun: rank 0 checks and locks; every rank fails together
            _prepare_dir(cfg, out, resume=resume, force=force)
            if main:
                stack.enter_context(run_lock(out, "train"))
                for debris in out.glob(".run.json.*.tmp"):  # a run killed while writing its first file
                    debris.unlink(missing_ok=True)
        return _train(cfg, out, resume=resume, progress=progress, stop_after_step=stop_after_step)


def _train(cfg: TrainConfig, out: Path, *, resume: bool, progress: bool, stop_after_step: int | None) -> Run:
    main = dist_utils.is_main()
    distributed = dist_utils.is_dist()

    # Set-up: a CsnError on any rank (bad data root, missing torchvision, missing optimizer state ...)
    # is raised on every rank before the first collective of training, so no rank is left waiting.
    with dist_utils.same_outcome():
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        data = load_data(cfg)
        info = data_info(data)
        torch.manual_seed(cfg.seed)
        model = build_model_for(cfg, info).to(device)
        model, bn_mode = dist_utils.sync_batchnorm(model, device, cfg.sync_bn)
        if cfg.channels_last and device.type != "mps":
            model = model.to(memory_format=torch.channels_last)

        train_loader = make_loader(data.train, cfg, train=True, device=device)
        test_loader = make_loader(data.test, cfg, train=False, device=device, shard=distributed)
        # Intermediate checkpoints may be scored on a fixed seeded subset (eval_samples); the final one on the whole split.
        sub_loader = test_loader
        sub_split = _eval_subset(data.test, cfg.eval_samples, seed=2024)
        if sub_split is not data.test:
            sub_loader = make_loader(sub_split, cfg, train=False, device=device, shard=distributed)
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise CsnError(f"the training split ({len(data.train)} examples) is smaller than one batch ({cfg.batch_size}); lower batch_size.")
        total = int(round(cfg.epochs * steps_per_epoch))
        ckpt_steps = checkpoint_steps(cfg.checkpoints, steps_per_epoch, cfg.epochs)
        alphas = alpha_schedule(cfg.reg_schedule, cfg.reg_alpha, cfg.reg_window)
        alphas.validate(cfg.epochs)
        reg = None
        if not alphas.is_zero:
            from csn.training.regularizer import SelectivityRegularizer
            reg = SelectivityRegularizer(model, cfg.reg_layers, num_classes=info["num_classes"])

        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=cfg.nesterov)

        step, logs = 0, []
        ckpt_dir = out / "checkpoints"
        manifest = read_manifest(ckpt_dir) if resume else []
        if manifest:
            last = manifest[-1]
            run = Run(out)
            model.load_state_dict(run.load_state(last))
            state_path = ckpt_dir / _state_file(last.step)
            if last.step > 0:
                if not state_path.is_file():
                    raise CsnError(f"optimizer state {state_path} is missing, so the run cannot resume exactly; restart it with --force.")
                try:
                    state = load_file(str(state_path))
                except Exception as e:  # written atomically, so only damage after the fact gets here
                    raise CsnError(f"optimizer state {state_path} cannot be read ({type(e).__name__}), so the run cannot "
                                   "resume exactly; restart it with --force.") from None
                _load_optimizer_tensors(opt, state)
            step = last.step
            old = run.read("training")
            if old is not None:
                logs = old[old["step"] <= step].to_dict("records")
        if main:  # refuse before the first write when the checkpoints still to come cannot fit the disk
            from csn.resources import check_disk_space, state_dict_bytes

            todo = [s for s in ckpt_steps if s > step or (s == 0 and not manifest)]
            weights, momentum = state_dict_bytes(model.state_dict()), state_dict_bytes(list(model.parameters()))
            # every checkpoint's weights, plus the newest optimizer state twice (the old one is deleted after the new)
            check_disk_space(out, len(todo) * weights + (2 * momentum if cfg.momentum else 0),
                             what=f"{len(todo)} checkpoints of {weights / 1e6:.3g} MB each and the optimizer state",
                             fix="free some space, pass --out on a larger disk, or use a sparser --checkpoints schedule")
    # DDP broadcasts rank 0's parameters and buffers (identical anyway: same seed or same checkpoint).
    ddp_model = dist_utils.wrap_ddp(model, device)
    if main:
        if bn_mode == "per-rank" and cfg.sync_bn:
            print(f"note: SyncBatchNorm needs GPUs; on {device.type} each of the {dist_utils.world_size()} processes "
                  f"normalizes with the BatchNorm statistics of its own {cfg.batch_size // dist_utils.world_size()} "
                  f"examples, so training differs slightly from one process with batch {cfg.batch_size}.",
                  file=sys.stderr)
        write_json(out / "run.json", _run_json(cfg, info, device, steps_per_epoch, total, ckpt_steps, bn_mode))

    def save_checkpoint(step: int, train_metrics: dict) -> None:
        loader = test_loader if step == total else sub_loader
        # Under torchrun every rank scores its shard of the split; the sums are reduced over ranks.
        correct, loss_sum, n = _eval_sums(model, loader, device, amp=cfg.amp, max_samples=None, reduce=True)
        metrics = {"test_acc": correct / max(n, 1), "test_loss": loss_sum / max(n, 1), "test_samples": n}
        metrics.update(train_metrics)
        with dist_utils.same_outcome():  # rank 0 writes; a failed write stops every rank
            if main:
                _write_checkpoint(step, metrics)

    def _write_checkpoint(step: int, metrics: dict) -> None:
        digest = save_tensors(ckpt_dir / _weights_file(step), model.state_dict(),
                              metadata={"step": str(step)})
        if step > 0:
            save_tensors(ckpt_dir / _state_file(step), _optimizer_tensors(opt), metadata={"step": str(step)})
        entries = [c for c in manifest if c.step != step] + [Checkpoint(step, step / steps_per_epoch, _weights_file(step), digest, metrics)]
        manifest[:] = sorted(entries, key=lambda c: c.step)
        write_table(out / "tables" / "training.parquet", pd.DataFrame(logs, columns=LOG_COLUMNS))
        write_manifest(ckpt_dir, manifest)
        for old_state in ckpt_dir.glob("state-*.safetensors"):  # keep only the newest optimizer state
            if old_state.name != _state_file(step):
                old_state.unlink(missing_ok=True)

    ckpt_set = set(ckpt_steps)
    if step == 0 and not manifest:
        save_checkpoint(0, {})
    bar = tqdm(total=total, initial=step, desc=f"train {out.name}", disable=not (progress and main), unit="step",
               dynamic_ncols=True)
    model.train()
    # Window statistics stay on the device (no host sync per step): [sum of loss * n, correct], sum of R.
    window = torch.zeros(2, dtype=torch.float64, device=device)
    window_reg, window_n, n_reg = torch.zeros((), dtype=torch.float64, device=device), 0, 0
    t0 = time.perf_counter()
    try:
        while step < total:
            epoch = step // steps_per_epoch
            train_loader.set_epoch(epoch, start_batch=step - epoch * steps_per_epoch)
            for x, y in train_loader:
                lr = lr_at(step, total, steps_per_epoch, cfg.lr, cfg.lr_schedule, milestones=cfg.milestones,
                           gamma=cfg.gamma, warmup_epochs=cfg.warmup_epochs)
                for g in opt.param_groups:
                    g["lr"] = lr
                alpha = alphas.alpha_at(step / steps_per_epoch)
                use_reg = reg is not None and alpha != 0.0
                if use_reg:
                    reg.attach()
                elif reg is not None:
                    reg.detach()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
                    logits = ddp_model(x)
                    loss = F.cross_entropy(logits.float(), y)
                    r = reg.value(y) if use_reg else None
                total_loss = loss - alpha * r if r is not None else loss
                opt.zero_grad(set_to_none=True)
                total_loss.backward()
                opt.step()
                step += 1
                with torch.no_grad():
                    window[0] += loss.detach().double() * len(y)
                    window[1] += (logits.argmax(1) == y).sum()
                    window_n += len(y)
                    if r is not None:
                        window_reg += r.detach().double()
                        n_reg += 1
                if step % cfg.log_every == 0 or step in ckpt_set or step == total:
                    # Under torchrun the window is summed over ranks: loss and accuracy of the global batches.
                    sums = torch.cat([window, window.new_tensor([window_n])]) if distributed else window
                    w_loss, w_correct, w_n = (dist_utils.all_reduce_(sums).tolist() + [window_n])[:3]
                    train_loss = w_loss / w_n
                    if not math.isfinite(train_loss):
                        raise CsnError(f"training diverged by step {step} (mean loss {train_loss} over the last "
                                       f"{cfg.log_every} steps or fewer); lower the learning rate or alpha.")
                    logs.append({"step": step, "epoch": step / steps_per_epoch, "lr": lr, "alpha": alpha,
                                 "train_loss": train_loss, "train_acc": w_correct / w_n,
                                 "reg_value": (float(window_reg) / n_reg) if n_reg else float("nan"),
                                 "reg_skipped": reg.skipped if reg is not None else 0,
                                 "time_s": time.perf_counter() - t0})
                    bar.set_postfix(loss=f"{logs[-1]['train_loss']:.3f}", acc=f"{logs[-1]['train_acc']:.3f}", refresh=False)
                    window.zero_()
                    window_reg.zero_()
                    window_n, n_reg = 0, 0
                bar.update(1)
                if step in ckpt_set:
                    last_log = logs[-1]
                    save_checkpoint(step, {"train_loss": last_log["train_loss"], "train_acc": last_log["train_acc"]})
                if step >= total or (stop_after_step is not None and step >= stop_after_step):
                    break
            if stop_after_step is not None and step >= stop_after_step:
                break
    finally:
        bar.close()
        if reg is not None:
            reg.detach()
    return Run(out)


LOG_COLUMNS = ["step", "epoch", "lr", "alpha", "train_loss", "train_acc", "reg_value", "reg_skipped", "time_s"]


def _prepare_dir(cfg: TrainConfig, out: Path, *, resume: bool, force: bool) -> None:
    """Refuse to overwrite a run unless --force; on --resume refuse a different config, showing the difference."""
    if not dist_utils.is_main():
        return
    # A run killed before it wrote run.json leaves only its lock file (and maybe run.json's temporary file):
    # that is not "an existing directory", so the same command, --resume or --force all start it afresh.
    exists = out.exists() and any(not _is_debris(p) for p in out.iterdir())
    if resume:
        if not (out / "run.json").is_file():
            if exists:
                raise CsnError(f"{out} is not a csn run (no run.json); choose another --out or use --force to start over.")
            return
        info = Run(out).info  # a corrupt run.json is reported by name
        old = TrainConfig.from_dict(info["config"])
        diff = old.diff(cfg)
        if diff:
            shown = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise CsnError(f"cannot resume {out} with a different configuration ({shown}); resume with the same settings or start a new run.")
        old_world = info.get("world_size", 1)
        if old_world != dist_utils.world_size():
            raise CsnError(f"{out} was trained with world size {old_world} and is resumed with {dist_utils.world_size()}; resume with the same number of processes.")
        return
    if exists:
        if not force:
            raise CsnError(f"{out} already exists; pass --resume to continue it or --force to overwrite it.")
        if not (out / "run.json").is_file():
            raise CsnError(f"{out} exists and is not a csn run; refusing to delete it even with --force, choose another --out.")
    if out.exists():
        holder = lock_holder(out)
        if holder:
            raise CsnError(f"another csn process is writing in {out} (pid {holder}); wait for it to finish or stop it "
                           "before starting this run afresh.")
        if exists:
            _delete_run(out)
        else:
            for p in out.iterdir():
                p.unlink(missing_ok=True)  # only debris of a run killed before its first file
    out.mkdir(parents=True, exist_ok=True)


def _delete_run(out: Path) -> None:
    """Delete a run for --force so that a kill part-way leaves a state that is still recoverable: its results
    first (tables, then the manifest), run.json last (so `--force` still recognises the run and finishes)."""
    shutil.rmtree(out / "tables", ignore_errors=True)
    (out / "checkpoints" / "manifest.jsonl").unlink(missing_ok=True)
    for child in out.iterdir():
        if child.name != "run.json":
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    shutil.rmtree(out)


def _is_debris(p: Path) -> bool:
    """A file csn itself leaves in a run directory killed before its first complete write."""
    return p.name == ".lock" or (p.name.startswith(".run.json.") and p.name.endswith(".tmp"))


def _run_json(cfg: TrainConfig, info: dict, device: torch.device, spe: int, total: int, ckpts: list[int],
              bn_mode: str = "none") -> dict:
    out = {"config": cfg.to_dict(), "data": info, "seed": cfg.seed, "csn_version": csn.__version__,
           "torch_version": torch.__version__, "python": platform.python_version(), "device": str(device),
           "world_size": dist_utils.world_size(), "steps_per_epoch": spe, "total_steps": total,
           "checkpoint_steps": ckpts, "host": platform.node(), "pid": os.getpid()}
    if dist_utils.is_dist():
        import torch.distributed as dist

        out["ddp"] = {"backend": str(dist.get_backend()), "per_rank_batch": cfg.batch_size // dist_utils.world_size(),
                      "batchnorm": bn_mode, "evaluation": "sharded over ranks, counts all-reduced"}
    return out
