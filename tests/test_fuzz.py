"""Hostile and malformed input, fuzzed: every parser of user or on-disk data either returns the meaning
that was written or raises CsnError (one clear sentence) -- never another exception type, never a
silently different value, never a traceback through the CLI.

Covered: config files (random TOML/YAML text, random key/value tables), `key=value` overrides,
checkpoint schedules and alpha strings, checkpoint selectors, layer patterns, manifests (random JSON
lines and bytes), and the `csn train` command line up to the point where training would start.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import typing
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from csn.core.alpha import alpha_schedule
from csn.core.checkpoint_schedule import checkpoint_steps
from csn.errors import CsnError
from csn.runs import MANIFEST, Checkpoint, read_manifest, select_checkpoints
from csn.runs.config import TrainConfig, load_config_file

EXAMPLES = int(os.environ.get("CSN_FUZZ_EXAMPLES", "60"))  # raise it for a deeper run
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
KEYS = sorted(TrainConfig.model_fields)
TRUE_WORDS = ("1", "on", "t", "true", "y", "yes")  # pydantic's words for true (and their opposites for false)


def _base(key: str) -> type:
    """The plain type of a config key (int, float, str, bool, list, dict), without Optional/Annotated."""
    t = TrainConfig.model_fields[key].annotation
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if type(None) in typing.get_args(t) and len(args) == 1:
        t = args[0]
    if typing.get_origin(t) is typing.Annotated:
        t = typing.get_args(t)[0]
    return typing.get_origin(t) or t

# JSON-like values of every kind a TOML/YAML/JSON file can hold (and floats that are not finite)
scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                            max_size=4), max_leaves=12)
keys = st.sampled_from(KEYS) | st.text(max_size=12)


def _only_csn_error(fn, *args, **kwargs):
    """Call fn; a CsnError is an accepted outcome (returned as None), anything else propagates."""
    try:
        return fn(*args, **kwargs)
    except CsnError as e:
        assert str(e) and "\n" not in str(e).strip(), "an error is one sentence"
        return None


# ============================================================================ config files
toml_snippets = st.sampled_from(['1', '-3', '0.5', '1e400', 'nan', 'inf', 'true', '"text"', '""', '[1, 2]', '["a"]',
                                 '{a = 1}', '"../../etc"', "'single'", '1979-05-27', '[[1]]', '"x" "y"', '=', ''])


@st.composite
def toml_text(draw):
    """Mostly plausible TOML (known keys, odd values), sometimes plain garbage."""
    if draw(st.booleans()):
        return draw(st.text(max_size=80))
    lines = [f"{draw(keys)} = {draw(toml_snippets)}" for _ in range(draw(st.integers(0, 5)))]
    if draw(st.booleans()):
        lines.append(f"[{draw(st.sampled_from(['synthetic', 'x', 'name', '']))}]")
        lines += [f"{draw(st.text(string.ascii_lowercase, min_size=1, max_size=6))} = {draw(toml_snippets)}"]
    return "\n".join(lines)


@FUZZ
@given(text=toml_text())
def test_fuzz_toml_config(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("toml") / "c.toml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass") if _encodable(text) else p.write_bytes(b"\xff")
    cfg = _only_csn_error(load_config_file, p)
    assert cfg is None or isinstance(cfg, TrainConfig)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@FUZZ
@given(data=st.dictionaries(keys, values, max_size=6) | values)
def test_fuzz_yaml_config(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("yaml") / "c.yaml"
    if not _encodable(str(data)):
        return
    p.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    cfg = _only_csn_error(load_config_file, p)
    if cfg is not None and isinstance(data, dict):
        back = yaml.safe_load(p.read_text(encoding="utf-8"))
        _same_meaning(cfg, {str(k).replace("-", "_"): v for k, v in back.items() if k != "preset"})


@FUZZ
@given(text=st.text(max_size=120) | st.binary(max_size=60))
def test_fuzz_yaml_text(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("yamltext") / "c.yml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    elif _encodable(text):
        p.write_text(text, encoding="utf-8")
    else:
        return
    cfg = _only_csn_error(load_config_file, p)
    assert cfg is None or isinstance(cfg, TrainConfig)


@FUZZ
@given(data=st.dictionaries(keys, values, max_size=6))
def test_fuzz_config_dict(data):
    cfg = _only_csn_error(TrainConfig.from_dict, data)
    if cfg is not None:
        _same_meaning(cfg, data)


def _same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN (values that went through a YAML round trip)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _same_meaning(cfg: TrainConfig, data: dict) -> None:
    """Every value that was accepted means what was written (numbers equal, text as written)."""
    for k, v in data.items():
        got = getattr(cfg, k)
        if v is None:
            assert got is None
        elif isinstance(v, bool):
            assert got is v  # only bool fields accept a bool
        elif isinstance(got, bool):
            if isinstance(v, str):
                assert got is (v.strip().lower() in TRUE_WORDS), (k, v, got)
            else:
                assert v in (0, 1) and got is bool(v), (k, v, got)
        elif isinstance(v, (int, float)):
            assert (isinstance(got, str) and got == str(v)) or (not isinstance(got, str) and float(got) == float(v))
        elif isinstance(v, str):
            if isinstance(got, list):
                items = [x.strip() for x in v.split(",") if x.strip()]
                assert got == items or [float(g) for g in got] == [float(x) for x in items], (k, v, got)
            elif isinstance(got, str):
                assert got == v
            else:
                assert float(got) == float(v), (k, v, got)
        else:
            assert _same(got, v), (k, v, got)


# ============================================================================ key=value overrides
TEXT_KEYS = [k for k in KEYS if _base(k) is str]
INT_KEYS = [k for k in KEYS if _base(k) is int]
FLOAT_KEYS = [k for k in KEYS if _base(k) is float]
BOOL_KEYS = [k for k in KEYS if _base(k) is bool]


@FUZZ
@given(pairs=st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", keys, st.text(max_size=20)),
                      max_size=4))
def test_fuzz_overrides_never_crash(pairs):
    cfg = _only_csn_error(TrainConfig().override, pairs)
    assert cfg is None or isinstance(cfg, TrainConfig)


@FUZZ
@given(key=st.sampled_from(TEXT_KEYS),
       text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=20).map(str.strip).filter(
           lambda t: t.lower() not in ("none", "null") and not t.startswith('"')))
def test_fuzz_text_override_is_taken_as_typed(key, text):
    """name=1e5 is the name '1e5' (not '100000.0'), reg_window=5:end is '5:end', ..."""
    assert getattr(TrainConfig().override([f"{key}={text}"]), key) == text


def _in_range(key: str, x: float) -> bool:
    """Whether x lies within the range the schema declares for `key` (Field(ge=..., gt=..., lt=..., le=...))."""
    ok = True
    for m in TrainConfig.model_fields[key].metadata:
        for attr, holds in (("ge", lambda v: x >= v), ("gt", lambda v: x > v), ("le", lambda v: x <= v),
                            ("lt", lambda v: x < v)):
            if getattr(m, attr, None) is not None:
                ok = ok and holds(getattr(m, attr))
    return ok


def test_every_number_key_declares_its_range():
    """The ranges are declared on the schema (the fuzz tests below read them from there); a few by name."""
    assert not _in_range("lr", 0) and _in_range("lr", 1e-9) and not _in_range("momentum", 1) and _in_range("momentum", 0)
    assert not _in_range("seed", 2**63) and _in_range("seed", 2**63 - 1) and not _in_range("seed", -1)
    assert not _in_range("log_every", 0) and not _in_range("threads", 0) and not _in_range("weight_decay", -1e-12)
    unbounded = [k for k in INT_KEYS + FLOAT_KEYS if _in_range(k, -1e300) and _in_range(k, 1e300)]
    assert unbounded == ["reg_alpha"], unbounded  # alpha may take either sign


@FUZZ
@given(key=st.sampled_from(INT_KEYS), n=st.integers(-10**12, 10**12) | st.sampled_from([0, 1, -1, 2**63 - 1, 2**63]),
       quoted=st.booleans())
def test_fuzz_int_override_round_trips(key, n, quoted):
    """In range: the value round-trips exactly. Out of range: one CsnError naming the key and its bound."""
    value = json.dumps(str(n)) if quoted else str(n)
    if _in_range(key, n):
        assert getattr(TrainConfig().override([f"{key}={value}"]), key) == n
    else:
        with pytest.raises(CsnError, match=rf"^config key '{key}' must be [<>]=? \S+, got "):
            TrainConfig().override([f"{key}={value}"])


@FUZZ
@given(key=st.sampled_from(FLOAT_KEYS),
       x=st.floats(allow_nan=False, allow_infinity=False, width=64) | st.sampled_from([0.0, 0.5, 1.0, -0.0, 1e-300]))
def test_fuzz_float_override_round_trips(key, x):
    """In range: the value round-trips exactly. Out of range: one CsnError naming the key and its bound."""
    if _in_range(key, x):
        assert getattr(TrainConfig().override([f"{key}={x!r}"]), key) == x
    else:
        with pytest.raises(CsnError, match=rf"^config key '{key}' must be [<>]=? \S+, got "):
            TrainConfig().override([f"{key}={x!r}"])


@FUZZ
@given(key=st.sampled_from(INT_KEYS + FLOAT_KEYS),
       junk=st.sampled_from(["nan", "NaN", "inf", "-Infinity", "1e400", "٣", "１", "0x10", "1.5.2", "true",
                             "[1]", "{}", "", " ", "1e", "1,000"]))
def test_numbers_written_oddly_are_refused_not_reinterpreted(key, junk):
    """Values Python would silently read as another number (non-ASCII digits, nan, hex) are refused."""
    with pytest.raises(CsnError, match=f"config key '{key}'"):
        TrainConfig().override([f"{key}={junk}"])


@pytest.mark.parametrize("text, value", [("1_000", 1000), ("+7", 7), (" 12 ", 12), ("12.0", 12)])
def test_numbers_are_read_as_python_toml_and_yaml_read_them(text, value):
    """Digit separators, a plus sign, spaces and an integral float mean the number they spell (1_000 = 1000 in
    Python, TOML and YAML alike); a fractional value for an integer key is refused."""
    assert TrainConfig().override([f"seed={text}"]).seed == value
    assert TrainConfig().override([f"lr={text}"]).lr == float(value)
    with pytest.raises(CsnError, match="config key 'seed'"):
        TrainConfig().override(["seed=12.5"])


@FUZZ
@given(key=st.sampled_from(BOOL_KEYS), text=st.sampled_from(["true", "false", "True", "FALSE", "1", "0", "yes", "no"]))
def test_bool_override(key, text):
    assert getattr(TrainConfig().override([f"{key}={text}"]), key) is (text.lower() in ("true", "1", "yes"))


# ============================================================================ schedule strings
@FUZZ
@given(spec=st.text(st.sampled_from("0123456789.:,-+e steplogndaSTEPLOG="), max_size=30) | st.text(max_size=20),
       spe=st.integers(1, 50), epochs=st.floats(0.05, 20))
def test_fuzz_checkpoint_spec(spec, spe, epochs):
    steps = _only_csn_error(checkpoint_steps, spec, spe, epochs)
    if steps is not None:
        total = round(epochs * spe)
        assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == total
        assert all(isinstance(s, int) and 0 <= s <= total for s in steps)


@FUZZ
@given(spec=st.text(st.sampled_from("0123456789.*@:,- enda+Ee"), max_size=30) | st.text(max_size=20))
def test_fuzz_alpha_string_round_trips(spec):
    sched = _only_csn_error(alpha_schedule, spec)
    if sched is not None:
        assert alpha_schedule(str(sched)) == sched  # the canonical form means the same schedule


# ============================================================================ checkpoint selectors
CKPTS = [Checkpoint(s, s / 8, f"step-{s:08d}.safetensors", "0" * 64) for s in (0, 1, 2, 4, 8, 16, 24)]


@FUZZ
@given(spec=st.text(st.sampled_from("0123456789.:,e-+ lastfirndl_p="), max_size=20) | st.text(max_size=15))
@example('einf')
@example('enan')
@example('1_6')
@example('e1e400')
@example('nan:1')
@example('٨')
@example('-1:inf')
@example('step=1e3')
@example('f1.5')
def test_fuzz_checkpoint_selector(spec):
    chosen = _only_csn_error(select_checkpoints, CKPTS, spec, note=lambda m: None)
    if chosen is not None:
        assert chosen and all(c in CKPTS for c in chosen) and chosen == sorted(chosen, key=lambda c: c.step)
        side = r"(?:step=[0-9]+|f[0-9.eE+-]+|e?[0-9.eE+-]+|end|last|first|all|step=end)?"
        for tok in spec.split(","):  # numbers are plain finite decimals: no nan/inf, '1_6' or non-ASCII digits
            assert re.fullmatch(rf"{side}(?::{side})?", tok.strip().lower()), spec
            assert "inf" not in tok and "nan" not in tok, spec


@FUZZ
@given(steps=st.lists(st.sampled_from([c.step for c in CKPTS]), min_size=1, max_size=5))
def test_selector_of_steps_means_those_steps(steps):
    assert [c.step for c in select_checkpoints(CKPTS, ",".join(f"step={s}" for s in steps))] == sorted(set(steps))


@FUZZ
@given(e=st.floats(0, 3), a=st.floats(0, 3), b=st.floats(0, 3))
def test_selector_epochs_and_ranges_mean_what_they_say(e, a, b):
    """An epoch is the step round(e * steps_per_epoch) (8 here); a point its nearest checkpoint (the earlier on a
    tie), a range every checkpoint between its ends' steps."""
    for text in (f"e{e!r}", f"{e!r}"):
        near = select_checkpoints(CKPTS, text, note=lambda m: None)
        want = round(e * 8)
        assert len(near) == 1 and near[0].step == min((c.step for c in CKPTS), key=lambda s: (abs(s - want), s))
    for outside in (-e - 0.01, CKPTS[-1].epoch + e + 0.01):  # no nearest checkpoint outside the run: refused
        with pytest.raises(CsnError, match="after the run's last checkpoint|not a point in training"):
            select_checkpoints(CKPTS, f"e{outside!r}")
    lo, hi = min(a, b), max(a, b)
    got = _only_csn_error(select_checkpoints, CKPTS, f"{lo!r}:{hi!r}")
    want = [c for c in CKPTS if round(lo * 8) <= c.step <= round(hi * 8)]
    assert got == (want or None)


