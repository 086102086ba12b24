"""Validation of a run configuration: every problem at once.

:func:`check` is the one pass (types and bounds from the schema, then what involves several
keys: ranks, the partition, the LoRA settings, the method and its options, the method built once
for its own checks); :func:`~raflora.config.validated` runs it once per configuration.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from raflora.config.sections import FLConfig, LoRAConfig, RunConfig
from raflora.schema import ConfigError, check_fields

if TYPE_CHECKING:
    from raflora.methods.options import MethodOptions

__all__ = ["check", "environment_problems", "validate"]


def environment_problems(config: RunConfig) -> list[str]:
    """What this installation lacks to *run* ``config`` (optional packages it asks for).

    Kept out of :func:`validate`, which also reads saved configs: exporting or inspecting a run
    made with ``output.tensorboard: true`` must work where TensorBoard is not installed.
    """
    problems: list[str] = []
    if config.output.tensorboard is True and not _has_tensorboard():
        problems.append(
            "output.tensorboard: the 'tensorboard' package is not installed; "
            "pip install 'raflora[tensorboard]' (or set output.tensorboard=false)"
        )
    if config.task.quantization != "none" and not _has_module("bitsandbytes"):
        problems.append(
            f"task.quantization: {config.task.quantization!r} needs the 'bitsandbytes' package, "
            "which is not installed; pip install 'raflora[quantization]' (or set "
            "task.quantization=none)"
        )
    return problems


def _has_module(name: str) -> bool:
    """Whether the package ``name`` can be imported."""
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # a module object without a spec stands in for it
        return False


def _has_tensorboard() -> bool:
    """Whether the ``tensorboard`` package can be imported (``output.tensorboard`` needs it)."""
    try:
        return importlib.util.find_spec("tensorboard") is not None
    except ValueError:  # a module object without a spec stands in for it
        return False


def validate(config: RunConfig, *, methods: Sequence[str] | None = None) -> list[str]:
    """Every problem with a configuration (empty when it is valid); ``config`` is not marked.

    Checks types (bools are not ints, strings are not lists) and the bounds each field declares
    (:func:`~raflora.schema.check_fields`), then cross-field consistency
    (``clients_per_round ≤ num_clients``, ``rank_probs`` against ``rank_levels``), the LoRA
    settings, the method, its options and the partition spec.

    ``method_options`` is resolved for the methods run
    (:func:`~raflora.methods.registry.resolve_method_options`): a key named after a method holds
    that method's options, any other key must be an option of at least one method run; every
    option is type-checked.

    Parameters
    ----------
    config : RunConfig
        The configuration to check; it may hold values of the wrong type.
    methods : sequence of str, optional
        The methods the config will run (``raflora compare``); default: ``config.method``.

    Returns
    -------
    list of str
        Problem messages, each naming the offending key.
    """
    return check(config, methods)[0]


def check(
    config: RunConfig, methods: Sequence[str] | None
) -> tuple[list[str], MethodOptions | None]:
    """:func:`validate`'s problems, and the method's parsed options when there are none."""
    from raflora.data import parse_partition

    if not isinstance(config, RunConfig):
        return [f"expected a RunConfig, got {type(config).__name__}"], None
    problems: list[str] = []
    bad: set[str] = set()
    check_fields(config, "", problems, bad)

    def ok(*paths: str) -> bool:
        return not any(p in bad for p in paths)

    fl = config.fl
    if (
        ok("fl.num_clients", "fl.clients_per_round")
        and fl.num_clients >= 1
        and fl.clients_per_round > fl.num_clients
    ):
        problems.append(
            f"fl.clients_per_round: must be ≤ fl.num_clients ({fl.num_clients}), "
            f"got {fl.clients_per_round}"
        )
    concurrent = config.train.concurrent_clients
    if ok("train.concurrent_clients", "fl.clients_per_round") and (
        concurrent > fl.clients_per_round >= 1
    ):
        problems.append(  # an error, not a silent clamp: the number asked for is not used
            f"train.concurrent_clients: at most fl.clients_per_round ({fl.clients_per_round}) "
            f"clients of a round can train at once, got {concurrent}"
        )
    if ok("train.concurrent_clients", "engine") and concurrent > 1 and config.engine != "local":
        problems.append(
            f"train.concurrent_clients: engine {config.engine!r} trains one client per message "
            f"(docs/concurrency.md); use engine: local, or train.concurrent_clients: 1"
        )
    levels_ok = _rank_problems(fl, problems, ok("fl.rank_levels"), ok("fl.rank_probs"))
    if ok("data.partition"):
        try:
            parse_partition(config.data.partition)
        except ValueError as exc:
            problems.append(f"data.partition: {exc}")
    _lora_problems(config.lora, ok, problems)
    options = _method_problems(config, methods, levels_ok, ok, problems)
    if ok("privacy.enabled") and config.privacy.enabled is True:
        _privacy_problems(config, methods, levels_ok and ok("method_options"), ok, problems)
    if ok("task.quantization", "method"):
        _quantization_problems(config, methods, problems)
    return problems, (options if not problems else None)


def _quantization_problems(
    config: RunConfig, methods: Sequence[str] | None, problems: list[str]
) -> None:
    """Methods that refuse a quantised base (``Capabilities.quantized_base``), by their
    declaration, never by name (docs/quantization.md).
    """
    if config.task.quantization == "none":
        return
    from raflora.methods.registry import _REGISTRY

    run = methods if methods is not None else [config.method]
    for name in run:
        cls = _REGISTRY.get(name)
        if cls is not None and cls.capabilities.quantized_base == "refuse":
            problems.append(
                f"task.quantization: method {name!r} merges its updates into the base weights "
                f"and declares it cannot keep them beside {config.task.quantization!r} "
                f"weights (a 4/8-bit weight takes no exact merge); use task.quantization=none"
            )


def _privacy_problems(
    config: RunConfig,
    methods: Sequence[str] | None,
    methods_ok: bool,
    ok: Callable[..., bool],
    problems: list[str],
) -> None:
    """A private run's settings, and every method run asked whether it can be private
    (:meth:`~raflora.methods.Method.privacy_refusal`, its declaration — never its name;
    docs/privacy.md).
    """
    from raflora.methods import available_methods, get_aggregator
    from raflora.methods.registry import method_options_classes, resolve_method_options

    pv = config.privacy
    if ok("privacy.noise_multiplier", "privacy.target_epsilon") and (
        (pv.noise_multiplier is None) == (pv.target_epsilon is None)
    ):
        problems.append(
            "privacy: set exactly one of privacy.noise_multiplier and privacy.target_epsilon, got "
            + ("both" if pv.noise_multiplier is not None else "neither")
        )
    if ok("privacy.accountant", "privacy.sampling") and (pv.accountant, pv.sampling) == (
        "pld",
        "fixed",
    ):
        problems.append(
            "privacy.accountant: 'pld' accounts poisson sampling only; use privacy.sampling: "
            "poisson or privacy.accountant: rdp"
        )
    if ok("privacy.adaptive_clip") and pv.adaptive_clip is True:
        if ok("privacy.noise") and pv.noise != "server":
            problems.append(
                "privacy.adaptive_clip: the unclipped count is noised by the server; use "
                "privacy.noise: server"
            )
        if ok("privacy.noise_multiplier") and pv.noise_multiplier == 0:
            problems.append("privacy.adaptive_clip: needs privacy.noise_multiplier > 0")
    if not methods_ok:
        return
    known = set(available_methods())
    run = [m for m in (methods if methods is not None else [config.method]) if m in known]
    try:
        resolved = resolve_method_options(config.method_options, run)
        for name in run:
            options = method_options_classes()[name](**resolved.get(name, {}))
            reason = get_aggregator(name, config.fl.rank_levels, options).privacy_refusal()
            if reason is not None:
                problems.append(f"privacy: {reason}")
    except (ConfigError, ValueError, TypeError):
        return  # the method or its options are reported by _method_problems


def _rank_problems(
    fl: FLConfig, problems: list[str], levels_typed: bool, probs_typed: bool
) -> bool:
    """Problems of ``rank_levels`` and ``rank_probs`` (each checked when of the right type);
    whether the levels are usable.
    """
    levels = fl.rank_levels
    levels_ok = False
    if not levels_typed:
        pass
    elif not levels:
        problems.append("fl.rank_levels: must not be empty")
    elif any(r <= 0 for r in levels):
        problems.append(f"fl.rank_levels: ranks must be positive, got {levels}")
    elif any(b <= a for a, b in itertools.pairwise(levels)):
        problems.append(f"fl.rank_levels: must be strictly increasing, got {levels}")
    else:
        levels_ok = True
    probs = fl.rank_probs
    if probs_typed and probs is not None:
        if levels_ok and len(probs) != len(levels):
            problems.append(
                f"fl.rank_probs: must have one entry per rank level "
                f"({len(levels)}), got {len(probs)}"
            )
        if any(not (p >= 0 and math.isfinite(p)) for p in probs):
            problems.append(f"fl.rank_probs: must be finite and non-negative, got {probs}")
        elif abs(sum(probs) - 1.0) > 1e-6:
            problems.append(f"fl.rank_probs: must sum to 1, got sum {sum(probs):.6g}")
    return levels_ok


def _lora_problems(lo: LoRAConfig, ok: Callable[..., bool], problems: list[str]) -> None:
    """``target_modules``, ``alpha`` and ``dropout``: values a type alone does not pin down."""
    if ok("lora.target_modules"):
        tm = lo.target_modules
        if isinstance(tm, str):
            if tm != "all-linear":
                problems.append(
                    f"lora.target_modules: must be a list of module names or 'all-linear', "
                    f"got {tm!r}"
                )
        elif not tm or any(not m for m in tm):
            problems.append(
                f"lora.target_modules: must be a non-empty list of module names, got {tm}"
            )
    if ok("lora.alpha"):
        if isinstance(lo.alpha, str):
            if lo.alpha != "rank":
                problems.append(
                    f"lora.alpha: must be 'rank' or a positive number, got {lo.alpha!r}"
                )
        elif not (lo.alpha > 0 and math.isfinite(lo.alpha)):
            problems.append(f"lora.alpha: must be a finite number > 0, got {lo.alpha}")
    if ok("lora.dropout") and not (0.0 <= lo.dropout < 1.0):
        problems.append(f"lora.dropout: must be in [0, 1), got {lo.dropout}")


def _method_problems(
    config: RunConfig,
    methods: Sequence[str] | None,
    levels_ok: bool,
    ok: Callable[..., bool],
    problems: list[str],
) -> MethodOptions | None:
    """The method against the rank levels, and ``method_options`` resolved for the methods
    run; returns ``config.method``'s options, parsed, when all is well.

    ``methods`` are the methods run (``None``: ``config.method``); the method is built (its own
    checks against the rank levels) only when it is known and the levels are usable.
    """
    from raflora.methods import available_methods, get_aggregator
    from raflora.methods.registry import (
        method_options_classes,
        resolve_method_options,
        unsupported_reason,
    )

    known = available_methods()
    method_ok = ok("method") and config.method in known and levels_ok
    if ok("method") and config.method not in known:
        problems.append(f"method: unknown method {config.method!r}; valid: {', '.join(known)}")
    levels = config.fl.rank_levels
    reason = unsupported_reason(config.method, levels) if method_ok else None
    if reason is not None:
        method_ok = False
        able = [m for m in known if unsupported_reason(m, levels) is None]
        problems.append(
            f"method: {config.method!r} {reason}, got fl.rank_levels {levels}; use "
            f"{' or '.join(repr(m) for m in able)} for these ranks, or set fl.rank_levels to "
            f"one rank"
        )
    problems += [
        f"methods: unknown method {m!r}; valid: {', '.join(known)}"
        for m in methods or ()
        if m not in known
    ]
    run = [m for m in (methods if methods is not None else [config.method]) if m in known]
    if not ok("method_options"):
        return None
    try:
        resolved = resolve_method_options(config.method_options, run)
    except ConfigError as err:
        problems += err.problems
        return None
    if not method_ok or config.method not in resolved:
        return None
    cls = method_options_classes()[config.method]
    options = cls(**resolved[config.method])  # checked by resolve_method_options already
    try:
        get_aggregator(config.method, levels, options)  # the method's own checks
    except (ValueError, TypeError) as exc:
        problems.append(f"method: {exc}")
        return None
    return options
