"""The method registry: name → :class:`~raflora.methods.base.Method` subclass, and the options
each method of a run gets from the run's ``method_options``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from raflora.methods.base import Method
from raflora.methods.options import (
    MethodOptions,
    option_specs,
    parse_options,
    resolve_options,
)

__all__ = [
    "available_methods",
    "get_aggregator",
    "method_options_classes",
    "options_for",
    "register",
    "resolve_method_options",
    "unsupported_reason",
]


_A = TypeVar("_A", bound=type[Method])
_REGISTRY: dict[str, type[Method]] = {}


def register(cls: _A) -> _A:
    """Class decorator adding an aggregator to the name registry under ``cls.name``.

    ``cls.Options`` must be a frozen :class:`MethodOptions` dataclass, and no option may share a
    name with a method (in ``method_options`` a method's name holds that method's options).
    """
    if cls.name in _REGISTRY:
        raise ValueError(f"aggregator {cls.name!r} is already registered")
    opts = cls.Options
    params = vars(opts).get("__dataclass_params__")
    if not issubclass(opts, MethodOptions) or params is None or not params.frozen:
        raise TypeError(f"{cls.name}.Options must be a frozen dataclass deriving MethodOptions")
    names = {s.name for s in option_specs(opts)}
    clash = sorted(names & (set(_REGISTRY) | {cls.name}))
    clash += [
        m for m, c in _REGISTRY.items() if cls.name in (s.name for s in option_specs(c.Options))
    ]
    if clash:
        raise ValueError(f"{cls.name}: option and method names must differ, both use {clash}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def _lookup(method: str) -> type[Method]:
    try:
        return _REGISTRY[method]
    except KeyError:
        raise ValueError(
            f"unknown method {method!r}; available: {', '.join(available_methods())}"
        ) from None


def unsupported_reason(method: str, rank_levels: Sequence[int]) -> str | None:
    """Why ``method`` cannot run with these rank levels, or ``None`` when it can.

    Raises
    ------
    ValueError
        ``method`` is not registered.
    """
    if _lookup(method).capabilities.single_rank_level and len(rank_levels) > 1:
        return "needs a single rank level (every client at the same rank)"
    return None


def method_options_classes() -> dict[str, type[MethodOptions]]:
    """Every registered method → its options class, in name order."""
    return {name: _REGISTRY[name].Options for name in available_methods()}


def resolve_method_options(
    method_options: Mapping[str, Any], methods_in_run: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """The options each method of a run or comparison gets from ``method_options``.

    A key that is a method's name holds that method's options; any other key applies to every
    method of the run that declares it, and is an error when none does (see
    :func:`~raflora.methods.options.resolve_options`).

    Raises
    ------
    OptionsError
        With every problem (an unknown method, key or option, a wrong type or value).
    """
    for method in methods_in_run:
        _lookup(method)
    return resolve_options(method_options, method_options_classes(), methods_in_run)


def options_for(
    method: str,
    method_options: Mapping[str, Any],
    *,
    methods_in_run: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The options ``method`` gets from a run's ``method_options``, as keyword arguments.

    Parameters
    ----------
    method : str
        The method to build.
    method_options : Mapping[str, Any]
        The run's ``method_options`` (plain keys and/or keys named after methods).
    methods_in_run : Sequence[str], optional
        Every method of the run or comparison (default: ``method`` alone); a plain key must be
        declared by at least one of them.

    Returns
    -------
    dict[str, Any]
        The options set for ``method`` (checked and coerced; defaults left out), ready for
        :func:`get_aggregator`.

    Raises
    ------
    OptionsError
        With every problem in ``method_options``.
    """
    run = [method] if methods_in_run is None else list(methods_in_run)
    if method not in run:
        raise ValueError(f"method {method!r} is not among the methods in the run {run}")
    return resolve_method_options(method_options, run)[method]


def get_aggregator(
    method: str, rank_levels: Sequence[int], typed: MethodOptions | None = None, /, **options: Any
) -> Method:
    """Build the aggregator registered as ``method``, from its typed options or from keyword
    arguments.

    ``typed`` is an instance of the method's :attr:`Method.Options` (parsed once when a run
    config was validated, :func:`~raflora.config.method_options_of`): used as is, not checked
    again. Otherwise the keyword ``options`` are checked by :attr:`Method.Options` (an
    :class:`OptionsError`, a ``ValueError``, lists every problem). Unknown method names list the
    known ones.
    """
    cls = _lookup(method)
    factory: Callable[..., Method] = cls
    if typed is not None:
        if options:
            raise TypeError("get_aggregator: pass typed options or keyword options, not both")
        if type(typed) is not cls.Options:
            raise TypeError(
                f"get_aggregator: {method} takes {cls.Options.__name__}, got {type(typed).__name__}"
            )
        return factory(rank_levels, typed)
    return factory(rank_levels, parse_options(cls.Options, options, owner=method))
