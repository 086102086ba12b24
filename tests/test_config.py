"""Run configuration: defaults, YAML loading, overrides, validation and round-trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from raflora.config import (
    ConfigError,
    FLConfig,
    LoRAConfig,
    RunConfig,
    config_from_dict,
    config_to_dict,
    describe_config,
    load_config,
    save_config,
    validate,
)
from raflora.methods import available_methods


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _problems(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return exc.value.problems


# ---------------------------------------------------------------------------- defaults


def test_defaults_are_valid() -> None:
    cfg = RunConfig()
    assert validate(cfg) == []
    assert cfg.method == "raflora"
    assert cfg.seed == 0
    assert cfg.engine == "local"
    assert cfg.method_options == {}
    assert (cfg.device, cfg.dtype) == ("cpu", "float32")
    assert cfg.task.name == "digits"
    assert cfg.task.max_length == 128
    assert cfg.fl.rank_levels == [8, 16, 32, 48, 64]
    assert cfg.fl.rank_probs is None
    assert cfg.data.partition == "iid"
    assert cfg.train.lr == 5e-4
    assert cfg.train.lr_schedule == "linear"
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.lora.alpha == "rank"
    assert cfg.flower.cpus_per_client == 1.0
    assert cfg.output.plots is True
    assert load_config(None) == cfg
    assert config_from_dict({}) == cfg
    assert config_from_dict(None) == cfg


def test_configs_and_their_lists_are_frozen() -> None:
    a, b = RunConfig(), RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.fl.rounds = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="immutable"):
        a.fl.rank_levels.append(128)
    with pytest.raises(TypeError, match="immutable"):
        a.method_options["x"] = 1  # type: ignore[index]
    assert b.fl.rank_levels == [8, 16, 32, 48, 64]
    assert b.method_options == {}


def test_every_field_has_help_and_is_described() -> None:
    text = describe_config()
    sections = {"task", "fl", "data", "train", "lora", "eval", "flower", "output", "privacy"}
    for f in dataclasses.fields(RunConfig):
        assert f.metadata.get("help"), f.name
        if f.name in sections:
            assert f"\n{f.name}:  " in text
            section_cls = type(getattr(RunConfig(), f.name))
            for sub in dataclasses.fields(section_cls):
                assert sub.metadata.get("help"), f"{f.name}.{sub.name}"
                assert f"  {f.name}.{sub.name} (" in text
        else:
            assert f"  {f.name} (" in text
    assert "data.partition (str, default iid)" in text
    # then every method's options, after the config keys
    for method in available_methods():
        assert f"\n{method}:" in text[text.index("Method options") :]
    assert "  empty_partition ('carry' | 'drop', default carry)" in text
    assert "fl.rank_levels (list[int], default [8, 16, 32, 48, 64])" in text


# ---------------------------------------------------------------------------- YAML + overrides


def test_load_yaml(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
method: hetlora
seed: 3
method_options: {weighting: samples}
task:
  name: text-classification
  model: ./models/tiny-bert
  text_column: sentence
fl:
  num_clients: 20
  clients_per_round: 5
  rounds: 7
  rank_levels: [4, 8]
  rank_probs: [0.25, 0.75]
train:
  lr: 1         # int for a float field is fine
  max_grad_norm: 1.0
lora:
  target_modules: [query, value]
  alpha: 16
data:
  partition: dir-a0.5
eval:             # empty section keeps defaults
""",
    )
    cfg = load_config(path)
    assert cfg.method == "hetlora"
    assert cfg.seed == 3
    assert cfg.method_options == {"weighting": "samples"}
    assert cfg.task.name == "text-classification"
    assert cfg.task.model == "./models/tiny-bert"
    assert cfg.task.text_column == "sentence"
    assert cfg.fl == FLConfig(20, 5, 7, [4, 8], [0.25, 0.75])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_grad_norm == 1.0
    assert cfg.lora.target_modules == ["query", "value"]
    assert cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.data.partition == "dir-a0.5"
    assert cfg.eval.every == 1


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "# nothing here\n")) == RunConfig()


