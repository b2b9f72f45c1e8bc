"""The training configuration: one schema (TrainConfig), presets, `key=value` overrides, TOML/YAML files.

TrainConfig is what run.json records and `--resume` compares; every way of making one (a preset, a
config file, overrides, the Python API) goes through the same pydantic validation.
"""

from __future__ import annotations

import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, computed_field, model_validator

from csn.core import presets
from csn.core.checkpoint_schedule import checkpoint_steps
from csn.core.schema import CommaList, Float, Int, Schema, Seed, set_override
from csn.core.stats import EPS, STUDY_EPS, STUDY_GROUP
from csn.core.units import stages, stages_from_patterns
from csn.data import DataSplits, dataset_help, load_dataset
from csn.data.loaders import in_memory
from csn.data.validate import require_every_class
from csn.errors import CsnError
from csn.models import create_model, model_help
from csn.models.external import require_trust, trusting_code
from csn.runs.trackers import tracker_names

WHAT = "config key"
EXECUTION_KEYS = ("device", "threads", "workers", "tracker")
"""Keys that say how a run is executed and watched, not what it computes: resume and the experiments ignore them
when they compare a run's config with a request (TrainConfig.diff)."""


def _layer_spec(v: Any) -> Any:
    """layers: 'a.*,b.*' or ['a.*', 'b.*'] (one stage per pattern) or {stage: 'a,b' | [patterns]}."""
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    if isinstance(v, dict):
        return {k: ([p.strip() for p in x.split(",") if p.strip()] if isinstance(x, str) else x) for k, x in v.items()}
    return v


def _reg_group(v: Any) -> Any:
    """reg_group: 'batch', or a whole number of images >= 2 (also written as text, '32', or as 32.0)."""
    if v is None or v == "batch" and isinstance(v, str):
        return v
    n = v
    if isinstance(v, str):
        try:
            n = int(v)
        except ValueError:
            n = None
    elif isinstance(v, float) and v.is_integer():
        n = int(v)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError("expects 'batch' or a number of images per group >= 2 (the study's: 32)")
    return n


def _interventions(v: Any) -> Any:
    """interventions: a list of tables, each naming its kind (the kind's own keys are checked when training is set
    up, by csn.training.interventions, which this layer cannot import)."""
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, list):
        for i, entry in enumerate(v):
            if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
                raise ValueError(f"entry {i} must be a table with a 'kind' (e.g. {{kind = \"rewind\", ...}})")
    return v


RESOLVED = "reg_resolved"
"""The computed key of TrainConfig that records what the regularizer runs (recomputed when read back)."""


