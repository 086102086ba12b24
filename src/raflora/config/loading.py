"""Run configurations from YAML files, plain data and ``section.key=value`` overrides, and back.

Every loader returns a frozen configuration validated once (:func:`~raflora.config.validated`),
with every problem — unknown keys (with a "did you mean"), wrong types, out-of-range values,
inconsistent settings — in one :class:`~raflora.schema.ConfigError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from raflora.config.sections import RunConfig
from raflora.config.validated import key_problem, validated
from raflora.schema import ConfigError, build, thaw, value_type

__all__ = ["config_from_dict", "config_to_dict", "load_config", "save_config"]


def config_from_dict(
    data: Mapping[str, Any] | None, *, methods: Sequence[str] | None = None
) -> RunConfig:
    """Build and validate a :class:`RunConfig` from plain (YAML-like) data.

    Missing keys take their defaults; ints and float-like strings are accepted for float fields.

    Parameters
    ----------
    data : Mapping or None
        Nested mapping of sections and keys (``None`` means all defaults).
    methods : sequence of str, optional
        The methods the config will run (default: its ``method``).

    Returns
    -------
    RunConfig
        The validated configuration (frozen).

    Raises
    ------
    ConfigError
        With every problem found: unknown keys, wrong types, invalid values.
    """
    problems: list[str] = []
    cfg = _from_dict(data, problems)
    return _finish(cfg, problems, methods)


def _finish(cfg: RunConfig, problems: list[str], methods: Sequence[str] | None) -> RunConfig:
    """:func:`validated`, reporting the problems found while building ``cfg`` first."""
    try:
        validated(cfg, methods=methods)
    except ConfigError as err:
        problems = problems + err.problems
    if problems:
        raise ConfigError(problems)
    return cfg


def _from_dict(data: object, problems: list[str]) -> RunConfig:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.append(f"config must be a mapping of sections, got {value_type(data)}")
        return RunConfig()
    return build(RunConfig, data, "", problems)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested ``dict`` of a configuration (deep copy), as written by :func:`save_config`.

    Parameters
    ----------
    cfg : RunConfig
        The configuration.

    Returns
    -------
    dict
        Sections as nested dicts, in field order (plain lists and dicts).
    """
    out: dict[str, Any] = thaw(dataclasses.asdict(cfg))
    return out


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved configuration as YAML; :func:`load_config` reads it back equal.

    Parameters
    ----------
    cfg : RunConfig
        The configuration to save.
    path : str or Path
        Destination file; parent directories are created.

    Returns
    -------
    Path
        The path written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    out.write_text(text, encoding="utf-8")
    return out


# --------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------


def _apply_override(data: dict[str, Any], override: str, problems: list[str]) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        problems.append(f"override {override!r}: expected 'section.key=value'")
        return
    parts = key.split(".")
    if any(not p for p in parts):
        problems.append(f"override {override!r}: malformed key {key!r}")
        return
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problems.append(f"override {override!r}: cannot parse value: {_one_line(exc)}")
        return

    # Check the key path against the schema; mapping fields (options) accept any sub-keys.
    found: list[str] = []
    if key_problem(key, parts, value, found):
        problems += [f"override {override!r}: {p}" for p in found]
        return

    node: dict[str, Any] = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _one_line(exc: BaseException) -> str:
    """A YAML error as one line: the parser's problem, its context and position."""
    problem = getattr(exc, "problem", None)
    if not isinstance(exc, yaml.MarkedYAMLError) or problem is None:
        return " ".join(str(exc).split())
    parts = [problem]
    if exc.context:
        where = ""
        if exc.context_mark is not None:
            where = f" (line {exc.context_mark.line + 1})"
        parts.append(f"{exc.context}{where}")
    return "; ".join(parts)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    """One YAML config file as a mapping (an empty file is ``{}``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {p}"]) from None
    except OSError as exc:
        raise ConfigError([f"cannot read config file {p}: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError([f"{p}: invalid YAML{where}: {_one_line(exc)}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: config must be a mapping of sections, got {value_type(data)}"])
    return data


def _deep_merge(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """``layer`` over ``base``: sections merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | Sequence[str | Path] | None,
    overrides: Sequence[str] = (),
    *,
    methods: Sequence[str] | None = None,
) -> RunConfig:
    """Load YAML config file(s), apply ``section.key=value`` overrides, and validate.

    Several files are merged in order, section by section (a later file's keys win), so a base
    config can be combined with presets such as ``configs/paper/ranks/conf-8.yaml``. Override
    values are parsed with ``yaml.safe_load`` (``fl.rank_levels=[8,16]``, ``task.model=null``,
    ``lora.target_modules=[q_proj,v_proj]``); float fields also accept strings such as ``1e-3``
    that YAML leaves unparsed.

    Parameters
    ----------
    path : str, Path, sequence of them, or None
        YAML file(s); ``None`` (or an empty sequence) starts from the defaults.
    overrides : sequence of str
        Dotted overrides, applied in order after the files.
    methods : sequence of str, optional
        The methods the config will run (``raflora compare``); ``method_options`` is checked
        against them (default: ``method`` alone). See :func:`validate`.

    Returns
    -------
    RunConfig
        The validated configuration.

    Raises
    ------
    ConfigError
        If a file is missing or not valid YAML, or with every problem in the merged config.
    """
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    data: dict[str, Any] = {}
    for p in paths:
        data = _deep_merge(data, _read_yaml(p))
    problems: list[str] = []
    for override in overrides:
        _apply_override(data, override, problems)
    return _finish(_from_dict(data, problems), problems, methods)
