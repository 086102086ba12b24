"""Run configuration: typed dataclasses, YAML loading, dotted overrides and validation.

A run is described by one :class:`RunConfig`, a tree of plain dataclasses (no ``__post_init__``
magic) whose fields carry their help text in ``field(metadata={"help": ...})``. Configs come from
YAML files plus ``section.key=value`` command-line overrides, and every problem — unknown keys,
wrong types, out-of-range values, inconsistent settings — is collected and reported at once in a
single :class:`ConfigError`::

    cfg = load_config("run.yaml", ["fl.rounds=50", "train.lr=1e-3", "fl.rank_levels=[8,16]"])
    save_config(cfg, "out/config.yaml")  # resolved; load_config gives back an equal RunConfig

Unknown keys are always errors; the message lists the valid keys of the section.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raflora.methods.options import check_type, coerce, did_you_mean, type_name, value_type

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FLConfig",
    "FlowerConfig",
    "LoRAConfig",
    "OutputConfig",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "describe_config",
    "environment_problems",
    "load_config",
    "save_config",
    "validate",
]

TaskName = Literal[
    "synthetic",
    "digits",
    "image-classification",
    "text-classification",
    "math-reasoning",
    "commonsense",
]
Engine = Literal["local", "flower"]
Device = Literal["cpu", "cuda", "auto"]
DType = Literal["float32", "bfloat16", "float16"]
LRSchedule = Literal["linear", "constant"]
Optimizer = Literal["adamw", "sgd"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class TaskConfig:
    """What is trained: the task, its model and dataset, and how examples are read."""

    name: TaskName = field(
        default="digits",
        metadata=_help(
            "Task: synthetic, digits, image-classification, text-classification, "
            "math-reasoning or commonsense."
        ),
    )
    model: str | None = field(
        default=None,
        metadata=_help("Model: a Hugging Face hub name or a local directory (None: task default)."),
    )
    dataset: str | None = field(
        default=None,
        metadata=_help("Dataset: a hub name or a local file/directory (None: the task's default)."),
    )
    text_column: str | None = field(
        default=None, metadata=_help("Column holding the input text (None: task default).")
    )
    label_column: str | None = field(
        default=None, metadata=_help("Column holding the label/target (None: task default).")
    )
    image_column: str | None = field(
        default=None, metadata=_help("Column holding the image (None: task default).")
    )
    max_length: int = field(default=128, metadata=_help("Maximum tokenized sequence length."))
    num_eval_samples: int | None = field(
        default=None, metadata=_help("Cap on evaluation examples (None: the whole eval split).")
    )
    options: dict[str, Any] = field(
        default_factory=dict, metadata=_help("Task-specific extra options.")
    )


@dataclass
class FLConfig:
    """Federation: clients, rounds and the heterogeneous rank assignment."""

    num_clients: int = field(default=100, metadata=_help("Total number of clients."))
    clients_per_round: int = field(
        default=10, metadata=_help("Clients sampled per round (≤ num_clients).")
    )
    rounds: int = field(default=100, metadata=_help("Number of federated rounds."))
    rank_levels: list[int] = field(
        default_factory=lambda: [8, 16, 32, 48, 64],
        metadata=_help("LoRA ranks clients can have; strictly increasing, positive."),
    )
    rank_probs: list[float] | None = field(
        default=None,
        metadata=_help("Probability of each rank level (same length, sums to 1; None: uniform)."),
    )


@dataclass
class DataConfig:
    """How the training data is split across clients."""

    partition: str = field(
        default="iid",
        metadata=_help("Client partition: 'iid', 'dir-a<alpha>' or 'patho-c<c>a<alpha>'."),
    )
    min_samples: int = field(
        default=2,
        metadata=_help(
            "Minimum training samples per client under 'dir' and 'patho' (reached by "
            "construction when the first draw misses it)."
        ),
    )


@dataclass
class TrainConfig:
    """Local training on each client."""

    lr: float = field(default=5e-4, metadata=_help("Client learning rate (> 0)."))
    batch_size: int = field(default=32, metadata=_help("Local training batch size."))
    local_epochs: int = field(default=1, metadata=_help("Local epochs per round."))
    weight_decay: float = field(
        default=0.0, metadata=_help("Weight decay (≥ 0): decoupled under AdamW, L2 under SGD.")
    )
    optimizer: Optimizer = field(
        default="adamw",
        metadata=_help("Client optimizer: 'adamw' (the paper's) or 'sgd' (plain, no momentum)."),
    )
    lr_schedule: LRSchedule = field(
        default="linear",
        metadata=_help("'linear' (lr·(1 − (t−1)/T) in round t of T) or 'constant'."),
    )
    max_grad_norm: float | None = field(
        default=None, metadata=_help("Gradient clipping norm (None: no clipping).")
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("Enable gradient checkpointing in the model.")
    )


@dataclass
class LoRAConfig:
    """LoRA adapters (the rank r_k of each client comes from ``fl.rank_levels``)."""

    target_modules: list[str] | str = field(
        default="all-linear",
        metadata=_help("Modules to adapt: a list of module names or 'all-linear'."),
    )
    alpha: str | float = field(
        default="rank",
        metadata=_help("lora_alpha: 'rank' (alpha = r_k, scaling 1) or a positive number."),
    )
    dropout: float = field(default=0.0, metadata=_help("LoRA dropout probability in [0, 1)."))
    use_rslora: bool = field(
        default=False, metadata=_help("Rank-stabilized scaling alpha/sqrt(r) instead of alpha/r.")
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata=_help("Extra modules trained in full and aggregated (e.g. a classifier head)."),
    )


@dataclass
class EvalConfig:
    """Evaluation of the global model."""

    every: int = field(default=1, metadata=_help("Evaluate every N rounds."))
    batch_size: int = field(default=64, metadata=_help("Evaluation batch size."))
    per_level: bool = field(
        default=False,
        metadata=_help(
            "Also evaluate the model a client of each rank level holds (the global factors "
            "truncated to that rank; FLoRA: the merged model, so equal to the full one): "
            "accuracy@r and eval_loss@r in metrics.jsonl on evaluated rounds."
        ),
    )


@dataclass
class FlowerConfig:
    """Flower simulation engine settings (used when ``engine: flower``)."""

    supernodes: int | None = field(
        default=None, metadata=_help("Number of simulated supernodes (None: num_clients).")
    )
    cpus_per_client: float = field(default=1.0, metadata=_help("CPUs reserved per client (> 0)."))
    gpus_per_client: float = field(
        default=0.0, metadata=_help("GPU fraction reserved per client (≥ 0).")
    )


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str | None = field(
        default=None, metadata=_help("Output directory (None: a timestamped directory).")
    )
    plots: bool = field(default=True, metadata=_help("Write plots next to the metrics."))
    tensorboard: bool = field(
        default=False,
        metadata=_help(
            "Write each round's scalars and the global update's energy spectrum as TensorBoard "
            "events in RUN_DIR/tensorboard/ (needs the 'tensorboard' extra)."
        ),
    )


@dataclass
class RunConfig:
    """A complete, resolved run configuration."""

    method: str = field(
        default="raflora",
        metadata=_help("Aggregation method (see raflora.methods.available_methods())."),
    )
    seed: int = field(default=0, metadata=_help("Random seed (≥ 0)."))
    engine: Engine = field(
        default="local", metadata=_help("'local' (in-process loop) or 'flower' (simulation).")
    )
    method_options: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help(
            "Method options (see 'Method options' below): {option: value} sets it for every "
            "method run that declares it, {method: {option: value}} for that method only, e.g. "
            "{raflora: {empty_partition: drop}, hetlora: {weighting: samples}}."
        ),
    )
    device: Device = field(default="cpu", metadata=_help("'cpu', 'cuda' or 'auto'."))
    dtype: DType = field(
        default="float32", metadata=_help("Model dtype: 'float32', 'bfloat16' or 'float16'.")
    )
    threads: int | None = field(
        default=None,
        metadata=_help(
            "Torch intra-op CPU threads of every process of the run (None: torch's default). "
            "1 gives bit-identical numbers across engines and machines."
        ),
    )
    task: TaskConfig = field(default_factory=TaskConfig, metadata=_help("Task, model and data."))
    fl: FLConfig = field(default_factory=FLConfig, metadata=_help("Federation settings."))
    data: DataConfig = field(default_factory=DataConfig, metadata=_help("Client partitioning."))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_help("Local training."))
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata=_help("LoRA adapters."))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=_help("Evaluation."))
    flower: FlowerConfig = field(default_factory=FlowerConfig, metadata=_help("Flower engine."))
    output: OutputConfig = field(default_factory=OutputConfig, metadata=_help("Outputs."))


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """One or more problems with a configuration.

    Parameters
    ----------
    problems : list of str
        Every problem found, each a self-contained message (``"fl.rounds: must be ≥ 1, got 0"``).

    Attributes
    ----------
    problems : list of str
        The problems, in the order they were found.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__(self._format())

    def _format(self) -> str:
        return "invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems)

    def __str__(self) -> str:
        return self._format()