class TrainConfig(Schema):
    """Everything that defines a training run. Written to run.json; resume refuses a different one."""

    name: str = "run"
    # data
    dataset: str = Field("fashion-mnist", description=f"A dataset format: {dataset_help()} (idx, npz and imagefolder "
                         "read --data-root).")
    data_root: str | None = Field(None, description="Dataset directory (IDX files or ImageFolder) or .npz file.",
                                  json_schema_extra={"metavar": "DIR"})
    train_samples: Int | None = Field(None, ge=1)
    test_samples: Int | None = Field(None, ge=1)
    synthetic: dict[str, Any] = {}
    augment: str = "none"
    # model
    model: str = Field("resnet20", description=f"Model name ({model_help()}), 'package.module:factory' (any "
                       "importable nn.Module) or 'timm:NAME'.")
    width: Float = Field(1.0, gt=0)
    layers: Annotated[list[str] | dict[str, list[str]] | None, BeforeValidator(_layer_spec)] = Field(
        None, description="The model's read points as layer patterns: one stage per pattern ('layer1.*,layer2.*'), or "
        "a table {stage = [patterns]}; default: the model's declared read points (csn_stages).")
    # optimisation
    epochs: Float = Field(5.0, gt=0, description="Training length in epochs (fractions allowed).")
    batch_size: Int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (momentum, nesterov, weight_decay) or adamw "
                                             "(betas, decoupled weight_decay; for transformers).")
    lr: Float = Field(0.1, gt=0)
    momentum: Float = Field(0.9, ge=0, lt=1, description="SGD's momentum.")
    betas: Annotated[tuple[Float, Float], CommaList] = Field((0.9, 0.999), description="AdamW's betas.")
    weight_decay: Float = Field(5e-4, ge=0)
    nesterov: bool = False
    lr_schedule: str = "constant"
    milestones: Annotated[list[Int | Float], CommaList] = []
    gamma: Float = Field(0.1, gt=0)
    warmup_epochs: Float = Field(0.0, ge=0)
    seed: Seed = Field(0, description="Random seed (recorded in run.json).")
    # checkpoints and evaluation
    checkpoints: str = Field("0:1:0.125,1:3:0.25,3:end:1", description="Checkpoint schedule, e.g. "
                             "'steps:log2:256,1:end:1' or '0:1:0.125,1:3:0.25,3:end:1'.")
    eval_batch_size: Int = Field(500, ge=1)
    eval_samples: Int | None = Field(None, ge=1)
    log_every: Int = Field(10, ge=1)
    # selectivity regularizer: loss = ce - alpha * R
    reg_alpha: Float | None = Field(None, description="Selectivity regularizer strength (loss = ce - alpha*R; < 0 "
                                    "suppresses).")
    reg_window: str | None = Field(None, description="Window(s) START:END for --reg-alpha in epochs, steps (step=64), "
                                   "fractions (f0.1) or end, e.g. 5:end or step=0:step=64,1:2 (comma-separated).")
    reg_schedule: str | None = Field(None, description="Study-style alpha string, e.g. '0*5 -20*15' (alpha*epochs ...).")
    reg_layers: Annotated[list[str], CommaList] | None = Field(
        None, description="Layers to regularize (patterns); default every stage but the last.",
        json_schema_extra={"multiple": True})
    reg_mode: Literal["csn", "study"] = Field(
        "csn", description="Regularizer statistic: csn (class means over the global batch) or study (the study's: "
        "class sums in groups of 32 images per process, eps 1e-6).")
    reg_statistic: Literal["means", "sums"] | None = Field(
        None, description="Class means or class sums in the batch CSI [default: the mode's: csn means, study sums].")
    reg_group: Annotated[int | str | None, BeforeValidator(_reg_group)] = Field(
        None, description="batch (the global batch, all-reduced) or N >= 2: CSI within groups of N consecutive images "
        "of each process's batch, never all-reduced [default: the mode's: csn batch, study 32].",
        json_schema_extra={"metavar": "batch|N"})
    reg_reduce: Literal["mean", "sum"] = Field(
        "mean", description="R = mean over the regularized stages (the study's) or their sum (alpha in full per stage).")
    # other interventions (csn.training.interventions): [{kind = "rewind", stages = [...], at = ..., to = ...}, ...]
    interventions: Annotated[list[dict[str, Any]], BeforeValidator(_interventions)] = Field(
        [], description="Interventions besides the regularizer, each a table with its kind (e.g. rewind) and options.")
    # execution
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1.")
    channels_last: bool = True
    amp: bool = False
    sync_bn: bool = True  # under torchrun on GPUs: SyncBatchNorm, so BN sees the global batch as in one process
    threads: Int | None = Field(None, ge=1, description="CPU threads for torch.")
    workers: Int = Field(8, ge=0)
    tracker: Literal[tuple(tracker_names())] = Field(  # type: ignore[valid-type] - 'none' and the registered trackers
        "none", description="Also log training and analyses to a dashboard (files under RUN/tracker/; pip install "
        "'csn[tensorboard]' or 'csn[wandb]'). Not part of the run's identity.")

    @classmethod
    def from_dict(cls, d: typing.Mapping[str, Any]) -> TrainConfig:
        """Build from a dict (run.json's config, a config file); an unknown key names the closest valid one."""
        return cls.parse(d, what=WHAT)

    def override(self, pairs: list[str] | tuple[str, ...]) -> TrainConfig:
        """Apply `key=value` overrides (csn.core.schema.set_override: values parsed as JSON where possible, else
        as strings; a text field takes the text as typed, so name=1e5 is the name '1e5')."""
        d = self.to_dict()
        for p in pairs:
            set_override(TrainConfig, d, p, WHAT)
        return TrainConfig.from_dict(d)

    @model_validator(mode="before")
    @classmethod
    def _drop_recorded_resolution(cls, data: Any) -> Any:
        """reg_resolved is recorded (run.json), never read: it is recomputed from the keys."""
        if isinstance(data, dict) and RESOLVED in data:
            data = {k: v for k, v in data.items() if k != RESOLVED}
        return data

    @model_validator(mode="after")
    def _reg_mode_agrees(self) -> TrainConfig:
        if self.reg_mode == "study" and self.reg_statistic not in (None, "sums"):
            raise CsnError(f"config key 'reg_statistic' is {self.reg_statistic!r} but reg_mode 'study' uses class sums; "
                           "drop reg_statistic, or set reg_mode=csn to choose the statistic.")
        if self.reg_mode == "study" and self.reg_group not in (None, STUDY_GROUP):
            raise CsnError(f"config key 'reg_group' is {self.reg_group!r} but reg_mode 'study' uses groups of "
                           f"{STUDY_GROUP}; drop reg_group, or for the study's statistic with other groups set "
                           f"reg_mode=csn reg_statistic=sums reg_group={self.reg_group}.")
        return self

    @computed_field  # recorded in run.json with the config
    @property
    def reg_resolved(self) -> dict[str, Any]:
        """What the regularizer runs: statistic, group, eps and reduce, with reg_mode's defaults filled in (eps follows
        the statistic: 1e-7 with class means, the study's 1e-6 with class sums)."""
        study = self.reg_mode == "study"
        statistic = self.reg_statistic or ("sums" if study else "means")
        group = self.reg_group if self.reg_group is not None else (STUDY_GROUP if study else "batch")
        return {"statistic": statistic, "group": group, "eps": STUDY_EPS if statistic == "sums" else EPS,
                "reduce": self.reg_reduce}

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> TrainConfig:
        if self.nesterov and self.optimizer != "sgd":
            raise CsnError("config key 'nesterov' is SGD's; set optimizer=sgd or nesterov=false.")
        if self.nesterov and self.momentum == 0:
            raise CsnError("config key 'nesterov' needs momentum > 0 (Nesterov momentum is a form of momentum); set "
                           "momentum (e.g. momentum=0.9) or nesterov=false.")
        return self

    def diff(self, other: TrainConfig, ignore: tuple[str, ...] = EXECUTION_KEYS,
             steps_per_epoch: int | None = None) -> dict:
        """Keys whose values differ: {key: (self, other)}. Given the run's steps per epoch, two checkpoint
        schedules written differently that name the same steps (``1:end:0.5`` and ``f0.3333,f0.5,...``) are the
        same schedule."""
        a, b = self.to_dict(), other.to_dict()
        out = {k: (a[k], b[k]) for k in a if a[k] != b[k] and k not in ignore}
        if "checkpoints" in out and steps_per_epoch and self.epochs == other.epochs:
            try:
                same = (checkpoint_steps(self.checkpoints, steps_per_epoch, self.epochs)
                        == checkpoint_steps(other.checkpoints, steps_per_epoch, other.epochs))
            except CsnError:
                same = False
            if same:
                del out["checkpoints"]
        return out


