"""The one training loop: SGD or AdamW, lr schedule, dense checkpoints, interventions (the selectivity regularizer,
stage rewinds: csn.training.interventions), resume.

`train(cfg, out)` reads top to bottom as its steps: prepare the run directory, set up data, model and
optimizer (`_Training.__init__`), restore the last checkpoint when resuming, check the disk, then for
every batch one optimizer step (the interventions' hooks around it), a log line every `log_every` steps and a
checkpoint at each scheduled step. Resumed runs give bitwise the same checkpoints as uninterrupted ones on CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from csn import dist
from csn._version import __version__
from csn.core.checkpoint_schedule import checkpoint_steps, total_steps
from csn.core.lr import lr_at
from csn.core.progress import bar
from csn.core.resources import check_disk_space, check_limit, env_limit, state_dict_bytes
from csn.data import BatchLoader
from csn.data.loaders import folder_loader, in_memory, shard_split, subset
from csn.errors import CsnError, unknown
from csn.runs.config import TrainConfig, build_model_for, data_info, is_preset_checkpoints, load_data
from csn.runs.io import load_tensors, save_tensors, write_json, write_table
from csn.runs.lock import lock_holder, run_lock
from csn.runs.naming import STATE_GLOB, state_file, weights_file
from csn.runs.run import Checkpoint, Run, check_run_path, delete_run_files, load_weights, read_manifest, write_manifest
from csn.runs.table import TableSpec
from csn.runs.trackers import TRAIN, Tracker, open_tracker
from csn.training.ddp import sync_batchnorm, wrap_ddp
from csn.training.interventions import LOG_DEFAULTS, Context, Intervention, build_interventions

AUGMENT = {"none": {}, "flip": {"flip": True}, "crop": {"crop_pad": 2}, "crop+flip": {"crop_pad": 2, "flip": True},
           "cifar": {"crop_pad": 4, "flip": True}, "imagenet": {}}
TRAINING = TableSpec(
    "training", {"step": "int64", "epoch": "float64", "lr": "float64", "alpha": "float64", "train_loss": "float64",
                 "train_acc": "float64", "reg_value": "float64", "reg_skipped": "int64", "time_s": "float64"},
    key=("step",), fix="restore it from a backup or re-run the training (`csn train --force`, bitwise the same on CPU)")
"""tables/training.parquet: one line per logged step (loss and accuracy averaged since the previous line)."""
LOG_COLUMNS = list(TRAINING.columns)
MAX_MODEL_ENV = "CSN_MAX_MODEL_GB"
DEFAULT_MAX_MODEL_GB = 16.0
EVAL_SUBSET_SEED = 2024
"""Seed of the fixed test subset that intermediate checkpoints are scored on (eval_samples)."""


# ------------------------------------------------------------------------------------------------
# loaders and evaluation
# ------------------------------------------------------------------------------------------------

def make_loader(split, cfg: TrainConfig, *, train: bool, device: torch.device, shard: bool = False):
    """A loader over a split: in-memory BatchLoader for tensor datasets, torch DataLoader for ImageFolder.

    Training: every rank gets its slice of the same global batch. Evaluation: the whole split, or with
    shard=True (under torchrun) this rank's contiguous part of it, for statistics summed over ranks.
    """
    rank, world = dist.rank(), dist.world_size()
    if shard and not train and world > 1:
        split = shard_split(split)  # sums (correct, loss): one contiguous chunk of examples per rank
    if in_memory(split):
        if cfg.augment not in AUGMENT:
            raise unknown("augmentation", cfg.augment, AUGMENT)
        return BatchLoader(split, cfg.batch_size if train else cfg.eval_batch_size, shuffle=train, seed=cfg.seed,
                           augment=AUGMENT[cfg.augment] if train else None, drop_last=train, rank=rank if train else 0,
                           world_size=world if train else 1, device=device,
                           channels_last=cfg.channels_last and device.type != "mps")
    return folder_loader(split, batch_size=cfg.batch_size if train else cfg.eval_batch_size, train=train, device=device,
                         seed=cfg.seed, workers=cfg.workers, channels_last=cfg.channels_last)


def _steps_per_epoch(loader, data, cfg: TrainConfig) -> int:
    """The training loader's length; a training split smaller than one batch is a CsnError."""
    if len(loader) == 0:
        raise CsnError(f"the training split ({len(data.train)} examples) is smaller than one batch ({cfg.batch_size}); "
                       "lower batch_size.")
    return len(loader)


