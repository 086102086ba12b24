"""One schema: configs frozen and validated exactly once, the JSON Schema, the generated docs."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_type_hints

import jsonschema
import pytest
import yaml

import raflora.config
from raflora.cli import main
from raflora.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    config_markdown,
    config_schema,
    config_to_dict,
    is_validated,
    load_config,
    method_options_of,
    validated,
    with_changes,
)
from raflora.methods import OptionsError, available_methods, get_aggregator
from raflora.methods.registry import method_options_classes
from raflora.schema import FrozenDict, FrozenList
from raflora.tasks.base import task_options_classes

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "method": "raflora",
    "task": {"name": "synthetic", "options": {"num_train": 200, "num_eval": 100}},
    "fl": {"num_clients": 4, "clients_per_round": 2, "rounds": 1, "rank_levels": [2, 4]},
    "output": {"plots": False},
}


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[RunConfig]]:
    """Every full validation of a run config in this process (the configs checked, in order)."""
    seen: list[RunConfig] = []
    check = raflora.config.checks.check

    def counting(config: RunConfig, methods: Any) -> Any:
        seen.append(config)
        return check(config, methods)

    monkeypatch.setattr(raflora.config.checks, "check", counting)
    yield seen


def _file(tmp_path: Path, data: dict[str, Any] = TINY) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- frozen


def test_a_validated_config_cannot_be_mutated() -> None:
    cfg = config_from_dict({**TINY, "method_options": {"raflora": {"empty_partition": "drop"}}})
    assert is_validated(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fl.rounds = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.method = "fedit"  # type: ignore[misc]
    with pytest.raises(TypeError, match="immutable"):
        cfg.fl.rank_levels.append(8)
    with pytest.raises(TypeError, match="immutable"):
        cfg.fl.rank_levels[0] = 8
    with pytest.raises(TypeError, match="immutable"):
        cfg.method_options["raflora"]["empty_partition"] = "carry"
    with pytest.raises(TypeError, match="immutable"):
        cfg.task.options.update(num_train=5)
    assert isinstance(cfg.task.options, FrozenDict) and isinstance(cfg.fl.rank_levels, FrozenList)
    # frozen containers still compare, serialise and copy as plain ones
    assert cfg.fl.rank_levels == [2, 4] and cfg.task.options == TINY["task"]["options"]
    assert json.loads(json.dumps(config_to_dict(cfg)))["fl"]["rank_levels"] == [2, 4]
    assert yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))) == config_to_dict(cfg)


def test_pickled_and_copied_configs_stay_validated_and_frozen() -> None:
    import copy
    import pickle

    cfg = config_from_dict({**TINY, "method_options": {"raflora": {"empty_partition": "drop"}}})
    for other in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert other == cfg and is_validated(other)
        assert method_options_of(other) == method_options_of(cfg)
        with pytest.raises(TypeError, match="immutable"):
            other.fl.rank_levels.append(8)


def test_derivations_replace_fields_and_are_validated() -> None:
    cfg = config_from_dict(TINY)
    fast = with_changes(cfg, {"train.lr": 1, "output.dir": "runs/x"})
    assert (fast.train.lr, fast.output.dir) == (1.0, "runs/x") and isinstance(fast.train.lr, float)
    assert (cfg.train.lr, cfg.output.dir) == (5e-4, None)  # the original is unchanged
    assert is_validated(fast)
    with pytest.raises(ConfigError, match=r"train\.lr: must be a finite number > 0, got -1\.0"):
        with_changes(cfg, {"train.lr": -1})
    with pytest.raises(ConfigError, match=r"train: unknown key 'lrr' \(did you mean 'lr'\?\)"):
        with_changes(cfg, {"train.lrr": 1})
    # a key checked against others (the method, its options, ranks) validates the whole config
    with pytest.raises(ConfigError, match="method: 'fedit' needs a single rank level"):
        with_changes(cfg, {"method": "fedit"})
    het = with_changes(cfg, {"method": "hetlora", "method_options": {"weighting": "samples"}})
    assert method_options_of(het) == method_options_classes()["hetlora"](weighting="samples")
    # dataclasses.replace gives a new, unvalidated config the engines refuse
    assert not is_validated(dataclasses.replace(cfg, seed=3))


def test_a_key_below_a_mapping_field_merges_into_it() -> None:
    cfg = config_from_dict(
        {
            **TINY,
            "task": {"name": "synthetic", "options": {"num_train": 300, "num_eval": 100}},
            "method_options": {"raflora": {"empty_partition": "drop"}},
        }
    )
    one = with_changes(cfg, {"task.options.num_eval": 50})
    assert dict(one.task.options) == {"num_train": 300, "num_eval": 50}  # num_train kept
    both = with_changes(cfg, {"task.options.num_eval": 50, "task.options.num_train": 200})
    assert dict(both.task.options) == {"num_train": 200, "num_eval": 50}
    hetero = with_changes(cfg, {"method_options.hetlora.weighting": "samples"})
    assert dict(hetero.method_options["raflora"]) == {"empty_partition": "drop"}
    assert dict(hetero.method_options["hetlora"]) == {"weighting": "samples"}
    # the whole mapping named: replaced, as in YAML
    assert dict(with_changes(cfg, {"task.options": {"num_eval": 7}}).task.options) == {
        "num_eval": 7
    }


def test_method_options_are_parsed_once_at_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_from_dict({**TINY, "method_options": {"raflora": {"empty_partition": "drop"}}})
    typed = method_options_of(cfg)
    assert typed == method_options_classes()["raflora"](empty_partition="drop")
    # the federation builds the method from them; nothing parses the mapping again
    import raflora.methods.registry as registry

    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("options parsed again")

    monkeypatch.setattr(registry, "parse_options", no_parsing)
    assert get_aggregator("raflora", [2, 4], typed).options is typed
    with pytest.raises(TypeError, match="raflora takes RaFLoRAOptions"):
        get_aggregator("raflora", [2, 4], method_options_classes()["hetlora"]())
    with pytest.raises(ConfigError, match="not validated"):
        method_options_of(RunConfig())


def test_options_error_is_the_config_error() -> None:
    err = OptionsError(["a: bad", "b: worse"])
    assert isinstance(err, ConfigError) and err.problems == ["a: bad", "b: worse"]
    assert str(err) == "a: bad; b: worse"


# ---------------------------------------------------------------------------- validated once


def test_a_local_run_validates_its_config_once(
    tmp_path: Path, validations: list[RunConfig]
) -> None:
    assert main(["run", str(_file(tmp_path)), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert len(validations) == 1
    assert (tmp_path / "out" / "summary.json").is_file()


def test_compare_validates_each_run_config_once(
    tmp_path: Path, validations: list[RunConfig]
) -> None:
    methods = ["raflora", "flexlora"]
    args = ["compare", str(_file(tmp_path)), "--methods", ",".join(methods), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    # the base config once (against both methods), then each method's config once
    assert [c.method for c in validations] == ["raflora", *methods]
    assert (tmp_path / "out" / "comparison.md").is_file()


def test_a_sweep_validates_each_run_config_once(
    tmp_path: Path, validations: list[RunConfig]
) -> None:
    from raflora.experiments.sweep import plan_runs, run_plan, settings_of

    specs = plan_runs(
        [_file(tmp_path)], [], settings_of([]), ["raflora", "hetlora"], [0, 1], tmp_path / "s"
    )
    planned = list(validations)
    assert len(planned) == 1 + len(specs) == 5  # the base, then each run's config
    assert all(any(s.config is c for c in planned) for s in specs)
    outcomes = run_plan(specs)
    assert all(o.summary is not None for o in outcomes)
    assert validations == planned  # running validated nothing again


@pytest.mark.slow
def test_a_flower_simulation_validates_its_config_once(
    tmp_path: Path, validations: list[RunConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("flwr")
    from raflora.flower import run_flower

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    config = load_config(_file(tmp_path), ["engine=flower"])
    result = run_flower(config, tmp_path / "run", progress=False, quiet=True)
    assert len(result.metrics) == 1
    # in this process: loading only (the ClientApps in Ray's workers rebuild it from the message)
    assert len(validations) == 1


def test_the_engines_refuse_an_unvalidated_config(tmp_path: Path) -> None:
    from raflora.engine import run_local

    with pytest.raises(ConfigError, match="not validated"):
        run_local(RunConfig(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert is_validated(validated(RunConfig()))


# ---------------------------------------------------------------------------- JSON Schema


def _config_files() -> list[Path]:
    return sorted((ROOT / "configs").rglob("*.yaml"))


def test_the_schema_accepts_every_shipped_config_file() -> None:
    schema = config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    files = _config_files()
    assert len(files) >= 10
    for path in files:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        errors = [e.message for e in validator.iter_errors(data)]
        assert errors == [], path


@pytest.mark.parametrize(
    "data",
    [
        {"fl": {"rounds": "no"}},
        {"fl": {"rounds": 0}},
        {"fl": {"num_client": 3}},
        {"output": {"plots": "no"}},
        {"train": {"lr": "fast"}},
        {"engine": "spark"},
        {"method_options": {"raflora": {"empty_partition": "sometimes"}}},
        {"method_options": {"self_pruning": "no"}},
        {"method_options": {"nosuch": 1}},
        {"task": {"name": "digits", "options": {"hidden_dim": "wide"}}},
        {"task": {"options": {"no_such_digits_option": 1}}},  # digits is the default task
    ],
)
def test_the_schema_rejects_a_bad_file(data: dict[str, Any], tmp_path: Path) -> None:
    validator = jsonschema.Draft202012Validator(config_schema())
    assert list(validator.iter_errors(data)), data


def test_the_schema_accepts_float_strings_and_describes_every_key() -> None:
    schema = config_schema()
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors({"train": {"lr": "1e-3"}}))  # as YAML 1.1 reads it
    fl = schema["properties"]["fl"]["properties"]
    assert fl["rounds"]["default"] == 100 and fl["rounds"]["minimum"] == 1
    assert fl["rank_levels"]["default"] == [8, 16, 32, 48, 64]
    assert fl["rounds"]["description"] == "Number of federated rounds."
    options = schema["properties"]["method_options"]["properties"]
    assert set(available_methods()) <= set(options)


def test_config_schema_cli_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == config_schema()


# ---------------------------------------------------------------------------- the reference


def test_docs_configuration_md_is_generated_from_the_schema() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == config_markdown(), (
        "docs/configuration.md is stale: raflora config --markdown > docs/configuration.md"
    )


def test_the_reference_lists_every_key_method_and_task() -> None:
    text = config_markdown()
    for f in dataclasses.fields(RunConfig):
        section = getattr(RunConfig(), f.name)
        if dataclasses.is_dataclass(section):
            for sub in dataclasses.fields(section):
                assert f"| `{f.name}.{sub.name}` |" in text
        else:
            assert f"| `{f.name}` |" in text
    for method in available_methods():
        assert f"\n### {method}\n" in text
    for task, cls in task_options_classes().items():
        assert f"\n### {task}\n" in text
        for sub in dataclasses.fields(cls) if cls is not None else ():
            assert f"| `{sub.name}` |" in text, (task, sub.name)


def test_the_causal_lm_tasks_declare_the_options_they_check() -> None:
    """The declared options (docs, JSON Schema) are the keys the task's parser accepts."""
    from raflora.tasks.commonsense import CommonsenseTask
    from raflora.tasks.math import MathReasoningTask
    from raflora.tasks.reasoning import _SPLIT_KEYS, PROMPT_TEMPLATES, CausalLMOptions

    for task in (MathReasoningTask, CommonsenseTask):
        declared = task.Options
        assert declared is not None
        names = {f.name for f in dataclasses.fields(declared)}
        extra = {"max_new_tokens", "prompt_template", *task._extra_options(task.__new__(task))}
        assert names == {*_SPLIT_KEYS, *extra}, task.name
        defaults = declared()
        assert defaults.max_new_tokens == task.default_max_new_tokens  # type: ignore[attr-defined]
    assert set(get_args(get_type_hints(CausalLMOptions)["prompt_template"])) == set(
        PROMPT_TEMPLATES
    )
