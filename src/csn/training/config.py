"""Training configuration as plain data, presets, `key=value` overrides, and TOML/YAML config files."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from csn.errors import CsnError, unknown


@dataclass
class TrainConfig:
    """Everything that defines a training run. Written to run.json; resume refuses a different one."""

    name: str = "run"
    # data
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    train_samples: int | None = None
    test_samples: int | None = None
    synthetic: dict = field(default_factory=dict)
    augment: str = "none"
    # model
    model: str = "resnet20"
    width: float = 1.0
    # optimisation
    epochs: float = 5.0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    lr_schedule: str = "constant"
    milestones: list = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    seed: int = 0
    # checkpoints and evaluation
    checkpoints: str = "0:1:0.125,1:3:0.25,3:end:1"
    eval_batch_size: int = 500
    eval_samples: int | None = None
    log_every: int = 10
    # selectivity regularizer: loss = ce - alpha * R
    reg_alpha: float | None = None
    reg_window: str | None = None
    reg_schedule: str | None = None
    reg_layers: list | None = None
    # execution
    device: str = "auto"
    channels_last: bool = True
    amp: bool = False
    sync_bn: bool = True  # under torchrun on GPUs: SyncBatchNorm, so BN sees the global batch as in one process
    threads: int | None = None
    workers: int = 8

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict; unknown keys are an error naming the closest valid key."""
        valid = cls.fields()
        for k in d:
            if k not in valid:
                raise unknown("config key", k, valid)
        cfg = cls()
        for k, v in d.items():
            setattr(cfg, k, _coerce(k, v, valid[k]))
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def override(self, pairs: list[str] | tuple[str, ...]) -> "TrainConfig":
        """Apply `key=value` overrides (values parsed as JSON where possible, else as strings)."""
        d = self.to_dict()
        for p in pairs:
            if "=" not in p:
                raise CsnError(f"override {p!r} is not of the form key=value; write e.g. epochs=3.")
            k, v = p.split("=", 1)
            k = k.strip().replace("-", "_")
            if k not in d:
                raise unknown("config key", k, d)
            d[k] = _parse_text(v) if _is_text_field(k) else _parse_value(v)
        return TrainConfig.from_dict(d)

    def diff(self, other: "TrainConfig", ignore: tuple[str, ...] = ("device", "threads", "workers")) -> dict:
        """Keys whose values differ: {key: (self, other)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k] and k not in ignore}


def _parse_value(v: str):
    v = v.strip()
    if v.lower() in ("none", "null"):
        return None
    try:
        return json.loads(v)
    except (json.JSONDecodeError, RecursionError):
        return v


def _is_text_field(key: str) -> bool:
    typ = typing.get_type_hints(TrainConfig)[key]
    return typ is str or typ == (str | None)


def _parse_text(v: str):
    """A `key=value` override of a text field: the text as typed (name=1e5 stays '1e5', not '100000.0');
    a JSON-quoted string is unquoted (how CLI flags pass values), none/null is None."""
    v = v.strip()
    if v.lower() in ("none", "null"):
        return None
    if v.startswith('"'):
        try:
            out = json.loads(v)
        except json.JSONDecodeError:
            return v
        return out if isinstance(out, str) else v
    return v


_INT_TEXT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def _coerce(key: str, value, f: dataclasses.Field):
    """Check/convert a value to the field's declared type; a wrong type is a clear error."""
    typ = typing.get_type_hints(TrainConfig)[key]
    args = typing.get_args(typ)
    allow_none = type(None) in args or typ is type(None)
    base = next((a for a in args if a is not type(None)), typ) if isinstance(typ, types.UnionType) or args else typ
    if value is None:
        if allow_none:
            return None
        raise CsnError(f"config key {key!r} cannot be empty; give a {getattr(base, '__name__', base)}.")
    origin = typing.get_origin(base) or base
    try:
        if origin is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):  # amp=1 means what amp="1" means
                return bool(value)
            raise TypeError
        if origin is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            if isinstance(value, str) and not _INT_TEXT.fullmatch(value.strip()):
                raise ValueError  # no '1_000', non-ASCII digits or '12.0' read as a different number
            return int(value)
        if origin is float:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, str) and not _FLOAT_TEXT.fullmatch(value.strip()):
                raise ValueError
            out = float(value)
            if out != out or out in (float("inf"), float("-inf")):
                raise TypeError
            return out
        if origin is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [s for s in value.split(",") if s]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return list(value)
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise CsnError(f"config key {key!r} expects a {getattr(base, '__name__', str(base))}, got {value!r}.")


