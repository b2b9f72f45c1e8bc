"""A study as a config file: what `csn reproduce --config FILE` (and every `--preset`) runs.

    preset = "fmnist"          # optional: start from a shipped study (csn reproduce --print-config NAME)

    [train]                    # a training config: the keys of `csn train` configs, or a training preset + keys
    preset = "fmnist"
    model = "vit-tiny"

    [study]                    # the Study below; analysis options as nested tables
    seeds = 3
    late_onset = "f0.3333"
    [study.ablation]
    draws = 3

TOML or YAML (safe loaders). Every time in a study is a point in training (csn.core.schedules.parse_time):
steps (`step=64`), epochs (`1.5`), fractions of training (`f0.33`) or `end`. The shipped studies count the
early phase in steps (the selectivity peak comes within ~64 optimizer steps, SPEC) and the rest in
fractions, so a study keeps its meaning on a dataset 8x smaller or larger; imagenet keeps the study's own
protocol, written in epochs. The shipped studies are the files in csn/experiments/studies/.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, model_validator

from csn.analysis.ablation import AblationOptions
from csn.analysis.cka import CkaOptions
from csn.analysis.linearity import LinearityOptions
from csn.analysis.selectivity import SelectivityOptions
from csn.core.schedules import TIME_FORMS, TimePoint, parse_time
from csn.core.schema import MAX_SEEDS, SEEDS_HINT, Float, Int, Schema, set_override
from csn.errors import CsnError, unknown
from csn.runs.config import TrainConfig, read_config_file
from csn.runs.config import preset as train_preset
from csn.runs.run import Checkpoint

STUDY_KEY = "study key"


def _time(v: Any) -> str:
    """A point in training, kept as its canonical text (step=64, 1.5, f0.25, end)."""
    try:
        return str(parse_time(v, "time"))
    except CsnError as e:  # a ValueError, so the schema's message names the key and the value
        text = str(e)
        why = ("a fraction of training outside [0, 1]" if "outside" in text else "a negative epoch" if "negative" in text
               else "not a point in training")
        raise ValueError(f"{why}; write {TIME_FORMS}") from None


def _times(v: Any) -> tuple[str, ...]:
    """Checkpoints of a study: points (the nearest checkpoint) or ranges A:B (every checkpoint from A to B)."""
    items = [s.strip() for s in v.split(",")] if isinstance(v, str) else list(v) if isinstance(v, (list, tuple)) else [v]
    out = []
    for item in items:
        if isinstance(item, str) and ":" in item:
            a, b = item.split(":", 1)
            out.append(f"{_time(a)}:{_time(b)}")
        else:
            out.append(_time(item))
    if not out or any(not s for s in out):
        raise ValueError("give at least one point in training, e.g. ['step=16', 'step=64', 'end']")
    return tuple(out)


Time = Annotated[str, BeforeValidator(_time)]
Times = Annotated[tuple[str, ...], BeforeValidator(_times)]


class Study(Schema):
    """Everything `csn reproduce` does besides training one run: declared before any result is seen.

    Conditions: baseline (seeds), the regularizer with `alpha` from step 0 and from `late_onset` to the end
    (reg_seeds each, the same seeds). Times are points in training (step=64, 1.5 epochs, f0.33, end)."""

    seeds: Int = Field(3, ge=1, le=MAX_SEEDS, description="Baseline seeds.", json_schema_extra={"range_hint": SEEDS_HINT})
    reg_seeds: Int = Field(2, ge=1, le=MAX_SEEDS, description="Seeds per regularized condition (the first of the "
                           "baseline's).", json_schema_extra={"range_hint": SEEDS_HINT})
    alpha: Float = Field(-1.0, description="Regularizer strength (loss = ce - alpha * R; alpha < 0 suppresses).")
    late_onset: Time = Field("f0.3333", description="When the late regularized condition starts (after the early "
                             "selectivity peak).")
    early_checkpoint: Time = Field("step=64", description="The 'early' checkpoint of C2 and C3 (the nearest one).")
    ablation_checkpoints: Times = Field(("step=16", "step=64", "end"), description="Where the baseline runs are "
                                        "ablated: points (the nearest checkpoint) or ranges A:B.")
    selectivity: SelectivityOptions = SelectivityOptions()
    ablation: AblationOptions = AblationOptions()
    linearity: LinearityOptions = LinearityOptions()
    cka: CkaOptions = CkaOptions(samples=2000)
    parallel: Int = Field(2, ge=1, description="Training runs at once.")
    judge: bool = Field(True, description="False: too small to test the claims; verdicts are reported as inconclusive.")

    @model_validator(mode="after")
    def _check(self) -> Study:
        if self.alpha == 0:
            raise ValueError("alpha 0 regularizes nothing; give a negative alpha to suppress selectivity (e.g. -1)")
        if self.cka.mode is not None or self.cka.run_b is not None:
            raise ValueError("cka.mode and cka.run_b are set by the study (each regularized run against its baseline); "
                             "leave them out")
        return self


class StudyConfig(Schema):
    """A study file, resolved: the training config every run starts from, and the study."""

    train: TrainConfig
    study: Study


# ------------------------------------------------------------------------------------------------
# shipped studies and study files
# ------------------------------------------------------------------------------------------------

def _studies_dir():
    return resources.files("csn.experiments").joinpath("studies")


def study_names() -> list[str]:
    """Names of the shipped studies (csn/experiments/studies/NAME.toml)."""
    return sorted(p.name[:-5] for p in _studies_dir().iterdir() if p.name.endswith(".toml"))


def study_text(name: str) -> str:
    """The TOML text of a shipped study."""
    if name not in study_names():
        raise unknown("study preset", name, study_names())
    return _studies_dir().joinpath(f"{name}.toml").read_text(encoding="utf-8")


def _tables(raw: dict, where: str, seen: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(train table, study table) of a study file's data, its `preset` (a shipped study) expanded."""
    for k in raw:
        if k not in ("preset", "train", "study"):
            raise CsnError(f"{where}: {unknown('top-level key', k, ['preset', 'train', 'study'])}")
    train, study = {}, {}
    if "preset" in raw:
        name = str(raw["preset"])
        if name in seen:
            raise CsnError(f"{where}: study presets name each other in a loop ({' -> '.join(seen + (name,))}).")
        train, study = _tables(tomllib.loads(study_text(name)), f"study preset {name}", seen + (name,))
    for key in ("train", "study"):
        if not isinstance(raw.get(key, {}), dict):
            raise CsnError(f"{where}: [{key}] must be a table of key = value pairs.")
    mine = {str(k).replace("-", "_"): v for k, v in raw.get("train", {}).items()}
    train = mine if "preset" in mine else {**train, **mine}  # a training preset of its own starts afresh
    return train, _merge(study, raw.get("study", {}))


