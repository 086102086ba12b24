"""The one schema system of raflora: typed, frozen dataclasses checked strictly, all at once.

The run configuration (:mod:`raflora.config`), every method's options
(:mod:`raflora.methods.options`) and every task's options (:mod:`raflora.tasks`) are frozen
dataclasses whose fields carry their help text and numeric bounds in ``field(metadata=...)``
(:func:`setting`). This module holds what they share:

- the strict type check and the YAML coercions (:func:`check_type`, :func:`coerce`): a bool is
  only ``True``/``False`` (never ``"no"`` or ``0``), an int is not a bool, a float field also
  takes an int or a float-like string such as ``"1e-3"`` (YAML 1.1 leaves those unparsed);
- the messages (:func:`type_problem`, :func:`Bounds.problem`, :func:`unknown_key`,
  :func:`did_you_mean`) and the one error type, :class:`ConfigError`, listing every problem;
- building a dataclass tree from plain data (:func:`build`), every problem collected;
- immutable containers (:class:`FrozenList`, :class:`FrozenDict`) so that a frozen dataclass's
  list and dict fields cannot be changed in place either;
- the JSON Schema (draft 2020-12) of a dataclass (:func:`json_schema`), with the help text as
  ``description`` and the defaults, for ``raflora config --schema`` and editors.

Why dataclasses and this small checker rather than a library (measured, December 2026, on the
installed pydantic 2.14 in strict mode, ``extra="forbid"``): of the 23 message assertions of
``tests/test_config.py`` and ``tests/test_method_options.py`` on bad input (unknown key with
"did you mean", wrong type, out of range, not among the choices), pydantic's own messages
satisfy none (0/23: ``"Input should be a valid integer"`` for ``"fl.rounds: expected int, got
str 'ten'"``, ``"Extra inputs are not permitted"`` without the valid keys), and strict mode
refuses the float-like string ``"1e-3"`` that configs rely on. Keeping the messages would need a
translation of every pydantic error type plus a lax float validator, and every method's options
class (``@dataclass(frozen=True) class X(MethodOptions)`` with :func:`option`) would have to
become a pydantic model. ``msgspec`` is not installed and has the same message problem;
``attrs`` + ``cattrs`` would replace ``dataclasses`` for no check we lack. The checker below is
~150 lines and the JSON Schema comes from the same annotations.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar, Union

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "Bounds",
    "ConfigError",
    "FrozenDict",
    "FrozenList",
    "Section",
    "build",
    "check_fields",
    "check_type",
    "coerce",
    "did_you_mean",
    "field_bounds",
    "field_default",
    "field_help",
    "field_schema",
    "fields_of",
    "freeze",
    "hints",
    "is_section",
    "json_schema",
    "setting",
    "thaw",
    "type_name",
    "type_problem",
    "unknown_key",
    "value_type",
    "yaml_scalar",
]

_T = TypeVar("_T")

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


# --------------------------------------------------------------------------------------------
# The error
# --------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """One or more problems with a configuration or with options.

    Parameters
    ----------
    problems : Sequence[str]
        Every problem found, each a self-contained message (``"fl.rounds: must be ≥ 1, got 0"``).

    Attributes
    ----------
    problems : list of str
        The problems, in the order they were found.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems)


# --------------------------------------------------------------------------------------------
# Immutable containers
# --------------------------------------------------------------------------------------------


def _immutable(*_: object, **__: object) -> NoReturn:
    raise TypeError(
        "a configuration is immutable; derive a new one with raflora.config.with_changes"
    )


class FrozenList(list[_T]):
    """A ``list`` that refuses changes in place (equal to the plain list of its items).

    Kept a ``list`` (not a tuple) so that values compare equal to what YAML gives, ``json``
    writes it as an array and every ``isinstance(x, list)`` check holds.
    """

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _immutable
    append = extend = insert = pop = remove = clear = sort = reverse = _immutable

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self))

    def __reduce__(self) -> tuple[Any, ...]:
        # pickle/deepcopy would rebuild a list subclass with append/extend, which refuse
        return (FrozenList, (list(self),))