# ----------------------------------------------------------------------------- presets
def is_preset_checkpoints(spec: str | None) -> bool:
    """True when a checkpoint spec is a preset's own: its points past the end of a shortened training are
    dropped with a note, while a schedule the user wrote that points past the end stays an error."""
    shipped = {"".join(str(presets.data("train", n)["checkpoints"]).split()) for n in presets.names("train")}
    return spec is not None and "".join(spec.split()) in shipped


def preset(name: str) -> TrainConfig:
    """A training preset by name (csn/presets/train/NAME.toml)."""
    return TrainConfig.from_dict(presets.data("train", name))


def read_config_file(path: str | Path) -> dict:
    """The top-level table of a TOML or YAML file (safe loaders only), or one CsnError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise CsnError(f"config file {path} does not exist; pass an existing .toml or .yaml file.")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise CsnError(f"config file {path} must end in .toml, .yaml or .yml.")
    try:
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")  # a byte-order mark (some editors write one)
    except UnicodeDecodeError:
        raise CsnError(f"config file {path} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as e:
        raise CsnError(f"config file {path} cannot be read ({e.strerror}); check its permissions.") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else _load_yaml(text)
    except _Refused as e:
        raise CsnError(f"config file {path} {e}") from None
    except RecursionError:
        raise CsnError(f"config file {path} is nested too deeply; a config is a flat table of key = value pairs.") from None
    except (tomllib.TOMLDecodeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CsnError(f"config file {path} is not valid: {first}; fix the syntax.") from None
    except Exception as e:
        if type(e).__module__.startswith("yaml"):
            if "python/" in str(e) or "!!python" in str(e) or "tag:yaml.org,2002:python" in str(e):
                raise CsnError(f"config file {path} uses a Python-specific YAML tag (!!python/...), which csn refuses "
                               "to load because it could run code; write plain values (numbers, strings, lists).") from None
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise CsnError(f"config file {path} is not valid YAML ({type(e).__name__}{at}); fix the syntax.") from None
        raise
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CsnError(f"config file {path} must hold a table of key = value pairs at the top level.")
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key in out:
            raise CsnError(f"config file {path} sets {key!r} twice (as {spelled[key]!r} and {str(k)!r}); keep one.")
        out[key], spelled[key] = v, str(k)
    return out


class _Refused(Exception):
    """A YAML construct csn refuses (the message continues 'config file PATH ...')."""


def _load_yaml(text: str) -> Any:
    """YAML with the safe loader (plain data only: tags like !!python/object are refused), refusing aliases
    and anchors before anything is expanded (nested aliases can expand to billions of values) and
    duplicate keys (which YAML would silently resolve to the last value)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):  # noqa: ANN001, ANN202 - PyYAML's signature
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                kind = f"alias *{event.anchor}" if isinstance(event, yaml.AliasEvent) else f"anchor &{event.anchor}"
                raise _Refused(f"uses a YAML {kind} at line {event.start_mark.line + 1}; csn refuses anchors and "
                               "aliases (a few nested aliases can expand to billions of values): write the values out.")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):  # noqa: ANN001, ANN202
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not None:
                    where = f"line {line}" if first == line else f"lines {first} and {line}"
                    raise _Refused(f"sets the key {key!r} twice ({where}); YAML would silently keep the last value: "
                                   "keep one.")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def load_config_file(path: str | Path) -> TrainConfig:
    """A TrainConfig from a TOML or YAML file; a `preset` key starts from that preset."""
    data = read_config_file(path)
    if not data:
        raise CsnError(f"config file {path} sets no key (it is empty or holds only comments), so it would train the "
                       "full default run; write the keys to use (e.g. preset = \"smoke\"), or pass --preset NAME.")
    base = preset(str(data.pop("preset"))).to_dict() if "preset" in data else {}
    base.update(data)
    return TrainConfig.from_dict(base)