# --------------------------------------------------------------------------------------------
# Type introspection
# --------------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unknown_key(section: str, key: object, valid: Sequence[str]) -> str:
    where = f"{section}: unknown key" if section else "unknown top-level key"
    return f"{where} {key!r}{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}"


# --------------------------------------------------------------------------------------------
# Building from / converting to plain data
# --------------------------------------------------------------------------------------------


def _build(cls: type[Any], data: Mapping[Any, Any], prefix: str, problems: list[str]) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            problems.append(_unknown_key(prefix, key, names))
            continue
        tp = hints[key]
        path = f"{prefix}.{key}" if prefix else str(key)
        if _is_section(tp):
            if value is None:
                continue  # an empty section in YAML: keep the defaults
            if not isinstance(value, Mapping):
                problems.append(f"{path}: must be a mapping, got {value_type(value)}")
                continue
            kwargs[key] = _build(tp, value, path, problems)
        else:
            kwargs[key] = coerce(value, tp)
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any] | None) -> RunConfig:
    """Build and validate a :class:`RunConfig` from plain (YAML-like) data.

    Missing keys take their defaults; ints and float-like strings are accepted for float fields.

    Parameters
    ----------
    data : Mapping or None
        Nested mapping of sections and keys (``None`` means all defaults).

    Returns
    -------
    RunConfig
        The validated configuration.

    Raises
    ------
    ConfigError
        With every problem found: unknown keys, wrong types, invalid values.
    """
    problems: list[str] = []
    cfg = _from_dict(data, problems)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def _from_dict(data: object, problems: list[str]) -> RunConfig:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.append(f"config must be a mapping of sections, got {value_type(data)}")
        return RunConfig()
    cfg: RunConfig = _build(RunConfig, data, "", problems)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested ``dict`` of a configuration (deep copy), as written by :func:`save_config`.

    Parameters
    ----------
    cfg : RunConfig
        The configuration.

    Returns
    -------
    dict
        Sections as nested dicts, in field order.
    """
    return dataclasses.asdict(cfg)


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
    cls: type[Any] | None = RunConfig
    prefix = ""
    for i, part in enumerate(parts):
        if cls is None:
            break
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            problems.append(f"override {override!r}: " + _unknown_key(prefix, part, names))
            return
        tp = _hints(cls)[part]
        prefix = f"{prefix}.{part}" if prefix else part
        last = i == len(parts) - 1
        if _is_section(tp):
            if last and not isinstance(value, Mapping):
                problems.append(f"override {override!r}: {prefix} is a section; set its keys")
                return
            cls = tp
        elif typing.get_origin(tp) is dict:
            cls = None
        elif not last:
            problems.append(f"override {override!r}: {prefix} is not a section")
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
    cfg = _from_dict(data, problems)
    problems.extend(validate(cfg, methods=methods))
    if problems:
        raise ConfigError(problems)
    return cfg


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _type_problems(obj: Any, prefix: str, problems: list[str], bad: set[str]) -> None:
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp = hints[f.name]
        path = f"{prefix}.{f.name}" if prefix else f.name
        if _is_section(tp) and isinstance(value, tp):
            _type_problems(value, path, problems, bad)
        elif not check_type(value, tp):
            bad.add(path)
            if typing.get_origin(tp) is Literal:
                choices = ", ".join(repr(c) for c in typing.get_args(tp))
                problems.append(f"{path}: must be one of {choices}, got {value!r}")
            else:
                problems.append(
                    f"{path}: expected {type_name(tp)}, got {value_type(value)} {value!r}"
                )


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
    return problems


def _has_tensorboard() -> bool:
    """Whether the ``tensorboard`` package can be imported (``output.tensorboard`` needs it)."""
    try:
        return importlib.util.find_spec("tensorboard") is not None
    except ValueError:  # a module object without a spec stands in for it
        return False


def validate(config: RunConfig, *, methods: Sequence[str] | None = None) -> list[str]:
    """Every problem with a configuration (empty when it is valid).

    Checks types (bools are not ints, strings are not lists), ranges, cross-field consistency
    (``clients_per_round ≤ num_clients``, ``rank_probs`` against ``rank_levels``), the method,
    its options and the partition spec.

    ``method_options`` is resolved for the methods run (``resolve_method_options`` in
    :mod:`raflora.methods.base`): a key named after a method holds that method's options,
    any other key must be an option of at least one method run; every option is type-checked.

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
    from raflora.data import parse_partition
    from raflora.methods import available_methods
    from raflora.methods.registry import unsupported_reason

    problems: list[str] = []
    if not isinstance(config, RunConfig):
        return [f"expected a RunConfig, got {type(config).__name__}"]
    bad: set[str] = set()
    _type_problems(config, "", problems, bad)

    def ok(*paths: str) -> bool:
        return not any(p in bad for p in paths)

    def at_least(path: str, value: int | float | None, low: int) -> None:
        if ok(path) and value is not None and value < low:
            problems.append(f"{path}: must be ≥ {low}, got {value}")

    def positive(path: str, value: float | None) -> None:
        if ok(path) and value is not None and not (value > 0 and math.isfinite(value)):
            problems.append(f"{path}: must be a finite number > 0, got {value}")

    def non_negative(path: str, value: float | None) -> None:
        if ok(path) and value is not None and not (value >= 0 and math.isfinite(value)):
            problems.append(f"{path}: must be a finite number ≥ 0, got {value}")

    # Top level.
    known = available_methods()
    if ok("method") and config.method not in known:
        problems.append(f"method: unknown method {config.method!r}; valid: {', '.join(known)}")
    at_least("seed", config.seed, 0)
    at_least("threads", config.threads, 1)

    # task
    t = config.task
    at_least("task.max_length", t.max_length, 1)
    at_least("task.num_eval_samples", t.num_eval_samples, 1)

    # fl
    fl = config.fl
    at_least("fl.num_clients", fl.num_clients, 1)
    at_least("fl.clients_per_round", fl.clients_per_round, 1)
    at_least("fl.rounds", fl.rounds, 1)
    if (
        ok("fl.num_clients", "fl.clients_per_round")
        and fl.num_clients >= 1
        and fl.clients_per_round > fl.num_clients
    ):
        problems.append(
            f"fl.clients_per_round: must be ≤ fl.num_clients ({fl.num_clients}), "
            f"got {fl.clients_per_round}"
        )
    levels_ok = ok("fl.rank_levels")
    if levels_ok:
        levels = fl.rank_levels
        if not levels:
            problems.append("fl.rank_levels: must not be empty")
            levels_ok = False
        elif any(r <= 0 for r in levels):
            problems.append(f"fl.rank_levels: ranks must be positive, got {levels}")
            levels_ok = False
        elif any(b <= a for a, b in itertools.pairwise(levels)):
            problems.append(f"fl.rank_levels: must be strictly increasing, got {levels}")
            levels_ok = False
    if ok("fl.rank_probs") and fl.rank_probs is not None:
        probs = fl.rank_probs
        if levels_ok and len(probs) != len(fl.rank_levels):
            problems.append(
                f"fl.rank_probs: must have one entry per rank level "
                f"({len(fl.rank_levels)}), got {len(probs)}"
            )
        if any(not (p >= 0 and math.isfinite(p)) for p in probs):
            problems.append(f"fl.rank_probs: must be finite and non-negative, got {probs}")
        elif abs(sum(probs) - 1.0) > 1e-6:
            problems.append(f"fl.rank_probs: must sum to 1, got sum {sum(probs):.6g}")

    # data
    if ok("data.partition"):
        try:
            parse_partition(config.data.partition)
        except ValueError as exc:
            problems.append(f"data.partition: {exc}")
    at_least("data.min_samples", config.data.min_samples, 1)

    # train
    tr = config.train
    positive("train.lr", tr.lr)
    at_least("train.batch_size", tr.batch_size, 1)
    at_least("train.local_epochs", tr.local_epochs, 1)
    non_negative("train.weight_decay", tr.weight_decay)
    positive("train.max_grad_norm", tr.max_grad_norm)

    # lora
    lo = config.lora
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
        else:
            positive("lora.alpha", lo.alpha)
    if ok("lora.dropout") and not (0.0 <= lo.dropout < 1.0):
        problems.append(f"lora.dropout: must be in [0, 1), got {lo.dropout}")

    # eval
    at_least("eval.every", config.eval.every, 1)
    at_least("eval.batch_size", config.eval.batch_size, 1)

    # flower
    fw = config.flower
    at_least("flower.supernodes", fw.supernodes, 1)
    positive("flower.cpus_per_client", fw.cpus_per_client)
    non_negative("flower.gpus_per_client", fw.gpus_per_client)

    # Method against rank levels and method options.
    method_ok = ok("method") and config.method in known and levels_ok
    reason = unsupported_reason(config.method, fl.rank_levels) if method_ok else None
    if reason is not None:
        method_ok = False
        able = [m for m in known if unsupported_reason(m, fl.rank_levels) is None]
        problems.append(
            f"method: {config.method!r} {reason}, got fl.rank_levels {fl.rank_levels}; use "
            f"{' or '.join(repr(m) for m in able)} for these ranks, or set fl.rank_levels to "
            f"one rank"
        )
    if ok("method_options"):
        problems.extend(_method_problems(config, methods, method_ok=method_ok))

    return problems