class FrozenDict(dict[str, _T]):
    """A ``dict`` that refuses changes in place (equal to the plain dict of its items)."""

    __setitem__ = __delitem__ = __ior__ = _immutable
    clear = pop = popitem = setdefault = update = _immutable

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda kv: str(kv[0]))))

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))


@dataclass(frozen=True)
class Section:
    """Base of the frozen schema dataclasses: list and dict fields are frozen too on creation
    (:func:`freeze`), so nothing of a built instance changes in place.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            frozen = freeze(value)
            if frozen is not value:
                object.__setattr__(self, f.name, frozen)


def freeze(value: Any) -> Any:
    """``value`` with every list and dict in it (recursively) made immutable."""
    if isinstance(value, FrozenList | FrozenDict):
        return value
    if isinstance(value, list):
        return FrozenList(freeze(v) for v in value)
    if isinstance(value, dict):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    return value


def thaw(value: Any) -> Any:
    """Plain lists and dicts again (for YAML, which writes only the built-in types)."""
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def type_name(tp: Any) -> str:
    """A type annotation as a user reads it: ``int``, ``list[str] | null``, ``'a' | 'b'``."""
    args = _union_args(tp)
    if args is not None:
        return " | ".join(type_name(a) for a in args)
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is list or origin is tuple:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "mapping"
    if tp is Any:
        return "any"
    return str(getattr(tp, "__name__", tp))


def value_type(value: object) -> str:
    """The YAML-facing name of ``value``'s type (``null`` for ``None``)."""
    if value is None:
        return "null"
    if isinstance(value, FrozenList):
        return "list"
    return "dict" if isinstance(value, FrozenDict) else type(value).__name__