def _merge(base: dict, over: dict) -> dict:
    """Nested tables merged key by key (a study file changes ablation.draws without restating the rest)."""
    out = dict(base)
    for k, v in over.items():
        k = str(k).replace("-", "_")
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_study(preset: str | None = None, config: str | Path | None = None, *, dataset: str | None = None,
               data_root: str | None = None, model: str | None = None,
               sets: tuple[str, ...] | list[str] = ()) -> tuple[str, StudyConfig]:
    """(name, StudyConfig) of a shipped study (default fmnist) or a study file, with the shortcuts
    (dataset, data_root, model) and `--set train.KEY=VALUE` / `study.KEY=VALUE` overrides applied."""
    if preset and config:
        raise CsnError("pass either --preset or --config, not both (a study file may name its preset).")
    if config:
        name, where, raw = Path(config).stem, str(config), read_config_file(config)
    else:
        name = preset or "fmnist"
        where, raw = f"study preset {name}", {"preset": name}
    train, study = _tables(raw, where)
    if "preset" in train:
        train = {**train_preset(str(train.pop("preset"))).to_dict(), **train}
    shortcuts = [f"{k}={json.dumps(v)}" for k, v in (("dataset", dataset), ("data_root", data_root), ("model", model))
                 if v is not None]
    for pair in shortcuts:
        set_override(TrainConfig, train, pair)
    for pair in sets:
        table, _, rest = pair.partition(".")
        if table == "train" and rest:
            set_override(TrainConfig, train, rest)
        elif table == "study" and rest:
            set_override(Study, study, rest, STUDY_KEY)
        else:
            key = pair.split("=", 1)[0].strip()
            hint = "train" if key.replace("-", "_") in TrainConfig.model_fields else "study"
            raise CsnError(f"--set {pair!r} names no table; write train.KEY=VALUE or study.KEY=VALUE (e.g. --set "
                           f"{hint}.{key}=...).")
    try:
        cfg = StudyConfig(train=TrainConfig.from_dict(train), study=Study.parse(study, what=STUDY_KEY))
    except CsnError as e:
        raise CsnError(f"{where}: {e}") from None
    return name, cfg


