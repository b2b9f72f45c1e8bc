"""The one validation layer: frozen pydantic models for every config, preset and option group.

Every object a user can configure (a training config, an analysis's options, a study) is a `Schema`:
a frozen pydantic v2 model that rejects unknown keys and validates types and ranges once. Its errors
become one-line CsnErrors that name the key, what it expects and what was given (`schema_error`).
"""

from __future__ import annotations

import json
import tomllib
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from csn.errors import CsnError, unknown

S = TypeVar("S", bound="Schema")

_EXPECTS = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "a whole number",
    "float_parsing": "a float", "float_type": "a float", "finite_number": "a finite number",
    "bool_parsing": "a boolean (true or false)", "bool_type": "a boolean (true or false)",
    "string_type": "a string", "list_type": "a list", "tuple_type": "a list", "dict_type": "a table of key = value pairs",
    "model_type": "a table of key = value pairs", "literal_error": None, "none_required": "nothing",
}


class Schema(BaseModel):
    """A frozen, validated options object: unknown keys are errors, numbers are never read from bools.

    `parse(data, what=...)` validates a mapping and turns a pydantic error into a CsnError;
    `replace(**changes)` returns a validated copy.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, coerce_numbers_to_str=True,
                              validate_default=False)

    @classmethod
    def parse(cls: type[S], data: Mapping[str, Any] | None = None, *, what: str = "option", flags: bool = False) -> S:
        """Validate `data` (a mapping) into this schema, or raise one CsnError naming the first bad key.

        what: how a key is called in messages ("config key"); flags=True names keys as command-line
        options instead (--bn-recalibrate).
        """
        data = {} if data is None else data
        if not isinstance(data, Mapping):
            raise CsnError(f"{what}s must be a table of key = value pairs, got {type(data).__name__}.")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise schema_error(e, cls, what, flags=flags) from None

    def replace(self: S, **changes: Any) -> S:
        """A validated copy with some fields changed."""
        return type(self).parse({**self.model_dump(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible data (lists for tuples)."""
        return self.model_dump(mode="json")


def schema_error(err: ValidationError, model: type[BaseModel], what: str = "option", *, flags: bool = False) -> CsnError:
    """One sentence for the first error of a pydantic validation: unknown key (with the closest valid
    one), or the key, what it expects and what it got (flags=True: keys named as --options)."""
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ()) if not isinstance(p, int)]
    key = ".".join(loc) or "value"
    kind, value = first.get("type", ""), first.get("input")
    if kind == "extra_forbidden":
        return unknown(what, key, [".".join(loc[:-1] + [f]) for f in _nested_model(model, loc[:-1]).model_fields])
    name = f"--{loc[0].replace('_', '-')}" if flags and loc else f"{what} {key!r}"
    if kind == "missing":
        return CsnError(f"{name} is required; give it a value.")
    ctx = first.get("ctx", {})
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
              "less_than_equal": "<= {le}"}
    if kind in bounds:
        limit = bounds[kind].format(**{k: _number(v) for k, v in ctx.items()})
        return CsnError(f"{name} must be {limit}, got {_show(value)}{_hint(model, loc)}.")
    if kind == "string_pattern_mismatch":
        return CsnError(f"{name} must match {ctx.get('pattern')}, got {_show(value)}.")
    expects = _EXPECTS.get(kind)
    if kind == "literal_error":
        expects = "one of " + ctx.get("expected", "the listed values")
    if expects is None:
        msg = first.get("msg", "is invalid")
        msg = msg.removeprefix("Value error, ")
        msg = msg[0].lower() + msg[1:]
        if isinstance(value, (dict, list)):  # a check of a whole table (a model validator): the message says it all
            return CsnError(f"{msg.rstrip('.')}." if not loc else f"{name}: {msg.rstrip('.')}.")
        return CsnError(f"{name}: {msg.rstrip('.')}, got {_show(value)}.")
    return CsnError(f"{name} expects {expects}, got {_show(value)}.")


def _number(v: Any) -> str:
    """A bound as a reader takes it in: 2**63 rather than 9223372036854775808."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= 2**20 and v & (v - 1) == 0:
        return f"2**{v.bit_length() - 1}"
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return str(v)


def _hint(model: type[BaseModel], loc: list[str]) -> str:
    """A field's `range_hint` (json_schema_extra): why its bound is there and how to go past it."""
    field = model.model_fields.get(loc[0]) if len(loc) == 1 else None
    extra = field.json_schema_extra if field is not None and isinstance(field.json_schema_extra, dict) else {}
    return f" ({extra['range_hint']})" if extra.get("range_hint") else ""