def check_type(value: object, tp: Any) -> bool:
    """Whether ``value`` is an instance of the annotation ``tp`` (strict: no bool-as-int)."""
    args = _union_args(tp)
    if args is not None:
        return any(check_type(value, a) for a in args)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is Literal:
        return isinstance(value, str) and value in typing.get_args(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(check_type(v, item) for v in value)
    if origin is tuple:  # tuple[T, ...]
        item = typing.get_args(tp)[0]
        return isinstance(value, tuple) and all(check_type(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, float)
    return isinstance(value, tp)


def _accepts_float(tp: Any) -> bool:
    args = _union_args(tp)
    return tp is float or (args is not None and float in args)


def coerce(value: object, tp: Any) -> object:
    """Lenient conversions YAML needs: ints and float-like strings into float fields, and
    lists into ``tuple[T, ...]`` fields.
    """
    if _accepts_float(tp) and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
    args = _union_args(tp)
    for a in args or (tp,):
        origin = typing.get_origin(a)
        if origin in (list, tuple) and isinstance(value, list | tuple):
            item = typing.get_args(a)[0]
            items = [coerce(v, item) for v in value]
            return tuple(items) if origin is tuple else items
    return value


def type_problem(value: object, tp: Any) -> str | None:
    """Why ``value`` is not of type ``tp`` (``"expected int, got str 'ten'"``), or ``None``."""
    if check_type(value, tp):
        return None
    if typing.get_origin(tp) is Literal:
        choices = ", ".join(repr(c) for c in typing.get_args(tp))
        return f"must be one of {choices}, got {value!r}"
    return f"expected {type_name(tp)}, got {value_type(value)} {value!r}"


def did_you_mean(key: object, valid: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``valid``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key(section: str, key: object, valid: Sequence[str]) -> str:
    """``"fl: unknown key 'x' (did you mean 'y'?); valid keys: …"`` (top level: no section)."""
    where = f"{section}: unknown key" if section else "unknown top-level key"
    return f"{where} {key!r}{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}"


def yaml_scalar(value: object) -> str:
    """A default as YAML writes it inline (``true``, ``null``, ``carry``, ``[8, 16]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(yaml_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_scalar(v)}" for k, v in value.items()) + "}"
    return str(value)


# --------------------------------------------------------------------------------------------
# Fields: help text and bounds
# --------------------------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Bounds:
    """Numeric bounds of a field: ``gt``/``ge`` below, ``lt``/``le`` above (``None``: open)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def contains(self, x: float) -> bool:
        """Whether ``x`` is finite and within every bound."""
        return (
            math.isfinite(x)
            and (self.gt is None or x > self.gt)
            and (self.ge is None or x >= self.ge)
            and (self.lt is None or x < self.lt)
            and (self.le is None or x <= self.le)
        )

    def describe(self) -> str:
        """The bounds as text: ``in (0, 1)``, ``≥ 0``, ``> 0``."""
        low = self.gt if self.gt is not None else self.ge
        high = self.lt if self.lt is not None else self.le
        if low is not None and high is not None:
            left = "(" if self.gt is not None else "["
            right = ")" if self.lt is not None else "]"
            return f"in {left}{_num(low)}, {_num(high)}{right}"
        parts = []
        if low is not None:
            parts.append(f"{'>' if self.gt is not None else '≥'} {_num(low)}")
        if high is not None:
            parts.append(f"{'<' if self.lt is not None else '≤'} {_num(high)}")
        return " and ".join(parts)

    def problem(self, value: object, *, integer: bool = False) -> str | None:
        """Why the number ``value`` is out of bounds, or ``None`` (non-numbers pass).

        ``integer``: the field is an int (``"must be ≥ 1, got 0"``; a float field's message
        says ``"a finite number"``, since NaN and infinities are refused too).
        """
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if self.contains(value):
            return None
        kind = "" if integer else "a finite number "
        return f"must be {kind}{self.describe()}, got {value!r}"

    def json(self) -> dict[str, float]:
        """The bounds as JSON Schema keywords."""
        out: dict[str, float] = {}
        for key, word in (
            ("gt", "exclusiveMinimum"),
            ("ge", "minimum"),
            ("lt", "exclusiveMaximum"),
            ("le", "maximum"),
        ):
            value = getattr(self, key)
            if value is not None:
                out[word] = value
        return out


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Any:
    """A schema field: its default (or ``default_factory``), help text and numeric bounds.

    Parameters
    ----------
    default : Any
        The default value (immutable: a bool, number, string, tuple or ``None``).
    help : str
        One sentence for ``raflora config``, the JSON Schema and ``docs/configuration.md``.
    default_factory : callable, optional
        Builds a mutable default (a list, dict or section).
    gt, ge, lt, le : float, optional
        Bounds of a numeric field (greater than, at least, less than, at most); a value outside
        them, or not finite, is refused.
    """
    metadata: dict[str, Any] = {"help": help}
    bounds = Bounds(gt, ge, lt, le)
    if bounds != Bounds():
        metadata["bounds"] = bounds
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_help(f: dataclasses.Field[Any]) -> str:
    """A field's help text (``""`` when it has none)."""
    return str(f.metadata.get("help", ""))


def field_bounds(f: dataclasses.Field[Any]) -> Bounds | None:
    """A field's numeric bounds, if any."""
    bounds = f.metadata.get("bounds")
    return bounds if isinstance(bounds, Bounds) else None


def field_default(f: dataclasses.Field[Any]) -> Any:
    """A field's default value (built by its factory), ``MISSING`` when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


_HINTS: dict[type, dict[str, Any]] = {}


def hints(cls: type) -> dict[str, Any]:
    """The resolved type annotations of a dataclass (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def is_section(tp: Any) -> bool:
    """Whether an annotation is a nested dataclass (a config section)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


# --------------------------------------------------------------------------------------------
# Building and checking
# --------------------------------------------------------------------------------------------


def build(cls: type[_T], data: Mapping[Any, Any], prefix: str, problems: list[str]) -> _T:
    """``cls`` built from plain data: unknown keys and non-mapping sections become problems,
    values are coerced (:func:`coerce`) but not checked (:func:`check_fields` does that).
    """
    types_ = hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            problems.append(unknown_key(prefix, key, names))
            continue
        tp = types_[key]
        path = f"{prefix}.{key}" if prefix else str(key)
        if is_section(tp):
            if value is None:
                continue  # an empty section in YAML: keep the defaults
            if not isinstance(value, Mapping):
                problems.append(f"{path}: must be a mapping, got {value_type(value)}")
                continue
            kwargs[key] = build(tp, value, path, problems)
        else:
            kwargs[key] = coerce(value, tp)
    return cls(**kwargs)


def check_fields(obj: Any, prefix: str, problems: list[str], bad: set[str]) -> None:
    """Type and bounds problems of every field of the dataclass ``obj``, recursively.

    Each problem is ``"<path>: <why>"``; the path of every field with a problem is added to
    ``bad`` (so cross-field checks can skip fields already reported).
    """
    types_ = hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp = types_[f.name]
        path = f"{prefix}.{f.name}" if prefix else f.name
        if is_section(tp) and isinstance(value, tp):
            check_fields(value, path, problems, bad)
            continue
        reason = type_problem(value, tp)
        bounds = field_bounds(f)
        if reason is None and bounds is not None and not f.metadata.get("own_check"):
            reason = bounds.problem(value, integer=isinstance(value, int))
        if reason is not None:
            bad.add(path)
            problems.append(f"{path}: {reason}")


# --------------------------------------------------------------------------------------------
# JSON Schema
# --------------------------------------------------------------------------------------------

_FLOAT_STRING = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$|^\s*[-+]?(inf|nan)\s*$"
"""A string ``float()`` reads (YAML 1.1 leaves ``1e-3`` a string; float fields accept it)."""


def _type_schema(tp: Any) -> dict[str, Any]:
    args = _union_args(tp)
    if args is not None:
        return {"anyOf": [_type_schema(a) for a in args]}
    if tp is type(None):
        return {"type": "null"}
    if tp is Any:
        return {}
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is list or origin is tuple:
        return {"type": "array", "items": _type_schema(typing.get_args(tp)[0])}
    if origin is dict:
        return {"type": "object"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"anyOf": [{"type": "number"}, {"type": "string", "pattern": _FLOAT_STRING}]}
    if tp is str:
        return {"type": "string"}
    if is_section(tp):
        return json_schema(tp)
    raise TypeError(f"no JSON Schema for the annotation {tp!r}")


def field_schema(f: dataclasses.Field[Any], tp: Any) -> dict[str, Any]:
    """One field's JSON Schema: its type, bounds, help text (``description``) and default."""
    out = _type_schema(tp)
    bounds = field_bounds(f)
    if bounds is not None:
        numeric = [s for s in out.get("anyOf", [out]) if s.get("type") in ("integer", "number")]
        for s in numeric:
            s.update(bounds.json())
    out = {**out, "description": field_help(f)} if field_help(f) else out
    default = field_default(f)
    if default is not dataclasses.MISSING and not is_section(tp):
        out["default"] = thaw(default)
    return out


def json_schema(
    cls: type, *, extra: Mapping[str, Callable[[dict[str, Any]], None]] | None = None
) -> dict[str, Any]:
    """The JSON Schema of the dataclass ``cls``: an object of its fields, nothing else.

    ``extra`` maps a field name to a function that refines that field's schema in place (the
    run config's ``method_options`` and ``task.options``, whose keys depend on the registry).
    """
    types_ = hints(cls)
    props: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        props[f.name] = field_schema(f, types_[f.name])
        if extra and f.name in extra:
            extra[f.name](props[f.name])
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    if doc:
        out["description"] = " ".join(doc.split())
    return out


def fields_of(cls: type) -> Iterable[tuple[dataclasses.Field[Any], Any]]:
    """``(field, annotation)`` of every field of the dataclass ``cls``, in order."""
    types_ = hints(cls)
    return [(f, types_[f.name]) for f in dataclasses.fields(cls)]