def _method_problems(
    config: RunConfig, methods: Sequence[str] | None, *, method_ok: bool
) -> list[str]:
    """``method_options`` resolved for the methods run; the method built with its options.

    ``methods`` are the methods run (``None``: ``config.method``); the aggregator is built
    (its own checks against the rank levels) only when ``method_ok`` and it is among them.
    """
    from raflora.methods import available_methods, get_aggregator
    from raflora.methods.options import OptionsError
    from raflora.methods.registry import resolve_method_options

    known = available_methods()
    problems = [
        f"methods: unknown method {m!r}; valid: {', '.join(known)}"
        for m in methods or ()
        if m not in known
    ]
    run = [m for m in (methods if methods is not None else [config.method]) if m in known]
    try:
        resolved = resolve_method_options(config.method_options, run)
    except OptionsError as err:
        return problems + err.problems
    if method_ok and config.method in resolved:
        try:
            get_aggregator(config.method, config.fl.rank_levels, **resolved[config.method])
        except (ValueError, TypeError) as exc:
            problems.append(f"method: {exc}")
    return problems


# --------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------


def _describe(cls: type[Any], prefix: str, lines: list[str]) -> None:
    hints = _hints(cls)
    default_obj = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}.{f.name}" if prefix else f.name
        text = f.metadata.get("help", "")
        if _is_section(tp):
            lines.append("")
            lines.append(f"{path}:  {text}")
            _describe(tp, path, lines)
            continue
        default = yaml.safe_dump(getattr(default_obj, f.name), default_flow_style=True)
        default = default.strip().removesuffix("...").strip()
        lines.append(f"  {path} ({type_name(tp)}, default {default})")
        lines.append(f"      {text}")


def describe_config() -> str:
    """Help text for every configuration key, grouped by section, then every method's options.

    Returns
    -------
    str
        One entry per key: dotted name, type, default and help text; then one section per
        method with each option's name, type or allowed values, default and help text.
    """
    from raflora.methods.options import describe_options
    from raflora.methods.registry import method_options_classes

    lines: list[str] = ["Configuration keys (set in YAML or override as section.key=value):"]
    _describe(RunConfig, "", lines)
    lines += [
        "",
        "Method options (method_options: {option: value} sets an option for every method run",
        "that declares it; {method: {option: value}} sets it for that method only):",
    ]
    for method, options in method_options_classes().items():
        lines.append("")
        lines.extend(describe_options(method, options))
    return "\n".join(lines)