def _schema_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class an annotation holds (itself, or inside Optional/Annotated), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _schema_in(arg)
        if found is not None:
            return found
    return None


def _nested_model(model: type[BaseModel], path: Sequence[str]) -> type[BaseModel]:
    """The model class of the nested table at `path` (['ablation'] of a Study: AblationOptions)."""
    for part in path:
        field = model.model_fields.get(part)
        inner = _schema_in(field.annotation) if field is not None else None
        if inner is None:
            return model
        model = inner
    return model


def parse_override(text: str, *, text_field: bool) -> Any:
    """The value of a `key=value` override: parsed as JSON where possible (numbers, lists, true/false), else as a
    TOML inline table or array ({num_train = 512}), else the text; none/null is None. A text field takes the text as typed (name=1e5 is the name '1e5'), a JSON-quoted
    string unquoted (how CLI flags pass values)."""
    v = text.strip()
    if v.lower() in ("none", "null"):
        return None
    if text_field:
        if v.startswith('"'):
            try:
                out = json.loads(v)
            except json.JSONDecodeError:
                return v
            return out if isinstance(out, str) else v
        return v
    try:
        return json.loads(v)
    except (json.JSONDecodeError, RecursionError):
        pass
    if v[:1] in ("{", "["):  # TOML's inline form, as --print-config writes it: synthetic={num_train = 512}
        try:
            return tomllib.loads(f"v = {v}")["v"]
        except (tomllib.TOMLDecodeError, RecursionError):
            pass
    return v


def set_override(model: type[BaseModel], data: dict[str, Any], pair: str, what: str = "config key") -> None:
    """Apply one `key=value` override to `data` (the plain dict of a `model`); the key may be dotted into
    nested tables (ablation.draws=5). An unknown key names the closest valid one."""
    if "=" not in pair:
        raise CsnError(f"override {pair!r} is not of the form key=value; write e.g. epochs=3.")
    key, text = pair.split("=", 1)
    parts = [p.strip().replace("-", "_") for p in key.split(".")]
    node, cls = data, model
    for i, part in enumerate(parts):
        if part not in cls.model_fields:
            raise unknown(what, ".".join(parts[: i + 1]), [".".join(parts[:i] + [f]) for f in cls.model_fields])
        if i == len(parts) - 1:
            break
        inner = _schema_in(cls.model_fields[part].annotation)
        if inner is None:
            raise CsnError(f"{what} {'.'.join(parts[: i + 1])!r} is a value, not a table; write "
                           f"{'.'.join(parts[: i + 1])}=VALUE.")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, cls = node[part], inner
    annotation = cls.model_fields[parts[-1]].annotation
    node[parts[-1]] = parse_override(text, text_field=annotation is str or annotation == (str | None))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------------
# shared field types
# ------------------------------------------------------------------------------------------------

def _no_bool(v: Any) -> Any:
    """Numbers are never read from booleans (true is not 1)."""
    if isinstance(v, bool):
        raise ValueError("expects a number, not a boolean")
    return v


def _comma_list(v: Any) -> Any:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c'] (a list may be given as one comma-separated string)."""
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    if isinstance(v, (list, tuple)):
        out = []
        for item in v:
            out.extend(_comma_list(item) if isinstance(item, str) else [item])
        return out
    return v


def _all_is_none(v: Any) -> Any:
    """'all' (any case) means None: the whole split."""
    if isinstance(v, str) and v.strip().lower() == "all":
        return None
    return v


NoBool = BeforeValidator(_no_bool)
"""Attach to a numeric field (Annotated[int, NoBool]) so booleans are refused."""
CommaList = BeforeValidator(_comma_list)
"""Attach to a list/tuple field so 'a,b' and repeated values both work."""
AllIsNone = BeforeValidator(_all_is_none)
"""Attach to an optional count so 'all' means None."""

Int = Annotated[int, NoBool]
Float = Annotated[float, NoBool]
MAX_SEED = 2**63 - 1
"""Seeds are stored as int64 (tables, torch generators): 0 <= seed < 2**63."""
Seed = Annotated[int, NoBool, Field(ge=0, lt=MAX_SEED + 1)]
MAX_SEEDS = 100
"""The most seeds one experiment or study takes (each is a training run per condition plus its analyses)."""
SEEDS_HINT = "each seed is one training run per condition plus its analyses: 100 seeds already means hundreds of runs"


__all__ = ["Schema", "schema_error", "parse_override", "set_override", "NoBool", "CommaList", "AllIsNone", "Int", "Float",
           "Seed", "MAX_SEED", "MAX_SEEDS", "SEEDS_HINT"]
