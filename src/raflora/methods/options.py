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

The checker, the bounds and the error type come from :mod:`raflora.schema`, shared with the run
configuration and the tasks' options, so every key follows the same rules; :class:`OptionsError`
is a :class:`~raflora.schema.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from raflora.schema import (
    Bounds,
    ConfigError,
    check_type,
    coerce,
    did_you_mean,
    setting,
    type_name,
    type_problem,
    value_type,
    yaml_scalar,
)

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

_O = TypeVar("_O", bound="MethodOptions")


# --------------------------------------------------------------------------------------------
# Declaring options
# --------------------------------------------------------------------------------------------


option = setting
"""A method option: ``option(default, help, *, gt=, ge=, lt=, le=)`` — the schema's field
(:func:`~raflora.schema.setting`: default, help text for ``raflora config`` and the error
messages, numeric bounds). A method option must have a default (checked at registration)."""


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
        reason = type_problem(value, self.type)
        if reason is None and self.bounds is not None:
            reason = self.bounds.problem(value, integer=isinstance(value, int))
        return reason

    def describe(self) -> list[str]:
        """Two lines for ``raflora config``: name, type or allowed values, default; help."""
        kind = type_name(self.type)  # a Literal lists its values: 'carry' | 'drop'
        if self.bounds is not None:
            kind += f" {self.bounds.describe()}"
        return [
            f"  {self.name} ({kind}, default {yaml_scalar(self.default)})",
            f"      {self.help}",
        ]


class OptionsError(ConfigError):
    """Problems with method options: a :class:`~raflora.schema.ConfigError` whose text is the
    problems joined by ``"; "`` (one line, as a method's constructor reports them).

    Parameters
    ----------
    problems : Sequence[str]
        Every problem found (``"self_pruning: expected bool, got str 'no'"``).
    """

    def __str__(self) -> str:
        return "; ".join(self.problems)


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