# ----------------------------------------------------------------------------- presets
PRESETS: dict[str, dict] = {
    # Seconds on a CPU: tiny synthetic data, a small ResNet; for tests, CI and a first look.
    "smoke": dict(
        name="smoke", dataset="synthetic", synthetic=dict(num_train=512, num_test=256, num_classes=4, channels=1, size=12),
        model="resnet8", width=0.5, epochs=2.0, batch_size=64, lr=0.05, checkpoints="0:1:0.25,1:end:0.5",
        eval_batch_size=256, log_every=2, channels_last=False,
    ),
    # The embedded default: Fashion-MNIST with a CIFAR-style ResNet, sized for one 2-core CPU.
    # Dense step-based early checkpoints resolve the selectivity peak within the first ~100 steps.
    "fmnist": dict(
        name="fmnist", dataset="fashion-mnist", model="resnet8", width=1.0, epochs=3.0, batch_size=128,
        lr=0.1, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine", warmup_epochs=0.0, augment="none",
        checkpoints="step=8,step=16,step=32,step=64,step=128,step=256,0.75:1:0.25,1:end:0.5",
        eval_batch_size=1000, eval_samples=2000,
    ),
    # The study's recipe (SPEC "Training recipes"): ResNet-50 on an ImageNet folder, for GPUs under torchrun.
    "imagenet-resnet50": dict(
        name="imagenet-resnet50", dataset="imagefolder", model="resnet50", epochs=90.0, batch_size=256, lr=0.1,
        momentum=0.9, weight_decay=1e-4, lr_schedule="step", milestones=[30, 60], gamma=0.1,
        augment="imagenet", checkpoints="0:1:0.25,1:end:1", eval_batch_size=250, amp=True, channels_last=True,
        log_every=50,
    ),
}


def preset(name: str) -> TrainConfig:
    """A preset configuration by name."""
    if name not in PRESETS:
        raise unknown("preset", name, PRESETS)
    return TrainConfig.from_dict(PRESETS[name])


def load_config_file(path: str | Path) -> TrainConfig:
    """Read a TOML or YAML config (safe loaders only); a `preset` key starts from that preset."""
    path = Path(path)
    if not path.is_file():
        raise CsnError(f"config file {path} does not exist; pass an existing .toml or .yaml file.")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise CsnError(f"config file {path} must end in .toml, .yaml or .yml.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise CsnError(f"config file {path} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as e:
        raise CsnError(f"config file {path} cannot be read ({e.strerror}); check its permissions.") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)  # plain data only: tags like !!python/object are refused
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
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    base = preset(str(data.pop("preset"))).to_dict() if "preset" in data else {}
    base.update(data)
    return TrainConfig.from_dict(base)


# ----------------------------------------------------------------------------- data and model for a config
def load_data(cfg: TrainConfig):
    """The DataSplits of a config (with the train/test subsets it asks for)."""
    from csn.data import load_dataset

    kwargs = dict(cfg.synthetic) if cfg.dataset == "synthetic" else {}
    if cfg.dataset == "synthetic":
        kwargs.setdefault("seed", 0)
    data = load_dataset(cfg.dataset, cfg.data_root, **kwargs)
    if hasattr(data.train, "subset"):
        from csn.data.validate import require_every_class

        for split, n, seed in (("train", cfg.train_samples, 1234), ("test", cfg.test_samples, 4321)):
            full = getattr(data, split)
            sub = full.subset(n, seed=seed)
            if sub is not full:  # a random, unstratified subset can miss a class the loaded split has
                require_every_class(sub.labels, data.num_classes, f"the {split} subset of {split}_samples={n}",
                                    f"raise {split}_samples (every class needs an example in each split)")
            setattr(data, split, sub)
    return data


def data_info(data) -> dict:
    """What a run records about its data (and needs to rebuild its model); image_size is an int for
    square images, [H, W] otherwise."""
    size = data.image_size if isinstance(data.image_size, int) else list(data.image_size)
    return {"name": data.name, "num_classes": data.num_classes, "in_channels": data.in_channels,
            "image_size": size, "class_names": list(data.class_names),
            "num_train": len(data.train), "num_test": len(data.test)}


def build_model_for(cfg: TrainConfig, info: dict):
    """The config's model for a dataset described by data_info()."""
    from csn.models import create_model

    return create_model(cfg.model, num_classes=info["num_classes"], in_channels=info["in_channels"],
                        width=cfg.width, image_size=info["image_size"])