# ------------------------------------------------------------------------------------------------
# times of a study resolved on a run
# ------------------------------------------------------------------------------------------------

def nearest(ckpts: list[Checkpoint], step: int) -> Checkpoint:
    """The checkpoint nearest to `step` (the earlier one on a tie)."""
    return min(ckpts, key=lambda c: (abs(c.step - step), c.step))


def select_times(ckpts: list[Checkpoint], items: tuple[str, ...], steps_per_epoch: int, total: int) -> list[int]:
    """Checkpoint steps of a study's times on one run: each point's nearest checkpoint, every checkpoint of a range."""
    out: set[int] = set()
    for item in items:
        if ":" in item:
            a, b = (parse_time(t).step(steps_per_epoch, total) for t in item.split(":", 1))
            out.update(c.step for c in ckpts if a <= c.step <= b)
        else:
            out.add(nearest(ckpts, parse_time(item).step(steps_per_epoch, total)).step)
    return sorted(out)


def onset_epoch(point: str | TimePoint, steps_per_epoch: int, total: int) -> float:
    """The epoch (step / steps_per_epoch) where a regularized condition starting at `point` switches on;
    it must fall strictly inside training."""
    tp = point if isinstance(point, TimePoint) else parse_time(point, "late_onset")
    step = tp.step(steps_per_epoch, total)
    if not 0 < step < total:
        raise CsnError(f"late_onset {tp} is step {step} of a training of {total} steps; choose a point strictly inside "
                       "training (e.g. f0.33), after step 0 and before the end.")
    return step / steps_per_epoch


# ------------------------------------------------------------------------------------------------
# a study as TOML (csn reproduce --print-config)
# ------------------------------------------------------------------------------------------------

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(v)
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a TOML basic string (JSON's escapes are TOML's)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(type(v).__name__)


def _table_of(obj: Schema) -> dict[str, Any]:
    """A schema's values for a file: a None left out where None is the default, written 'all' where it is not
    (the options whose None means 'the whole split'); nested schemas as nested tables."""
    out: dict[str, Any] = {}
    data = obj.to_dict()
    for name, field in type(obj).model_fields.items():
        value = getattr(obj, name)
        if isinstance(value, Schema):
            out[name] = _table_of(value)
        elif data[name] is not None:
            out[name] = data[name]
        elif field.default is not None:
            out[name] = "all"
    return out


def to_toml(cfg: StudyConfig, header: str = "") -> str:
    """The whole resolved study as a TOML file: [train] with every key, [study], [study.<analysis>]."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]

    def table(name: str, data: dict[str, Any]) -> None:
        lines.extend(["", f"[{name}]"] if lines else [f"[{name}]"])
        lines.extend(f"{_key(k)} = {_value(v)}" for k, v in data.items() if not isinstance(v, dict) or name == "train")
        for k, v in data.items():
            if isinstance(v, dict) and name != "train":
                table(f"{name}.{k}", v)

    table("train", _table_of(cfg.train))
    table("study", _table_of(cfg.study))
    return "\n".join(lines) + "\n"


__all__ = ["Study", "StudyConfig", "study_names", "study_text", "load_study", "nearest", "select_times", "onset_epoch",
           "to_toml"]