def test_overrides_of_nested_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "task:\n  model: some/model\nfl:\n  rounds: 5\n")
    cfg = load_config(
        path,
        [
            "fl.rounds=9",
            "fl.rank_levels=[8,16]",
            "fl.rank_probs=[0.5, 0.5]",
            "train.lr=1e-3",  # YAML leaves "1e-3" a string; float fields coerce it
            "train.weight_decay=0",
            "lora.target_modules=[q_proj,v_proj]",
            "lora.alpha=rank",
            "task.model=null",
            "task.options.subset=high_school",
            "method_options.empty_partition=drop",
            "output.dir=runs/a=b",  # only the first '=' splits
            "train.gradient_checkpointing=true",
            "engine=flower",
            "flower.gpus_per_client=0.5",
        ],
    )
    assert cfg.fl.rounds == 9
    assert cfg.fl.rank_levels == [8, 16]
    assert cfg.fl.rank_probs == [0.5, 0.5]
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.alpha == "rank"
    assert cfg.task.model is None
    assert cfg.task.options == {"subset": "high_school"}
    assert cfg.method_options == {"empty_partition": "drop"}
    assert cfg.output.dir == "runs/a=b"
    assert cfg.train.gradient_checkpointing is True
    assert cfg.engine == "flower"
    assert cfg.flower.gpus_per_client == 0.5


def test_later_override_wins() -> None:
    assert load_config(None, ["seed=1", "seed=2"]).seed == 2


def test_whole_section_override_with_mapping() -> None:
    cfg = load_config(None, ["eval={every: 5, batch_size: 8}"])
    assert (cfg.eval.every, cfg.eval.batch_size) == (5, 8)


# ---------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_lists_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, "methd: raflora\n"))
    (msg,) = _problems(exc)
    assert "unknown top-level key 'methd'" in msg
    assert "did you mean 'method'" in msg
    for key in ("method", "seed", "engine", "fl", "train", "lora", "flower", "output"):
        assert key in msg


def test_unknown_nested_key_lists_section_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, "fl:\n  num_client: 10\n"))
    (msg,) = _problems(exc)
    assert msg.startswith("fl: unknown key 'num_client'")
    assert "valid keys: num_clients, clients_per_round, rounds, rank_levels, rank_probs" in msg


def test_unknown_override_keys() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.learning_rate=1e-3", "nosuch=1", "train.lr.x=1"])
    problems = _problems(exc)
    assert len(problems) == 3
    assert "train: unknown key 'learning_rate'" in problems[0]
    assert "lr_schedule" in problems[0]  # lists the section's keys
    assert "unknown top-level key 'nosuch'" in problems[1]
    assert "train.lr is not a section" in problems[2]


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["fl.rounds", "=3", "fl..rounds=3"])
    problems = _problems(exc)
    assert len(problems) == 3
    assert all("override" in p for p in problems)
    assert "expected 'section.key=value'" in problems[0]


def test_config_from_dict_rejects_unknown_keys_and_bad_sections() -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"lora": {"rank": 8}, "train": 5})
    problems = _problems(exc)
    assert any(p.startswith("lora: unknown key 'rank'") and "target_modules" in p for p in problems)
    assert "train: must be a mapping, got int" in problems


# ---------------------------------------------------------------------------- validation