# ============================================================================ layer patterns
@pytest.fixture(scope="module")
def small_model():
    from csn.models import create_model

    return create_model("resnet8", num_classes=4, in_channels=1, width=0.5, image_size=8)


@FUZZ
@given(patterns=st.lists(st.text(st.sampled_from("layer123.*?[]!^\\-_ab0"), max_size=12) | st.text(max_size=8),
                         max_size=3) | st.text(max_size=10))
def test_fuzz_layer_patterns(small_model, patterns):
    from csn.core.units import resolve_layers

    names = [n for n, _ in small_model.named_modules() if n]
    got = _only_csn_error(resolve_layers, small_model, patterns)
    if got is not None:
        assert set(got) <= set(names) and got == sorted(got, key=names.index)
        assert got or patterns == []  # (an empty list of patterns gives no layers; see the reliability report)


@FUZZ
@given(data=st.data())
def test_exact_layer_names_resolve_to_themselves(small_model, data):
    from csn.core.units import resolve_layers

    name = data.draw(st.sampled_from([n for n, _ in small_model.named_modules() if n]))
    assert resolve_layers(small_model, [name]) == [name]


# ============================================================================ manifests
entry = st.fixed_dictionaries(
    {"step": st.integers(0, 10**6) | values, "epoch": st.floats(0, 100) | values,
     "file": st.sampled_from(["step-00000001.safetensors", "../x", "/etc/passwd", "a\\b", ".hidden", "", "x\x00y"])
     | st.text(max_size=12) | values,
     "sha256": st.just("a" * 64) | st.text(max_size=70) | values},
    optional={"metrics": st.dictionaries(st.text(max_size=5), st.floats()) | values, "extra": values})
