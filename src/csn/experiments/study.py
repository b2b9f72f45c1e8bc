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

TOML or YAML (safe loaders). Every time in a study is a point in training (csn.core.times.parse_time):
steps (`step=64`), epochs (`1.5`), fractions of training (`f0.33`) or `end`. The shipped studies count the
early phase in steps (the selectivity peak comes within ~64 optimizer steps, SPEC) and the rest in
fractions, so a study keeps its meaning on a dataset 8x smaller or larger; imagenet keeps the study's own
protocol, written in epochs. Checkpoint lists also take `peak`: each baseline run's own selectivity peak
(csn.experiments.claims.peak_step, the "early" checkpoint of C2 and C3). The shipped studies are the files in
csn/presets/study/.
"""

from __future__ import annotations

import json
import math
import re
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictBool, model_validator

from csn.analysis.ablation import AblationOptions
from csn.analysis.cka import CkaOptions
from csn.analysis.linearity import LinearityOptions
from csn.analysis.selectivity import SelectivityOptions
from csn.core import presets
from csn.core.schema import MAX_SEEDS, SEEDS_HINT, Float, Int, Schema, set_override
from csn.core.times import TIME_FORMS, parse_time, parse_times, resolve
from csn.errors import CsnError, unknown
from csn.experiments.claims import Spread
from csn.runs.config import TrainConfig, read_config_file
from csn.runs.config import preset as train_preset
from csn.runs.run import Checkpoint

STUDY_KEY = "study key"


def _valid(fn, *args, **kwargs):
    """fn(...) with a CsnError turned into the ValueError a schema reports with its key and value."""
    try:
        return fn(*args, **kwargs)
    except CsnError as e:
        text = str(e)
        why = ("a fraction of training outside [0, 1]" if "outside" in text else "a negative epoch" if "negative" in text
               else "not a point in training")
        raise ValueError(f"{why}; write {TIME_FORMS}") from None


def _time(v: Any) -> str:
    """A point in training, kept as its canonical text (step=64, 1.5, f0.25, end)."""
    return str(_valid(parse_time, v, "time"))


PEAK = "peak"
"""A study checkpoint that is each baseline run's own selectivity peak (claims.peak_step: the step in the first
quarter of training where the mean CSI of every stage but the last is largest)."""


def _times(v: Any, *, empty: bool = False) -> tuple[str, ...]:
    """Checkpoints of a study (csn.core.times' lists): points (the nearest checkpoint), `peak`, or ranges A:B (every
    checkpoint from A to B), kept as canonical text; empty=True allows none (the analysis is off)."""
    items = v if isinstance(v, (list, tuple)) else [v]
    if empty and (not items or all(isinstance(i, str) and not i.strip() for i in items)):
        return ()
    if any(isinstance(i, str) and not i.strip() for i in items) or not items:
        raise ValueError("give at least one point in training, e.g. ['peak', 'end'] or ['step=16', 'step=64', 'end']")
    return tuple(str(i) for i in _valid(parse_times, [str(i) if not isinstance(i, str) else i for i in items],
                                        "time", keywords=(PEAK,)))


Time = Annotated[str, BeforeValidator(_time)]
Times = Annotated[tuple[str, ...], BeforeValidator(_times)]
TimesOrNone = Annotated[tuple[str, ...], BeforeValidator(lambda v: _times(v, empty=True))]


class StudyCosts(Schema):
    """What the study's work costs, declared for the plan's time estimate before anything runs (measured on the
    shipped study's machine, benchmarks/bench_reproduce_analyses.py): training per optimizer step of one run
    (single-threaded, runs `parallel` at a time), and one checkpoint of each analysis as `csn reproduce` runs it.
    Finished runs replace the declared training cost by the median measured one."""

    step_seconds: Float = Field(0.2, gt=0, description="One optimizer step of one run (single-threaded, runs in "
                                "parallel).")
    selectivity_seconds: Float = Field(1.0, ge=0, description="Selectivity of one checkpoint (BN re-estimation "
                                       "included).")
    ablation_seconds: Float = Field(6.0, ge=0, description="The ablation sweep of one checkpoint.")
    linearity_seconds: Float = Field(5.0, ge=0, description="Linearity of one checkpoint.")
    linear_fit_seconds: Float = Field(10.0, ge=0, description="Fitting the linear classifier (once per study: the "
                                      "baseline runs share it).")
    cka_seconds: Float = Field(1.0, ge=0, description="CKA of one pair of matched checkpoints.")
    accuracy_seconds: Float = Field(4.0, ge=0, description="Test accuracy of one final checkpoint after BatchNorm "
                                    "re-estimation (C4's accuracy).")


class Study(Schema):
    """Everything `csn reproduce` does besides training one run: declared before any result is seen.

    Conditions: baseline, the regularizer with `alpha` from step 0 and from `late_onset` to the end, each with the
    same `seeds` (C4 pairs them by seed). Times are points in training (step=64, 1.5 epochs, f0.33, end) or `peak`
    (each baseline run's selectivity peak). Every analysis runs only where a verdict or the report reads it: the
    baseline's selectivity from initialization through the first quarter of training and at the end (C1, the
    peak), ablation and linearity at the peak and the end (C2, C3), the regularized runs' selectivity at the end
    (C4's dose), CKA (no verdict) at a few checkpoints."""

    seeds: Int = Field(5, ge=1, le=MAX_SEEDS, description="Seeds of every condition (baseline and both regularized "
                       "ones; C4 pairs them by seed).", json_schema_extra={"range_hint": SEEDS_HINT})
    alpha: Float = Field(-1.0, description="Regularizer strength (loss = ce - alpha * R; alpha < 0 suppresses).")
    late_onset: Time = Field("f0.3333", description="When the late regularized condition starts (after the early "
                             "selectivity peak).")
    ablation_checkpoints: Times = Field((PEAK, "end"), description="Where the baseline runs are ablated: points (the "
                                        "nearest checkpoint), peak (the run's selectivity peak) or ranges A:B.")
    linearity_checkpoints: Times = Field((PEAK, "end"), description="Where the baseline runs' linearity is measured "
                                         "(theta_0 and the previous checkpoint are read whatever is selected).")
    selectivity_checkpoints: Times = Field(("0:f0.25", "end"), description="Where the baseline runs' selectivity is "
                                           "measured: C1 reads initialization, the first quarter of training (where "
                                           "it and claims.peak_step look for the peak) and the end; '0:end' adds "
                                           "every checkpoint between for the report's curves.")
    reg_selectivity_checkpoints: Times = Field(("end",), description="Where the regularized runs' selectivity is "
                                               "measured (C4 reads the end).")
    cka_checkpoints: TimesOrNone = Field(("end",), description="Where each regularized run is compared with its "
                                         "baseline by CKA (no verdict reads it); [] = no CKA.")
    selectivity: SelectivityOptions = SelectivityOptions()
    ablation: AblationOptions = AblationOptions()
    linearity: LinearityOptions = LinearityOptions()
    cka: CkaOptions = CkaOptions(samples=2000)
    parallel: Int = Field(2, ge=1, description="Training runs at once.")
    judge: StrictBool = Field(True, description="False: too small to test the claims; verdicts are reported as "
                              "inconclusive.")
    spread: Spread = Field(Spread(), description="The per-seed spread the plan's power and minimal detectable effects "
                           "assume: recorded on fmnist; measure your own.")
    costs: StudyCosts = Field(StudyCosts(), description="Declared costs for the plan's time estimate.")

    @property
    def reg_seeds(self) -> int:
        """Seeds of each regularized condition: the study's seeds (every condition has them; C4 pairs by seed)."""
        return self.seeds

    @model_validator(mode="after")
    def _check(self) -> Study:
        if self.alpha == 0:
            raise ValueError("alpha 0 regularizes nothing; give a negative alpha to suppress selectivity (e.g. -1)")
        if uses_peak(self.selectivity_checkpoints):
            raise ValueError("selectivity_checkpoints cannot name 'peak': the peak is found in the baseline's "
                             "selectivity; write the first quarter of training instead, e.g. ['0:f0.25', 'end']")
        if self.cka.mode is not None or self.cka.run_b is not None or str(self.cka.reference).strip() not in ("last", "end"):
            raise ValueError("cka.mode, cka.run_b and cka.reference are set by the study (each regularized run against "
                             "its baseline at matched checkpoints); leave them out")
        return self


class StudyConfig(Schema):
    """A study file, resolved: the training config every run starts from, and the study."""

    train: TrainConfig
    study: Study


# ------------------------------------------------------------------------------------------------
# shipped studies and study files
# ------------------------------------------------------------------------------------------------

def study_names() -> list[str]:
    """Names of the shipped studies (csn/presets/study/NAME.toml)."""
    return presets.names("study")


def study_text(name: str) -> str:
    """The TOML text of a shipped study."""
    return presets.text("study", name)


def _tables(raw: dict, where: str, seen: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(train table, study table) of a study file's data, its `preset` (a shipped study) expanded."""
    for k in raw:
        if k not in ("preset", "train", "study", "launcher"):
            raise CsnError(f"{where}: {unknown('top-level key', k, ['preset', 'train', 'study', 'launcher'])}")
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


def launcher_table(config: str | Path | None) -> dict:
    """A study file's [launcher] table: where its runs and analyses run (csn.experiments.launcher.LauncherOptions'
    keys, e.g. launcher = "slurm", slurm_partition = "gpu"; the command line's options override them); {} without
    a file or a table. Only the file's own table: a study does not inherit where it runs from its preset."""
    if not config:
        return {}
    table = read_config_file(config).get("launcher", {})
    if not isinstance(table, dict):
        raise CsnError(f"study file {config}: [launcher] must be a table of key = value pairs.")
    return table


def _merge(base: dict, over: dict) -> dict:
    """Nested tables merged key by key (a study file changes ablation.draws without restating the rest)."""
    out = dict(base)
    for k, v in over.items():
        k = str(k).replace("-", "_")
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


RETIRED = {
    "early_checkpoint": "C2 and C3 measure 'early' at each baseline run's own selectivity peak (claims.peak_step); "
                        "ablation_checkpoints and linearity_checkpoints take 'peak'",
}
"""Study keys that earlier versions read and this one ignores, with why (a one-line note names them)."""


def _retired(study: dict, where: str) -> dict:
    """The study table without keys of earlier versions: early_checkpoint is ignored with a note; reg_seeds (every
    condition now has the study's seeds) is ignored when it equals seeds and refused otherwise."""
    out = dict(study)
    for key, why in RETIRED.items():
        if key in out:
            out.pop(key)
            print(f"note: {where}: study key {key} is no longer used and was ignored: {why}; delete the line.",
                  file=sys.stderr)
    if "reg_seeds" in out:
        reg, seeds = out.pop("reg_seeds"), out.get("seeds", Study.model_fields["seeds"].default)
        if reg != seeds:
            raise CsnError(f"{where}: study key reg_seeds is no longer used: every condition trains the study's seeds "
                           f"(C4 pairs them by seed); delete reg_seeds = {reg!r} (and set seeds = N for all "
                           "conditions).")
        print(f"note: {where}: study key reg_seeds is no longer used (every condition trains the study's seeds); "
              "delete the line.", file=sys.stderr)
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
        if not raw:
            raise CsnError(f"study file {config} sets no key (it is empty or holds only comments), so it would run the "
                           "default study; write the keys to change (e.g. preset = \"fmnist\" and a [study] table), or "
                           "pass --preset NAME.")
    else:
        name = preset or "fmnist"
        where, raw = f"study preset {name}", {"preset": name}
    train, study = _tables(raw, where)
    study = _retired(study, where)
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

def uses_peak(items: tuple[str, ...]) -> bool:
    """Whether a study's checkpoints name `peak` (then they resolve on a run only once its selectivity is known)."""
    return any(PEAK in item.split(":") for item in items)


def select_steps(steps: list[int], items: tuple[str, ...], steps_per_epoch: int, total: int,
                 peak: int | None = None) -> list[int]:
    """Checkpoint steps of a study's times on a run with checkpoints at `steps` (csn.core.times.resolve: each point's
    nearest checkpoint, every checkpoint of a range); `peak` is the run's selectivity peak (a checkpoint step)."""
    def keyword(word: str) -> int:
        if peak is None:
            raise CsnError("the study's checkpoints name 'peak', but this run has no selectivity peak (no selectivity "
                           "table, or no checkpoint in the first quarter of training); measure selectivity first, or "
                           "name points in training instead (step=64, f0.1).")
        return int(peak)

    return resolve(parse_times(list(items), "the study's checkpoints", keywords=(PEAK,)), steps, steps_per_epoch,
                   total, keyword=keyword, what="the study's checkpoints")


def select_times(ckpts: list[Checkpoint], items: tuple[str, ...], steps_per_epoch: int, total: int,
                 peak: int | None = None) -> list[int]:
    """Checkpoint steps of a study's times on one run: each point's nearest checkpoint, every checkpoint of a range
    (`peak`: the run's selectivity peak, see select_steps)."""
    return select_steps([c.step for c in ckpts], items, steps_per_epoch, total, peak)


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


__all__ = ["PEAK", "Study", "StudyCosts", "StudyConfig", "study_names", "study_text", "load_study", "uses_peak",
           "select_steps", "select_times", "to_toml"]
