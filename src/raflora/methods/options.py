"""Typed method options: one frozen dataclass per method, checked like the run configuration.

A method declares its options as a frozen dataclass deriving from :class:`MethodOptions`, one
field per option made with :func:`option` (default, help text, optional numeric bounds); a
``Literal`` annotation gives the allowed values::

    @dataclass(frozen=True)
    class RaFLoRAOptions(MethodOptions):
        empty_partition: Literal["carry", "drop"] = option("carry", "What an empty ...")

Building one checks every field strictly — a bool is only ``True``/``False`` (never ``"no"`` or
``0``), an int is not a bool, a float also takes an int or a float-like string such as ``"1e-3"``
(YAML leaves those unparsed) — then the bounds and :meth:`MethodOptions.check`, and raises one
:class:`OptionsError` listing every problem.

A run's ``method_options`` mapping is resolved for the methods of a run (or comparison) by
:func:`resolve_options`: a key that is a method's name holds that method's options; any other
key applies to every method of the run that declares it, and is an error when none does.

The type helpers (:func:`check_type`, :func:`coerce`, :func:`type_name`) are shared with
:mod:`raflora.config`, so method options and config keys follow the same rules.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union

__all__ = [
    "Bounds",
    "MethodOptions",
    "OptionSpec",
    "OptionsError",
    "check_type",
    "coerce",
    "describe_options",
    "did_you_mean",
    "option",
    "option_specs",
    "parse_options",
    "resolve_options",
    "type_name",
    "value_type",
]

_T = TypeVar("_T")
_O = TypeVar("_O", bound="MethodOptions")


# --------------------------------------------------------------------------------------------
# Types (shared with raflora.config)
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
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "mapping"
    if tp is Any:
        return "any"
    return str(getattr(tp, "__name__", tp))


def value_type(value: object) -> str:
    """The YAML-facing name of ``value``'s type (``null`` for ``None``)."""
    return "null" if value is None else type(value).__name__


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
    """Lenient conversions YAML needs: ints and float-like strings into float fields."""
    if _accepts_float(tp) and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
    args = _union_args(tp)
    list_types = [a for a in (args or (tp,)) if typing.get_origin(a) is list]
    if list_types and isinstance(value, (list, tuple)):
        (item,) = typing.get_args(list_types[0])
        return [coerce(v, item) for v in value]
    return value