# ----------------------------------------------------------------------------- data and model for a config
def load_data(cfg: TrainConfig) -> DataSplits:
    """The DataSplits of a config (with the train/test subsets it asks for)."""
    kwargs = dict(cfg.synthetic) if cfg.dataset == "synthetic" else {}
    if cfg.dataset == "synthetic":
        kwargs.setdefault("seed", 0)
    data = load_dataset(cfg.dataset, cfg.data_root, **kwargs)
    if in_memory(data.train):
        for split, n, seed in (("train", cfg.train_samples, 1234), ("test", cfg.test_samples, 4321)):
            full = getattr(data, split)
            sub = full.subset(n, seed=seed)
            if sub is not full:  # a random, unstratified subset can miss a class the loaded split has
                require_every_class(sub.labels, data.num_classes, f"the {split} subset of {split}_samples={n}",
                                    f"raise {split}_samples (every class needs an example in each split)")
            setattr(data, split, sub)
    return data


def data_info(data: DataSplits) -> dict:
    """What a run records about its data (and needs to rebuild its model); image_size is an int for
    square images, [H, W] otherwise."""
    size = data.image_size if isinstance(data.image_size, int) else list(data.image_size)
    return {"name": data.name, "num_classes": data.num_classes, "in_channels": data.in_channels,
            "image_size": size, "class_names": list(data.class_names),
            "num_train": len(data.train), "num_test": len(data.test)}


def build_model_for(cfg: TrainConfig, info: dict):
    """The config's model for a dataset described by data_info(), its read points (csn_stages) set from the
    config's `layers` when given; a model with no read points at all is refused here, before any work."""
    model = create_model(cfg.model, num_classes=info["num_classes"], in_channels=info["in_channels"],
                         width=cfg.width, image_size=info["image_size"])
    if cfg.layers is not None:
        model.csn_stages = stages_from_patterns(model, cfg.layers)
    else:
        try:
            stages(model)
        except CsnError:
            raise CsnError(f"model {cfg.model!r} declares no read points; give them as layer patterns, one stage per "
                           "pattern, e.g. layers = ['blocks.0', 'blocks.1'] in the config's [train] table (or "
                           "layers=... on the command line).") from None
    return model


def check_model(cfg: TrainConfig, info: dict, *, trust_code: bool, where: str) -> None:
    """Before any run starts: refuse code named by data without trust (require_trust; `where` names the file that
    names the model, e.g. 'study file study.toml'), then build the model for the data described by data_info()
    and run its start-up checks (one forward pass, read points), so that a bad model is one CsnError now, not
    in a worker after other runs have started. The model is built inside trusting_code(trust_code)."""
    require_trust(cfg.model, trust_code, where)
    with trusting_code(trust_code):
        build_model_for(cfg, info)


__all__ = ["TrainConfig", "EXECUTION_KEYS", "preset", "is_preset_checkpoints", "read_config_file", "load_config_file", "load_data", "data_info",
           "build_model_for", "check_model"]