def test_many_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(
            None,
            [
                "fl.rounds=0",
                "fl.num_clients=4",
                "fl.clients_per_round=5",
                "train.lr=-1",
                "engine=spark",
                "device=tpu",
                "dtype=int8",
                "task.name=vision",
                "method=fedsgd",
                "train.batch_size=true",  # bools are not ints
                "lora.target_modules=q_proj",  # strings are not lists (unless 'all-linear')
                "fl.rank_levels=[16,8]",
            ],
        )
    problems = _problems(exc)
    assert len(set(problems)) >= 10
    text = str(exc.value)
    assert text.startswith("invalid config:\n  - ")
    assert "fl.rounds: must be ≥ 1, got 0" in problems
    assert any("fl.clients_per_round: must be ≤ fl.num_clients (4), got 5" in p for p in problems)
    assert any(p.startswith("train.lr: must be") for p in problems)
    assert "engine: must be one of 'local', 'flower', got 'spark'" in problems
    assert any(p.startswith("device:") and "'auto'" in p for p in problems)
    assert any(p.startswith("dtype:") and "'bfloat16'" in p for p in problems)
    assert any(p.startswith("task.name:") and "'math-reasoning'" in p for p in problems)
    method_msg = next(p for p in problems if p.startswith("method:"))
    for name in available_methods():
        assert name in method_msg
    assert any(p.startswith("train.batch_size: expected int, got bool") for p in problems)
    assert any(p.startswith("lora.target_modules:") for p in problems)
    assert any("strictly increasing" in p for p in problems)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["fl.rank_levels=[]"], "fl.rank_levels: must not be empty"),
        (["fl.rank_levels=[0, 8]"], "ranks must be positive"),
        (["fl.rank_levels=[8, 8]"], "strictly increasing"),
        (["fl.rank_levels=8"], "fl.rank_levels: expected list[int]"),
        (["fl.rank_levels=[8, 16.5]"], "fl.rank_levels: expected list[int]"),
        (["fl.rank_probs=[0.5, 0.5]"], "one entry per rank level (5), got 2"),
        (["fl.rank_probs=[0.2, 0.2, 0.2, 0.2, 0.3]"], "must sum to 1"),
        (["fl.rank_probs=[-0.2, 0.4, 0.4, 0.2, 0.2]"], "non-negative"),
        (["train.lr=0"], "train.lr: must be a finite number > 0, got 0.0"),
        (["train.lr=abc"], "train.lr: expected float, got str"),
        (["train.lr_schedule=cosine"], "'linear', 'constant'"),
        (["train.weight_decay=-0.1"], "train.weight_decay"),
        (["train.max_grad_norm=0"], "train.max_grad_norm"),
        (["lora.alpha=big"], "lora.alpha: must be 'rank' or a positive number"),
        (["lora.alpha=-2"], "lora.alpha"),
        (["lora.dropout=1.0"], "lora.dropout: must be in [0, 1)"),
        (["lora.target_modules=[]"], "non-empty list"),
        (["lora.modules_to_save=classifier"], "lora.modules_to_save: expected list[str] | null"),
        (["eval.every=0"], "eval.every: must be ≥ 1"),
        (["task.max_length=0"], "task.max_length"),
        (["task.num_eval_samples=0"], "task.num_eval_samples"),
        (["data.min_samples=0"], "data.min_samples"),
        (["flower.supernodes=0"], "flower.supernodes"),
        (["flower.cpus_per_client=0"], "flower.cpus_per_client"),
        (["seed=-1"], "seed: must be ≥ 0"),
        (["seed=1.5"], "seed: expected int, got float"),
        (["output.plots=1"], "output.plots: expected bool, got int"),
        (["method_options.empty_partition=sometimes"], "empty_partition"),
        (["method_options.nosuch=1"], "nosuch"),
        (
            ["method=hetlora", "method_options.self_pruning='no'"],
            "method_options.self_pruning (hetlora): expected bool, got str 'no'",
        ),
        (["method_options.empty_partiton=drop"], "(did you mean 'empty_partition'?)"),
        (
            ["method=hetlora", "method_options.empty_partition=drop"],
            "method_options.empty_partition: an option of raflora, not of the method(s) run",
        ),
    ],
)
def test_single_problems(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert any(fragment in p for p in _problems(exc)), _problems(exc)


def test_rank_probs_within_tolerance_accepted() -> None:
    cfg = load_config(
        None, ["fl.rank_levels=[8, 16, 32]", "fl.rank_probs=[0.3333333, 0.3333333, 0.3333334]"]
    )
    assert cfg.fl.rank_probs is not None and len(cfg.fl.rank_probs) == 3


def test_fedit_with_multiple_levels_names_hetlora() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["method=fedit"])
    (msg,) = _problems(exc)
    assert msg.startswith("method:")
    assert "hetlora" in msg
    assert load_config(None, ["method=fedit", "fl.rank_levels=[16]"]).method == "fedit"


@pytest.mark.parametrize("spec", ["dirichlet", "dir-a0", "dir-a-1", "patho-c0a1", "IID", ""])
def test_bad_partition(spec: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, [f"data.partition={spec!r}"])
    (msg,) = _problems(exc)
    assert msg.startswith("data.partition: ")