def training_length(cfg: TrainConfig, data=None) -> tuple[int, int]:
    """(steps per epoch, total steps) that a training of `cfg` takes, its data (loaded here unless given) read as
    the training loop reads it: for plans made before training (reproduce, the windows experiment)."""
    data = load_data(cfg) if data is None else data
    spe = _steps_per_epoch(make_loader(data.train, cfg, train=True, device=torch.device("cpu")), data, cfg)
    return spe, total_steps(spe, cfg.epochs)


def eval_sums(model: torch.nn.Module, loader, device: torch.device, *, amp: bool, max_samples: int | None,
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
    if reduce and dist.is_dist():
        t = dist.all_reduce_(torch.tensor([correct, loss, n], dtype=torch.float64, device=device)).tolist()
        correct, loss, n = int(t[0]), t[1], int(t[2])
    return correct, loss, n


# ------------------------------------------------------------------------------------------------
# checkpoint files
# ------------------------------------------------------------------------------------------------

OPTIMIZER_STATE = {"sgd": {"momentum": "momentum_buffer"}, "adamw": {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq",
                                                                     "step": "step"}}
"""Per optimizer: the name of each per-parameter state tensor in a state file ('momentum.3') -> torch's state key."""


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The config's optimizer over `params` (its lr is set per step from the schedule)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def _optimizer_tensors(opt: torch.optim.Optimizer, kind: str) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in enumerate(opt.state.get(p, {}) for g in opt.param_groups for p in g["params"]):
        for name, key in OPTIMIZER_STATE[kind].items():
            if st.get(key) is not None:
                out[f"{name}.{i}"] = st[key]
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, kind: str, tensors: dict[str, torch.Tensor], what: str,
                            fix: str) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    names = {f"{name}.{i}": (p, key) for i, p in enumerate(params) for name, key in OPTIMIZER_STATE[kind].items()}
    for name, buf in tensors.items():
        p, key = names.get(name, (None, None))
        shape = () if key == "step" else None if p is None else tuple(p.shape)
        if p is None or tuple(buf.shape) != shape:
            where = "" if p is None else f" of shape {list(buf.shape)} where it should be {list(shape)}"
            raise CsnError(f"{what} holds {name}{where}: it does not fit the model and optimizer; {fix}")
    for name, (p, key) in names.items():
        if name in tensors:  # AdamW keeps its step count in float32 on the CPU (unless capturable/fused)
            dtype, device = (torch.float32, torch.device("cpu")) if key == "step" else (p.dtype, p.device)
            opt.state[p][key] = tensors[name].to(device=device, dtype=dtype).clone()


def _check_model_size(cfg: TrainConfig, info: dict) -> None:
    """Refuse a model whose training state cannot reasonably fit, before allocating it: the model is built on
    the meta device (no memory) and its weights, gradients and momentum (3 x 4 bytes a parameter) are
    bounded by $CSN_MAX_MODEL_GB (default 16)."""
    with torch.device("meta"):
        skeleton = build_model_for(cfg, info)
    n = sum(t.numel() for t in skeleton.state_dict().values())
    check_limit(12 * n, env_limit(MAX_MODEL_ENV, DEFAULT_MAX_MODEL_GB, example="e.g. 64") * 1e9,
                what=f"training model {cfg.model!r} at width {cfg.width:g} ({n:,} parameters and buffers: weights, "
                     "gradients and momentum)",
                raise_it=f"lower width, or set {MAX_MODEL_ENV} to raise it")


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, force: bool = False, progress: bool = True,
          stop_after_step: int | None = None) -> Run:
    """Train `cfg` into run directory `out`; with resume=True continue from its last checkpoint.

    Writes checkpoints at the schedule's steps (weights + optimizer state, safetensors), the manifest,
    tables/training.parquet, and run.json. `stop_after_step` ends early (tests of resume).
    """
    out = Path(out)
    # 1. Checks that touch nothing; 2. set-up (data, model, optimizer, schedules): a bad request fails in
    # these two steps, before any file is written or deleted, so it leaves no run directory behind (and
    # --force deletes nothing). Under torchrun rank 0 checks and every rank fails together.
    with dist.same_outcome():
        _check_out(cfg, out, resume=resume, force=force)
    with dist.same_outcome():
        t = _Training(cfg, out)
    # 3. The run directory (--force: the old run's files deleted) and its writer lock; then the last checkpoint
    # restored (--resume) and the disk checked. A fresh run that stops before its first checkpoint is complete
    # removes what it wrote (and the folder, if it made it).
    made = [p for p in (out, *out.parents) if not p.exists()] if dist.is_main() else []  # folders this call makes
    try:
        with contextlib.ExitStack() as stack:
            with dist.same_outcome():
                _prepare_dir(cfg, out, resume=resume, force=force)
                if dist.is_main():
                    stack.enter_context(run_lock(out, "train"))
                    for debris in out.glob(".run.json.*.tmp"):  # a run killed while writing its first file
                        debris.unlink(missing_ok=True)
            fresh = not (out / "run.json").is_file()
            with dist.same_outcome():
                t.open(resume=resume)
            try:
                t.start()
            except BaseException:
                t.close_tracker()
                if dist.is_main() and fresh and not read_manifest(t.ckpt_dir):
                    delete_run_files(out)
                raise
            try:
                t.run(progress=progress, stop_after_step=stop_after_step)
            finally:
                t.close_tracker()
    except BaseException:
        for folder in made:  # innermost first; a folder something else wrote into stays
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return Run(out)