line = st.builds(json.dumps, entry) | st.builds(json.dumps, values) | st.text(max_size=40)


@FUZZ
@given(lines=st.lists(line, max_size=5))
def test_fuzz_manifest_lines(tmp_path_factory, lines):
    d = tmp_path_factory.mktemp("m")
    text = "\n".join(lines)
    if not _encodable(text):
        return
    (d / MANIFEST).write_text(text, encoding="utf-8")
    ckpts = _only_csn_error(read_manifest, d)
    if ckpts is not None:  # accepted: each entry is exactly what its line says, and names a plain file
        parsed = [json.loads(x) for x in text.split("\n") if x.strip()]
        assert len(ckpts) == len(parsed)
        for c in ckpts:
            src = next(p for p in parsed if p["step"] == c.step)
            assert (c.epoch, c.file, c.sha256) == (src["epoch"], src["file"], src["sha256"])
            assert _same(c.metrics, src.get("metrics", {}))
            assert type(src["step"]) is int and math.isfinite(c.epoch)
            assert Path(c.file).name == c.file and not c.file.startswith(".") and "\\" not in c.file


@FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzz_manifest_bytes(tmp_path_factory, raw):
    d = tmp_path_factory.mktemp("mb")
    (d / MANIFEST).write_bytes(raw)
    _only_csn_error(read_manifest, d)


