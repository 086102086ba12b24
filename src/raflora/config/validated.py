"""Validated configurations: the mark :func:`validated` leaves, what the engines require, and
derivations (:func:`with_changes`) that keep a configuration validated exactly once.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raflora.config import checks
from raflora.config.sections import RunConfig
from raflora.schema import (
    ConfigError,
    check_fields,
    coerce,
    hints,
    is_section,
    thaw,
    unknown_key,
)

if TYPE_CHECKING:
    from raflora.methods.options import MethodOptions

__all__ = [
    "is_validated",
    "key_problem",
    "method_options_of",
    "require_validated",
    "validated",
    "with_changes",
]


@dataclass(frozen=True)
class _Validated:
    """What validation leaves on a config: the methods it was checked for and the method's
    options, parsed once (the federation builds the method from them).
    """

    methods: tuple[str, ...]
    options: MethodOptions | None


_MARK = "_raflora_validated"
"""The attribute a validated :class:`RunConfig` carries (set by :func:`validated` only; kept by
pickling and deep copies, dropped by ``dataclasses.replace``, whose result is a new config)."""


def validated(config: RunConfig, *, methods: Sequence[str] | None = None) -> RunConfig:
    """``config`` validated: checked once, marked, and returned (the only way to get a config
    the engines accept; :func:`load_config`, :func:`config_from_dict` and :func:`with_changes`
    call it).

    Parameters
    ----------
    config : RunConfig
        A configuration (frozen; possibly holding values of the wrong type).
    methods : sequence of str, optional
        The methods the config will run (``raflora compare``); default: ``config.method``.

    Returns
    -------
    RunConfig
        ``config`` itself, now marked validated, with its method's options parsed.

    Raises
    ------
    ConfigError
        With every problem found.
    """
    problems, options = checks.check(config, methods)  # looked up here: tests count calls
    if problems:
        raise ConfigError(problems)
    run = tuple(methods) if methods is not None else (config.method,)
    object.__setattr__(config, _MARK, _Validated(run, options))
    return config


def is_validated(config: object) -> bool:
    """Whether ``config`` is a :class:`RunConfig` that went through :func:`validated`."""
    return isinstance(config, RunConfig) and isinstance(getattr(config, _MARK, None), _Validated)


def require_validated(config: object) -> RunConfig:
    """``config`` if it is a validated :class:`RunConfig` (what the engines take).

    Raises
    ------
    ConfigError
        It is not a RunConfig, or was built directly or by ``dataclasses.replace`` rather than
        by :func:`load_config`, :func:`config_from_dict` or :func:`with_changes`.
    """
    if not isinstance(config, RunConfig):
        raise ConfigError([f"expected a RunConfig, got {type(config).__name__}"])
    if not is_validated(config):
        raise ConfigError(
            [
                "the configuration was not validated: build it with raflora.config.load_config "
                "or config_from_dict, and derive others with with_changes (a RunConfig made "
                "directly or by dataclasses.replace is not checked)"
            ]
        )
    return config


def method_options_of(config: RunConfig) -> MethodOptions:
    """The typed options of ``config.method``, parsed once when ``config`` was validated.

    Raises
    ------
    ConfigError
        ``config`` was not validated (:func:`require_validated`).
    """
    mark: _Validated = getattr(require_validated(config), _MARK)
    assert mark.options is not None  # a validated config's method and options are valid
    return mark.options


_CROSS_CHECKED = ("method", "method_options", "fl", "data", "lora")
"""Keys (and sections) that :func:`validate` checks against each other or by building the
method; every other key is valid exactly when its own type and bounds hold."""


def with_changes(
    config: RunConfig,
    changes: Mapping[str, Any],
    *,
    methods: Sequence[str] | None = None,
) -> RunConfig:
    """A new validated configuration: ``config`` with dotted keys replaced.

    ``with_changes(cfg, {"train.lr": 1e-3, "output.dir": "runs/x"})``; values are coerced as
    when loading (an int into a float field). ``config`` itself is unchanged (it is frozen).

    When ``config`` is validated and no changed key is among those checked against others
    (``method``, ``method_options``, ``fl.*``, ``data.*``, ``lora.*``), only the fields' own
    types and bounds are checked and the new config keeps ``config``'s validation (its parsed
    method options): the rest of it was validated once already. Otherwise the new config is
    validated in full (:func:`validated`).

    Parameters
    ----------
    config : RunConfig
        The configuration to derive from (validated or not).
    changes : Mapping[str, Any]
        Dotted key → new value.
    methods : sequence of str, optional
        The methods the new config will run (default: its ``method``).

    Returns
    -------
    RunConfig
        The new configuration, validated.

    Raises
    ------
    ConfigError
        An unknown key, or with every problem of the new configuration.
    """
    problems: list[str] = []
    nested: dict[str, Any] = {}
    for key, value in changes.items():
        parts = key.split(".")
        if not key_problem(key, parts, value, problems):
            _set_change(config, nested, parts, value)
    if problems:
        raise ConfigError(problems)
    new: RunConfig = _replace(config, nested)
    local = not any(key.split(".")[0] in _CROSS_CHECKED for key in changes)
    if not (local and methods is None and is_validated(config)):
        return validated(new, methods=methods)
    check_fields(new, "", problems, set())  # the unchanged fields passed this already
    if problems:
        raise ConfigError(problems)
    object.__setattr__(new, _MARK, getattr(config, _MARK))
    return new


def _set_change(
    config: RunConfig, nested: dict[str, Any], parts: Sequence[str], value: Any
) -> None:
    """Put one dotted change into ``nested``. A key below a mapping field (``task.options.x``,
    ``method_options.raflora.k``) is merged into that field's current value, as an override is,
    instead of replacing the whole mapping.
    """
    node: dict[str, Any] = nested
    obj: Any = config
    for i, part in enumerate(parts[:-1]):
        tp = hints(type(obj))[part] if dataclasses.is_dataclass(obj) else None
        if tp is not None and typing.get_origin(tp) is dict:
            # the mapping field itself: start from its current contents (once per change set)
            current = node.get(part)
            if not isinstance(current, dict):
                current = thaw(getattr(obj, part))
                node[part] = current
            inner: dict[str, Any] = current
            for sub in parts[i + 1 : -1]:
                child = inner.get(sub)
                if not isinstance(child, dict):
                    child = {}
                    inner[sub] = child
                inner = child
            inner[parts[-1]] = value
            return
        node = node.setdefault(part, {})
        obj = getattr(obj, part) if dataclasses.is_dataclass(obj) else None
    node[parts[-1]] = value


def _replace(obj: Any, nested: Mapping[str, Any]) -> Any:
    types_ = hints(type(obj))
    kwargs = {
        k: _replace(getattr(obj, k), v) if is_section(types_[k]) else coerce(thaw(v), types_[k])
        for k, v in nested.items()
    }
    return dataclasses.replace(obj, **kwargs)


def key_problem(key: str, parts: Sequence[str], value: object, problems: list[str]) -> bool:
    """Check a dotted key against the schema (a problem is appended); ``True`` if bad.

    Keys below a mapping field (``task.options.x``, ``method_options.raflora``) are free.
    """
    cls: type[Any] | None = RunConfig
    prefix = ""
    for i, part in enumerate(parts):
        if cls is None:
            break
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            problems.append(unknown_key(prefix, part, names))
            return True
        tp = hints(cls)[part]
        prefix = f"{prefix}.{part}" if prefix else part
        last = i == len(parts) - 1
        if is_section(tp):
            if last and not isinstance(value, Mapping):
                problems.append(f"{prefix} is a section; set its keys")
                return True
            cls = tp
        elif typing.get_origin(tp) is dict:
            cls = None
        elif not last:
            problems.append(f"{prefix} is not a section")
            return True
    return False