@pytest.mark.parametrize("spec", ["iid", "dir-a0.5", "patho-c2a1"])
def test_good_partition(spec: str) -> None:
    assert load_config(None, [f"data.partition={spec}"]).data.partition == spec


def test_validate_flags_wrong_types_set_in_python() -> None:
    # a frozen config built directly holds what it was given; validation names it
    cfg = RunConfig(fl=FLConfig(rounds="ten"), lora=LoRAConfig(use_rslora=1))  # type: ignore[arg-type]
    problems = validate(cfg)
    assert "fl.rounds: expected int, got str 'ten'" in problems
    assert "lora.use_rslora: expected bool, got int 1" in problems
    assert len(problems) == 2


# ---------------------------------------------------------------------------- files


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value)
    assert "not found" in str(exc.value)


def test_yaml_syntax_error_is_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "fl:\n  rounds: 3\n  rank_levels: [8, 16\ntrain:\n  lr: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    (msg,) = _problems(exc)
    assert str(path) in msg
    assert "invalid YAML (line " in msg


def test_non_mapping_yaml_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_config_error_is_value_error() -> None:
    err = ConfigError(["a: bad", "b: worse"])
    assert isinstance(err, ValueError)
    assert err.problems == ["a: bad", "b: worse"]
    assert str(err) == "invalid config:\n  - a: bad\n  - b: worse"


# ---------------------------------------------------------------------------- round-trip


def test_round_trip_defaults(tmp_path: Path) -> None:
    cfg = RunConfig()
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert path.exists()
    assert load_config(path) == cfg


def test_round_trip_customized(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "method=hetlora",
            "method_options={weighting: samples, self_pruning: true}",
            "task.name=math-reasoning",
            "task.model=Qwen/Qwen2.5-0.5B",
            "task.options={split: test, shots: 0}",
            "fl.rank_levels=[4, 8, 16]",
            "fl.rank_probs=[0.2, 0.3, 0.5]",
            "train.lr=1e-10",
            "train.max_grad_norm=0.3",
            "lora.target_modules=[q_proj, v_proj]",
            "lora.alpha=32",
            "lora.modules_to_save=[score]",
            "flower.supernodes=4",
            "output.dir=runs/x",
            "output.plots=false",
            "dtype=bfloat16",
        ],
    )
    path = save_config(cfg, tmp_path / "config.yaml")
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.train.lr == 1e-10
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert raw == config_to_dict(cfg)
    assert list(raw) == [f.name for f in dataclasses.fields(RunConfig)]


def test_config_to_dict_is_a_deep_copy() -> None:
    cfg = RunConfig()
    d = config_to_dict(cfg)
    d["fl"]["rank_levels"].append(99)
    assert cfg.fl.rank_levels == [8, 16, 32, 48, 64]
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_several_files_merge_section_by_section_in_order(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("method: flexlora\nfl: {num_clients: 20, rounds: 7, rank_levels: [8, 16]}\n")
    preset = tmp_path / "preset.yaml"
    preset.write_text("fl: {rank_levels: [1, 4, 16], rank_probs: [0.5, 0.25, 0.25]}\n")
    cfg = load_config([base, preset], ["fl.rounds=9"])
    assert cfg.method == "flexlora"
    assert (cfg.fl.num_clients, cfg.fl.rounds) == (20, 9)
    assert cfg.fl.rank_levels == [1, 4, 16] and cfg.fl.rank_probs == [0.5, 0.25, 0.25]
    with pytest.raises(ConfigError, match="not found"):
        load_config([base, tmp_path / "missing.yaml"])


def test_every_paper_rank_preset_applies_to_its_base_config() -> None:
    root = Path(__file__).resolve().parents[1] / "configs" / "paper"
    presets = sorted((root / "ranks").glob("*.yaml"))
    assert len(presets) == 12
    for preset in presets:
        base = "gsm8k-llama.yaml" if preset.stem.startswith("conf") else "commonsense-llama.yaml"
        cfg = load_config([root / base, preset])
        assert cfg.fl.rank_levels == yaml.safe_load(preset.read_text())["fl"]["rank_levels"]
        assert cfg.fl.rounds == 20