# ============================================================================ the command line
class _WouldTrain(Exception):
    """Raised instead of training: the command line got through parsing and validation."""


@settings(max_examples=max(10, EXAMPLES * 2 // 3), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(st.sampled_from(["--epochs", "--seed", "--checkpoints", "--reg-alpha", "--reg-window",
                                      "--model", "--dataset", "--threads", "name=../x", "epochs=nan", "seed=1_0",
                                      "lr=-1", "bogus=1", "x", "=", "--resume", "--force", "1e9", "-3", "a:b",
                                      "0:end:0", "name=ok", "--preset", "smoke", "nope"]), max_size=6))
def test_fuzz_train_command_line(tmp_path_factory, monkeypatch, args):
    """Random `csn train` argument lists: exit 2 with `error: ...`, click's usage error, or training
    would start -- never a traceback."""
    import csn.training.loop as loop
    from csn.cli import main

    def would_train(*a, **k):
        raise _WouldTrain

    monkeypatch.setattr(loop, "train", would_train)
    monkeypatch.chdir(tmp_path_factory.mktemp("cli"))
    r = CliRunner().invoke(main, ["train", *args])
    if isinstance(r.exception, _WouldTrain):
        return
    assert r.exit_code == 2, (args, r.output, r.exception)
    assert r.output.strip().startswith(("error:", "Usage:")) or "Error:" in r.output, (args, r.output)
    assert "Traceback" not in r.output