def did_you_mean(key: object, valid: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``valid``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------
# Declaring options
# --------------------------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Bounds:
    """Numeric bounds of an option: ``gt``/``ge`` below, ``lt``/``le`` above (``None``: open)."""

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


def option(
    default: _T,
    help: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> _T:
    """A method option: a dataclass field with its default, help text and numeric bounds.

    Parameters
    ----------
    default : Any
        The default value (immutable: a bool, number, string or ``None``).
    help : str
        One sentence for ``raflora config`` and the error messages.
    gt, ge, lt, le : float, optional
        Bounds of a numeric option (greater than, at least, less than, at most); a value
        outside them, or not finite, is refused.
    """
    metadata: dict[str, Any] = {"help": help}
    bounds = Bounds(gt, ge, lt, le)
    if bounds != Bounds():
        metadata["bounds"] = bounds
    out: _T = field(default=default, metadata=metadata)
    return out


@dataclass(frozen=True)
class OptionSpec:
    """What a method declares about one option (read from its dataclass field)."""

    name: str
    type: Any
    default: Any
    help: str
    bounds: Bounds | None = None

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The allowed values of a ``Literal`` option, else ``None``."""
        if typing.get_origin(self.type) is Literal:
            return typing.get_args(self.type)
        return None

    def problem(self, value: object) -> str | None:
        """Why ``value`` is not a valid value of this option, or ``None``."""
        if not check_type(value, self.type):
            if self.choices is not None:
                allowed = ", ".join(repr(c) for c in self.choices)
                return f"must be one of {allowed}, got {value!r}"
            return f"expected {type_name(self.type)}, got {value_type(value)} {value!r}"
        if (
            self.bounds is not None
            and isinstance(value, int | float)
            and not self.bounds.contains(value)
        ):
            return f"must be a finite number {self.bounds.describe()}, got {value!r}"
        return None

    def describe(self) -> list[str]:
        """Two lines for ``raflora config``: name, type or allowed values, default; help."""
        kind = type_name(self.type)  # a Literal lists its values: 'carry' | 'drop'
        if self.bounds is not None:
            kind += f" {self.bounds.describe()}"
        return [f"  {self.name} ({kind}, default {_scalar(self.default)})", f"      {self.help}"]


def _scalar(value: object) -> str:
    """A scalar as YAML writes it (``true``, ``null``, ``carry``, ``0.001``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


class OptionsError(ValueError):
    """One or more problems with method options, each a self-contained message.

    Parameters
    ----------
    problems : Sequence[str]
        Every problem found (``"self_pruning: expected bool, got str 'no'"``).

    Attributes
    ----------
    problems : list of str
        The problems, in the order they were found.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options (a method without options uses it as is).

    Subclasses are frozen dataclasses whose fields, made with :func:`option`, are the options.
    Building one coerces float options (``1`` → ``1.0``), then checks every field's type and
    bounds and finally :meth:`check`; all problems are raised together as an
    :class:`OptionsError`.
    """

    def __post_init__(self) -> None:
        problems: list[str] = []
        for spec in option_specs(type(self)):
            value = coerce(getattr(self, spec.name), spec.type)
            object.__setattr__(self, spec.name, value)  # frozen: the coerced value
            reason = spec.problem(value)
            if reason is not None:
                problems.append(f"{spec.name}: {reason}")
        if not problems:
            problems.extend(self.check())
        if problems:
            raise OptionsError(problems)

    def check(self) -> list[str]:
        """Problems involving several options (``"name: why"``); override where needed."""
        return []


_SPECS: dict[type[MethodOptions], tuple[OptionSpec, ...]] = {}


def option_specs(cls: type[MethodOptions]) -> tuple[OptionSpec, ...]:
    """The options ``cls`` declares, in field order."""
    if cls not in _SPECS:
        _SPECS[cls] = _read_specs(cls)
    return _SPECS[cls]


def _read_specs(cls: type[MethodOptions]) -> tuple[OptionSpec, ...]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: a method option needs a default")
        specs.append(
            OptionSpec(
                f.name,
                hints[f.name],
                f.default,
                f.metadata.get("help", ""),
                f.metadata.get("bounds"),
            )
        )
    return tuple(specs)


def _names(cls: type[MethodOptions]) -> list[str]:
    return [s.name for s in option_specs(cls)]


def describe_options(method: str, cls: type[MethodOptions]) -> list[str]:
    """Help lines for ``method``'s options (``raflora config``)."""
    specs = option_specs(cls)
    lines = [f"{method}:" + ("" if specs else "  (no options)")]
    for spec in specs:
        lines.extend(spec.describe())
    return lines


# --------------------------------------------------------------------------------------------
# Parsing and resolving
# --------------------------------------------------------------------------------------------


def _parse(
    cls: type[_O], values: Mapping[str, Any], where: Mapping[str, str], owner: str
) -> tuple[_O | None, list[str]]:
    """Build ``cls`` from ``values``; problems name each key by ``where[key]``."""
    problems: list[str] = []
    names = _names(cls)
    for key in values:
        if key not in names:
            valid = f"{owner}'s options: {', '.join(names)}" if names else f"{owner} has none"
            problems.append(
                f"{where[key]}: unknown option of {owner}{did_you_mean(key, names)}; {valid}"
            )
    try:
        obj = cls(**{k: v for k, v in values.items() if k in names})
    except OptionsError as err:
        for p in err.problems:
            key, sep, reason = p.partition(": ")
            path = where.get(key) if sep else None
            problems.append(f"{path}: {reason}" if path else f"{owner}: {p}")
        return None, problems
    return (None if problems else obj), problems


def parse_options(cls: type[_O], values: Mapping[str, Any], *, owner: str) -> _O:
    """``cls`` built from plain ``values`` (keyword options of one method).

    Parameters
    ----------
    cls : type[MethodOptions]
        The method's options class.
    values : Mapping[str, Any]
        Option name → value; unknown names are errors (with a "did you mean").
    owner : str
        The method's name, for the messages (``"hetlora.self_pruning: expected bool …"``).

    Raises
    ------
    OptionsError
        With every problem.
    """
    obj, problems = _parse(cls, values, {k: f"{owner}.{k}" for k in values}, owner)
    if obj is None:
        raise OptionsError(problems)
    return obj


def _undeclared(
    key: str,
    where: str,
    declared: Mapping[str, type[MethodOptions]],
    methods_in_run: Sequence[str],
) -> str:
    """The message for a plain key that no method of the run declares."""
    run = ", ".join(methods_in_run)
    owners = [m for m in declared if key in _names(declared[m])]
    if owners:
        return (
            f"{where}.{key}: an option of {', '.join(owners)}, not of the method(s) run "
            f"({run}); set it under the method's name ({owners[0]}: {{{key}: …}}) or remove it"
        )
    valid = sorted({n for m in methods_in_run for n in _names(declared[m])})
    every = sorted({n for m in declared for n in _names(declared[m])})
    # the run's options and the method names first, then a typo of another method's option
    hint = did_you_mean(key, [*valid, *declared]) or did_you_mean(key, every)
    listed = f"options of {run}: {', '.join(valid)}" if valid else f"{run} take(s) no options"
    return f"{where}: unknown key {key!r}{hint}; {listed}; or a method name ({', '.join(declared)})"


def resolve_options(
    method_options: Mapping[str, Any],
    declared: Mapping[str, type[MethodOptions]],
    methods_in_run: Sequence[str],
    *,
    where: str = "method_options",
) -> dict[str, dict[str, Any]]:
    """The options each method of a run gets from a ``method_options`` mapping.

    A key that is a method's name holds that method's options (checked even for a method not
    in the run, so a shared config file may carry them); any other key applies to every method
    of the run that declares it. A method's own entry wins over a plain key.

    Parameters
    ----------
    method_options : Mapping[str, Any]
        What the user wrote, e.g. ``{"raflora": {"empty_partition": "drop"}, "weighting":
        "samples"}``.
    declared : Mapping[str, type[MethodOptions]]
        Every known method → its options class.
    methods_in_run : Sequence[str]
        The methods of the run or comparison (known ones).
    where : str
        How messages name the mapping.

    Returns
    -------
    dict[str, dict[str, Any]]
        Each method of the run → the options set for it (checked and coerced; defaults left
        out).

    Raises
    ------
    OptionsError
        With every problem: a plain key no method of the run declares, an unknown option of a
        method (with a "did you mean"), a value of the wrong type or out of bounds.
    """
    problems: list[str] = []
    plain = {k: v for k, v in method_options.items() if k not in declared}
    for key in plain:
        if not any(key in _names(declared[m]) for m in methods_in_run):
            problems.append(_undeclared(key, where, declared, methods_in_run))
    nested: dict[str, Mapping[str, Any]] = {}
    for method in (k for k in method_options if k in declared):
        value = method_options[method]
        if isinstance(value, Mapping):
            nested[method] = value
        else:
            problems.append(
                f"{where}.{method}: must be a mapping of {method}'s options, "
                f"got {value_type(value)} {value!r}"
            )
    out: dict[str, dict[str, Any]] = {}
    for method in [*methods_in_run, *(m for m in nested if m not in methods_in_run)]:
        names = _names(declared[method]) if method in methods_in_run else []
        values = {k: v for k, v in plain.items() if k in names}
        paths = {k: f"{where}.{k} ({method})" for k in values}
        own = nested.get(method, {})
        values.update(own)
        paths.update({k: f"{where}.{method}.{k}" for k in own})
        obj, found = _parse(declared[method], values, paths, method)
        problems.extend(p for p in found if p not in problems)
        if obj is not None and method in methods_in_run:
            out[method] = {k: getattr(obj, k) for k in values}
    if problems:
        raise OptionsError(problems)
    return out