class _Training:
    """The state of one training run and its steps (set-up, restore, one step, log, checkpoint)."""

    def __init__(self, cfg: TrainConfig, out: Path) -> None:
        """Set up data, model, optimizer and schedules; reads and writes nothing in `out`."""
        self.cfg, self.out, self.main = cfg, out, dist.is_main()
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self.device = device = dist.resolve_device(cfg.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self._setup_data()
        _check_model_size(cfg, self.info)
        torch.manual_seed(cfg.seed)
        model = build_model_for(cfg, self.info).to(device)
        self.model, self.bn_mode = sync_batchnorm(model, device, cfg.sync_bn)
        if cfg.channels_last and device.type != "mps":
            self.model = self.model.to(memory_format=torch.channels_last)
        self._setup_schedules()
        self.opt = make_optimizer(cfg, self.model.parameters())
        self.interventions: list[Intervention] = build_interventions(cfg, Context(
            self.model, self.opt, cfg, self.info["num_classes"], self.steps_per_epoch, self.total, out, device))
        self.ckpt_steps = sorted(set(self.ckpt_steps).union(*(i.checkpoint_steps() for i in self.interventions)))
        self.step, self.logs = 0, []
        self.ckpt_dir = out / "checkpoints"
        self.manifest: list[Checkpoint] = []
        self.tracker: Tracker | None = None

    def open(self, *, resume: bool) -> None:
        """With resume, restore the last checkpoint of the run directory; then check the disk (rank 0)."""
        self.manifest = read_manifest(self.ckpt_dir) if resume else []
        if self.manifest:
            self._restore()
        if self.main:
            self._check_disk()

    def _setup_data(self) -> None:
        cfg, device, sharded = self.cfg, self.device, dist.is_dist()
        self.data = data = load_data(cfg)
        self.info = data_info(data)
        self.train_loader = make_loader(data.train, cfg, train=True, device=device)
        self.test_loader = make_loader(data.test, cfg, train=False, device=device, shard=sharded)
        # Intermediate checkpoints may be scored on a fixed seeded subset (eval_samples); the final one on the whole split.
        self.sub_loader = self.test_loader
        sub_split = subset(data.test, cfg.eval_samples, seed=EVAL_SUBSET_SEED)
        if sub_split is not data.test:
            self.sub_loader = make_loader(sub_split, cfg, train=False, device=device, shard=sharded)
        self.steps_per_epoch = _steps_per_epoch(self.train_loader, data, cfg)

    def _setup_schedules(self) -> None:
        cfg = self.cfg
        self.total = int(round(cfg.epochs * self.steps_per_epoch))
        # a preset's schedule fits a shortened training (points past the end dropped, with a note); the user's must fit
        self.ckpt_steps = checkpoint_steps(cfg.checkpoints, self.steps_per_epoch, cfg.epochs,
                                           clip=True if is_preset_checkpoints(cfg.checkpoints) else None,
                                           note=lambda m: print(m, file=sys.stderr) if self.main else None)
        lr_at(0, max(self.total, 1), self.steps_per_epoch, cfg.lr, cfg.lr_schedule, milestones=cfg.milestones,
              gamma=cfg.gamma, warmup_epochs=cfg.warmup_epochs)  # the schedule is checked before training starts

    def _restore(self) -> None:
        """Weights, momentum and logs of the last checkpoint (exact resume)."""
        last = self.manifest[-1]
        run = Run(self.out)
        fix = "the run cannot resume exactly: restart it with --force (bitwise the same on CPU)."
        load_weights(self.model, run.load_state(last), f"checkpoint {self.ckpt_dir / last.file} (step {last.step})", fix)
        if last.step > 0:
            path = self.ckpt_dir / state_file(last.step)
            state = load_tensors(path, what="optimizer state", fix=fix)
            _load_optimizer_tensors(self.opt, self.cfg.optimizer, state, f"optimizer state {path}", fix)
        self.step = last.step
        old = run.read("training")
        if old is not None:
            self.logs = old[old["step"] <= self.step].to_dict("records")

    def _check_disk(self) -> None:
        """Refuse before the first write when the checkpoints still to come cannot fit the disk."""
        todo = [s for s in self.ckpt_steps if s > self.step or (s == 0 and not self.manifest)]
        weights = state_dict_bytes(self.model.state_dict())
        # the optimizer's state per parameter: SGD's momentum (if any) or AdamW's two moments
        state = state_dict_bytes(list(self.model.parameters())) * (
            2 if self.cfg.optimizer == "adamw" else 1 if self.cfg.momentum else 0)
        # every checkpoint's weights, plus the newest optimizer state twice (the old one is deleted after the new)
        check_disk_space(self.out, len(todo) * weights + 2 * state,
                         what=f"{len(todo)} checkpoints of {weights / 1e6:.3g} MB each and the optimizer state",
                         fix="free some space, pass --out on a larger disk, or use a sparser --checkpoints schedule")

    def start(self) -> None:
        """Wrap the model for DDP, write run.json, save the step-0 checkpoint of a fresh run."""
        cfg = self.cfg
        # DDP broadcasts rank 0's parameters and buffers (identical anyway: same seed or same checkpoint).
        self.ddp_model = wrap_ddp(self.model, self.device)
        if self.main:
            if self.bn_mode == "per-rank" and cfg.sync_bn:
                print(f"note: SyncBatchNorm needs GPUs; on {self.device.type} each of the {dist.world_size()} processes "
                      f"normalizes with the BatchNorm statistics of its own {cfg.batch_size // dist.world_size()} "
                      f"examples, so training differs slightly from one process with batch {cfg.batch_size}.",
                      file=sys.stderr)
            write_json(self.out / "run.json", self._run_json())
        # the dashboard (cfg.tracker, rank 0): a resumed run appends from its last checkpoint's step
        self.tracker = open_tracker(cfg.tracker, self.out, cfg.to_dict(), TRAIN, self.step)
        if self.step == 0 and not self.manifest:
            self.save_checkpoint(0, {})

    def run(self, *, progress: bool, stop_after_step: int | None) -> None:
        """Train from the current step to the end (or to stop_after_step)."""
        spe, ckpt_set = self.steps_per_epoch, set(self.ckpt_steps)
        pbar = bar(total=self.total, initial=self.step, desc=f"train {self.out.name}", progress=progress and self.main,
                   unit="step", dynamic_ncols=True)
        self.model.train()
        # Window statistics stay on the device (no host sync per step): [sum of loss * n, correct].
        self.window = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.window_n = 0
        self.t0 = time.perf_counter()
        try:
            while self.step < self.total:
                epoch = self.step // spe
                self.train_loader.set_epoch(epoch, start_batch=self.step - epoch * spe)
                for x, y in self.train_loader:
                    lr = self._train_step(x, y)
                    if self.step % self.cfg.log_every == 0 or self.step in ckpt_set or self.step == self.total:
                        self._log(lr)
                        pbar.set_postfix(loss=f"{self.logs[-1]['train_loss']:.3f}",
                                         acc=f"{self.logs[-1]['train_acc']:.3f}", refresh=False)
                    pbar.update(1)
                    if self.step in ckpt_set:
                        last = self.logs[-1]
                        self.save_checkpoint(self.step, {"train_loss": last["train_loss"], "train_acc": last["train_acc"]})
                    if self.step >= self.total or (stop_after_step is not None and self.step >= stop_after_step):
                        break
                if stop_after_step is not None and self.step >= stop_after_step:
                    break
        finally:
            pbar.close()
            for intervention in self.interventions:
                intervention.close()

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on a batch, the interventions' hooks around it; returns the step's lr."""
        cfg, step, spe = self.cfg, self.step, self.steps_per_epoch
        lr = lr_at(step, self.total, spe, cfg.lr, cfg.lr_schedule, milestones=cfg.milestones, gamma=cfg.gamma,
                   warmup_epochs=cfg.warmup_epochs)
        for g in self.opt.param_groups:
            g["lr"] = lr
        for intervention in self.interventions:
            intervention.before_forward(step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp and self.device.type == "cuda"):
            logits = self.ddp_model(x)
            loss = F.cross_entropy(logits.float(), y)
            total_loss = loss
            for intervention in self.interventions:
                term = intervention.loss_term(y)
                if term is not None:
                    total_loss = total_loss + term
        self.opt.zero_grad(set_to_none=True)
        total_loss.backward()
        self.opt.step()
        self.step += 1
        with torch.no_grad():
            self.window[0] += loss.detach().double() * len(y)
            self.window[1] += (logits.argmax(1) == y).sum()
            self.window_n += len(y)
        for intervention in self.interventions:
            intervention.after_step(self.step)
        return lr

    def _log(self, lr: float) -> None:
        """A line of training.parquet: loss and accuracy averaged since the last line (global batches under DDP)."""
        w = self.window
        sums = torch.cat([w, w.new_tensor([self.window_n])]) if dist.is_dist() else w
        w_loss, w_correct, w_n = (dist.all_reduce_(sums).tolist() + [self.window_n])[:3]
        train_loss = w_loss / w_n
        if not math.isfinite(train_loss):
            raise CsnError(f"training diverged by step {self.step} (mean loss {train_loss} over the last "
                           f"{self.cfg.log_every} steps or fewer); lower the learning rate or alpha.")
        line = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "lr": lr, **LOG_DEFAULTS,
                "train_loss": train_loss, "train_acc": w_correct / w_n, "time_s": time.perf_counter() - self.t0}
        for intervention in self.interventions:
            line.update(intervention.log())
        self.logs.append(line)
        if self.tracker is not None:  # train/loss, train/acc, train/lr, train/alpha, train/reg_value, ...
            self.tracker.log(self.step, {f"train/{k.removeprefix('train_')}": v for k, v in line.items()
                                         if k not in ("step", "time_s")})
        w.zero_()
        self.window_n = 0

    def save_checkpoint(self, step: int, train_metrics: dict) -> None:
        """Score the model (every rank its shard), then rank 0 writes weights, optimizer state, logs, manifest."""
        loader = self.test_loader if step == self.total else self.sub_loader
        correct, loss_sum, n = eval_sums(self.model, loader, self.device, amp=self.cfg.amp, max_samples=None,
                                         reduce=True)
        metrics = {"test_acc": correct / max(n, 1), "test_loss": loss_sum / max(n, 1), "test_samples": n}
        metrics.update(train_metrics)
        with dist.same_outcome():  # rank 0 writes; a failed write stops every rank
            if self.main:
                self._write_checkpoint(step, metrics)

    def _write_checkpoint(self, step: int, metrics: dict) -> None:
        ckpt_dir = self.ckpt_dir
        digest = save_tensors(ckpt_dir / weights_file(step), self.model.state_dict(), metadata={"step": str(step)})
        if step > 0:
            save_tensors(ckpt_dir / state_file(step), _optimizer_tensors(self.opt, self.cfg.optimizer), metadata={"step": str(step)},
                         checksum=True)
        entry = Checkpoint(step, step / self.steps_per_epoch, weights_file(step), digest, metrics)
        self.manifest[:] = sorted([c for c in self.manifest if c.step != step] + [entry], key=lambda c: c.step)
        write_table(self.out / "tables" / "training.parquet", TRAINING.frame(pd.DataFrame(self.logs, columns=LOG_COLUMNS)))
        write_manifest(ckpt_dir, self.manifest)
        for old_state in ckpt_dir.glob(STATE_GLOB + "*"):  # keep only the newest optimizer state (+ checksum)
            if not old_state.name.startswith(state_file(step)):
                old_state.unlink(missing_ok=True)
        if self.tracker is not None:
            self.tracker.log(step, {"test/acc": metrics["test_acc"], "test/loss": metrics["test_loss"]})

    def close_tracker(self) -> None:
        """Flush and close the dashboard's files (once; rank 0)."""
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            tracker.close()

    def _run_json(self) -> dict:
        cfg = self.cfg
        out = {"config": cfg.to_dict(), "data": self.info, "seed": cfg.seed, "csn_version": __version__,
               "torch_version": torch.__version__, "python": platform.python_version(), "device": str(self.device),
               "world_size": dist.world_size(), "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total,
               "checkpoint_steps": self.ckpt_steps, "host": platform.node(), "pid": os.getpid()}
        if self.interventions:  # what each did, e.g. the regularizer's windows as optimizer steps [start, end)
            out["interventions"] = [{"kind": i.kind, **i.record()} for i in self.interventions]
        if dist.is_dist():
            import torch.distributed as tdist

            out["ddp"] = {"backend": str(tdist.get_backend()), "per_rank_batch": cfg.batch_size // dist.world_size(),
                          "batchnorm": self.bn_mode, "evaluation": "sharded over ranks, counts all-reduced"}
        return out


# ------------------------------------------------------------------------------------------------
# the run directory before training
# ------------------------------------------------------------------------------------------------

def _check_out(cfg: TrainConfig, out: Path, *, resume: bool, force: bool) -> bool:
    """Refuse a run directory that cannot be used (nothing is written or deleted): a path that cannot be a
    folder, an existing run without --resume/--force, a foreign folder, --force through a symbolic link,
    --resume with another configuration. Returns whether `out` holds a run that --force will delete."""
    if not dist.is_main():
        return False
    check_run_path(out, "--out")
    # A run killed before it wrote run.json leaves only its lock file (and maybe run.json's temporary file):
    # that is not "an existing directory", so the same command, --resume or --force all start it afresh.
    exists = out.is_dir() and any(not _is_debris(p) for p in out.iterdir())
    if resume:
        if not (out / "run.json").is_file():
            if exists:
                raise CsnError(f"{out} is not a csn run (no run.json); choose another --out or use --force to start over.")
            return False
        run = Run(out)  # a corrupt run.json is reported by name
        diff = run.config.diff(cfg, steps_per_epoch=run.info["steps_per_epoch"])
        if diff:
            shown = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise CsnError(f"cannot resume {out} with a different configuration ({shown}); resume with the same settings "
                           "or start a new run.")
        old_world = run.info.get("world_size", 1)
        if old_world != dist.world_size():
            raise CsnError(f"{out} was trained with world size {old_world} and is resumed with {dist.world_size()}; "
                           "resume with the same number of processes.")
        return False
    if exists:
        if not force:
            raise CsnError(f"{out} already exists; pass --resume to continue it or --force to overwrite it.")
        if not (out / "run.json").is_file():
            raise CsnError(f"{out} exists and is not a csn run; refusing to delete it even with --force, choose another --out.")
        if out.is_symlink():
            raise CsnError(f"{out} is a symbolic link (to {os.path.realpath(out)}); --force never deletes through a "
                           "link: pass the run directory itself as --out.")
    if out.exists():
        holder = lock_holder(out)
        if holder:
            raise CsnError(f"another csn process is writing in {out} (pid {holder}); wait for it to finish or stop it "
                           "before starting this run afresh.")
    return exists


def _prepare_dir(cfg: TrainConfig, out: Path, *, resume: bool, force: bool) -> None:
    """Check `out` (_check_out), then with --force delete the old run's files (only the files csn wrote,
    never through a symbolic link; a user's other files stay), and make the folder."""
    if not dist.is_main():
        return
    if _check_out(cfg, out, resume=resume, force=force):
        kept = delete_run_files(out)
        if kept:
            shown = ", ".join(str(p.relative_to(out)) for p in kept[:5]) + (", ..." if len(kept) > 5 else "")
            print(f"note: --force deleted the files csn wrote in {out} and kept {len(kept)} other file(s) there: {shown}",
                  file=sys.stderr)
    elif out.is_dir() and not resume:
        for p in out.iterdir():
            if _is_debris(p):
                p.unlink(missing_ok=True)  # only debris of a run killed before its first file
    out.mkdir(parents=True, exist_ok=True)


def _is_debris(p: Path) -> bool:
    """A file csn itself leaves in a run directory killed before its first complete write."""
    return p.name == ".lock" or (p.name.startswith(".run.json.") and p.name.endswith(".tmp"))


__all__ = ["train", "make_loader", "training_length", "eval_sums", "state_file", "weights_file", "AUGMENT", "LOG_COLUMNS"]
