"""Typed method options: declaration, type checks, resolution per method, compare and help."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import yaml

from raflora.cli import main
from raflora.config import ConfigError, load_config
from raflora.methods import (
    Aggregator,
    HetLoRA,
    RaFLoRA,
    available_methods,
    get_aggregator,
    register,
)
from raflora.methods.hetlora import HetLoRAOptions
from raflora.methods.options import (
    MethodOptions,
    OptionsError,
    option,
    option_specs,
    parse_options,
)
from raflora.methods.raflora import RaFLoRAOptions
from raflora.methods.registry import options_for, resolve_method_options

BOTH = {"raflora": {"empty_partition": "drop"}, "hetlora": {"weighting": "samples"}}


def _config_problems(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    return exc.value.problems


# ----------------------------------------------------------------------- type checks


@pytest.mark.parametrize("value", ['"no"', "0", "1", "null"])
def test_a_bool_option_takes_only_a_yaml_bool(value: str) -> None:
    problems = _config_problems(["method=hetlora", f"method_options={{self_pruning: {value}}}"])
    assert len(problems) == 1, problems
    assert problems[0].startswith("method_options.self_pruning (hetlora): expected bool, got ")


def test_self_pruning_no_is_refused_by_get_aggregator_too() -> None:
    with pytest.raises(ValueError, match=r"hetlora\.self_pruning: expected bool, got str 'no'"):
        get_aggregator("hetlora", [2, 4], self_pruning="no")


def test_a_float_option_takes_an_int_or_a_float_string() -> None:
    cfg = load_config(
        None, ["method=hetlora", "method_options={pruning_lambda: 0, pruning_gamma: '5e-1'}"]
    )
    agg = get_aggregator("hetlora", [2, 4], **options_for("hetlora", cfg.method_options))
    assert isinstance(agg, HetLoRA)
    assert agg.pruning_lambda == 0.0 and isinstance(agg.pruning_lambda, float)
    assert agg.pruning_gamma == 0.5


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"pruning_gamma": 1}, "pruning_gamma: must be a finite number in (0, 1), got 1.0"),
        ({"pruning_gamma": math.nan}, "pruning_gamma: must be a finite number in (0, 1), got nan"),
        ({"pruning_lambda": -1e-3}, "pruning_lambda: must be a finite number ≥ 0, got -0.001"),
        ({"pruning_lambda": math.inf}, "pruning_lambda: must be a finite number ≥ 0, got inf"),
        ({"weighting": "loss"}, "weighting: must be one of 'sparsity', 'samples', got 'loss'"),
        ({"pruning_gamma": "high"}, "pruning_gamma: expected float, got str 'high'"),
    ],
)
def test_values_are_checked_against_the_declaration(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(OptionsError) as exc:
        get_aggregator("hetlora", [2, 4], **options)
    assert exc.value.problems == [f"hetlora.{fragment}"]


def test_every_problem_is_reported_at_once() -> None:
    problems = _config_problems(
        [
            "method=hetlora",
            "method_options={self_pruning: 'no', pruning_gamma: 2, weighting: loss, "
            "raflora: {empty_partition: zero}}",
            "fl.rounds=0",
        ]
    )
    text = "\n".join(problems)
    for key in ("self_pruning", "pruning_gamma", "weighting", "raflora.empty_partition"):
        assert f"method_options.{key}" in text, text
    assert "fl.rounds" in text


def test_options_objects_check_themselves() -> None:
    with pytest.raises(OptionsError, match="self_pruning: expected bool"):
        HetLoRAOptions(self_pruning="no")  # type: ignore[arg-type]
    assert HetLoRAOptions(pruning_lambda=0).pruning_lambda == 0.0  # type: ignore[arg-type]


def test_the_aggregator_holds_its_typed_options() -> None:
    agg = get_aggregator("raflora", [2, 4], empty_partition="drop")
    assert agg.options == RaFLoRAOptions(empty_partition="drop")
    assert isinstance(agg, RaFLoRA) and agg.empty_partition == "drop"
    assert get_aggregator("flexlora", [2, 4]).options == MethodOptions()
    with pytest.raises(TypeError, match="RaFLoRAOptions"):
        RaFLoRA([2, 4], HetLoRAOptions())


# ------------------------------------------------------------------------- resolution


def test_a_key_named_after_a_method_holds_that_methods_options() -> None:
    run = ["hetlora", "raflora", "flexlora"]
    assert resolve_method_options(BOTH, run) == {
        "hetlora": {"weighting": "samples"},
        "raflora": {"empty_partition": "drop"},
        "flexlora": {},
    }
    cfg = load_config(None, ["method=hetlora", f"method_options={BOTH}"])
    agg = get_aggregator("hetlora", [2, 4], **options_for("hetlora", cfg.method_options))
    assert isinstance(agg, HetLoRA) and agg.weighting == "samples"


def test_a_plain_key_applies_to_every_method_that_declares_it() -> None:
    options = {"weighting": "samples", "self_pruning": True}
    resolved = resolve_method_options(options, ["hetlora", "raflora", "flora"])
    assert resolved == {"hetlora": options, "raflora": {}, "flora": {}}


def test_a_methods_own_entry_wins_over_a_plain_key() -> None:
    options = {"weighting": "samples", "hetlora": {"weighting": "sparsity"}}
    assert options_for("hetlora", options) == {"weighting": "sparsity"}


def test_a_methods_entry_for_a_method_not_run_is_kept_but_checked() -> None:
    assert options_for("flexlora", BOTH) == {}
    with pytest.raises(OptionsError, match=r"method_options\.raflora\.empty_partition: must be"):
        options_for("flexlora", {"raflora": {"empty_partition": "zero"}})


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (
            {"empty_partiton": "drop"},
            "unknown key 'empty_partiton' (did you mean 'empty_partition'?)",
        ),
        ({"raflra": {"empty_partition": "drop"}}, "unknown key 'raflra' (did you mean 'raflora'?)"),
        (
            {"raflora": {"empty_partiton": "drop"}},
            "method_options.raflora.empty_partiton: unknown option of raflora (did you mean "
            "'empty_partition'?)",
        ),
        ({"raflora": "drop"}, "method_options.raflora: must be a mapping of raflora's options"),
    ],
)
def test_unknown_keys_say_what_was_meant(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(OptionsError) as exc:
        options_for("raflora", options)
    assert any(fragment in p for p in exc.value.problems), exc.value.problems


def test_a_plain_key_no_method_run_declares_is_an_error_naming_its_owner() -> None:
    problems = _config_problems(["method=hetlora", "method_options={empty_partition: drop}"])
    assert len(problems) == 1
    assert problems[0].startswith("method_options.empty_partition: an option of raflora, not of")
    # in a comparison that includes raflora the same key is fine
    resolved = resolve_method_options({"empty_partition": "drop"}, ["hetlora", "raflora"])
    assert resolved == {"hetlora": {}, "raflora": {"empty_partition": "drop"}}


def test_unknown_methods_of_a_comparison_are_named() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, methods=["raflora", "nope"])
    assert any("methods: unknown method 'nope'" in p for p in exc.value.problems)


# ------------------------------------------------------------------------ declaration


def test_option_specs_read_type_default_choices_and_bounds() -> None:
    specs = {s.name: s for s in option_specs(HetLoRAOptions)}
    assert list(specs) == ["weighting", "self_pruning", "pruning_gamma", "pruning_lambda"]
    assert specs["weighting"].choices == ("sparsity", "samples")
    assert specs["self_pruning"].type is bool and specs["self_pruning"].default is False
    assert specs["pruning_gamma"].describe()[0] == "  pruning_gamma (float in (0, 1), default 0.99)"
    assert specs["pruning_lambda"].bounds is not None
    assert specs["pruning_lambda"].bounds.describe() == "≥ 0"


def test_defaults_are_unchanged() -> None:
    assert HetLoRAOptions() == HetLoRAOptions("sparsity", False, 0.99, 1e-3)
    assert RaFLoRAOptions().empty_partition == "carry"


@dataclass(frozen=True)
class _ClashOptions(MethodOptions):
    flora: bool = option(False, "An option named like a method.")


class _NotADataclass(MethodOptions):
    level: int = 1


def _method(options: type[MethodOptions]) -> type[Aggregator]:
    class _Method(Aggregator):
        name: ClassVar[str] = "test-only-method"
        Options = options

        def aggregate_module(self, updates: Any, previous: Any = None) -> Any:
            raise NotImplementedError

    return _Method


def test_register_refuses_options_named_like_a_method_or_not_a_dataclass() -> None:
    with pytest.raises(ValueError, match="option and method names must differ"):
        register(_method(_ClashOptions))
    with pytest.raises(TypeError, match="frozen dataclass"):
        register(_method(_NotADataclass))
    assert "test-only-method" not in available_methods()


def test_parse_options_accepts_literal_and_names_the_method() -> None:
    @dataclass(frozen=True)
    class Opts(MethodOptions):
        mode: Literal["a", "b"] = option("a", "A mode.")

    assert parse_options(Opts, {"mode": "b"}, owner="m").mode == "b"
    with pytest.raises(OptionsError, match=r"m\.mode: must be one of 'a', 'b', got 'c'"):
        parse_options(Opts, {"mode": "c"}, owner="m")


# ------------------------------------------------------------------------------- CLI

TINY = {
    "method": "raflora",
    "seed": 1,
    "task": {"name": "synthetic", "options": {"num_train": 200, "num_eval": 100}},
    "fl": {"num_clients": 4, "clients_per_round": 2, "rounds": 1, "rank_levels": [2, 4]},
    "train": {"lr": 5e-3, "batch_size": 32},
    "eval": {"batch_size": 100},
    "output": {"plots": False},
}


def test_raflora_config_lists_each_methods_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    methods = text[text.index("Method options") :]
    assert "\nhetlora:\n  weighting ('sparsity' | 'samples', default sparsity)\n" in methods
    assert "  self_pruning (bool, default false)\n" in methods
    assert "  pruning_lambda (float ≥ 0, default 0.001)\n" in methods
    assert "\nraflora:\n  empty_partition ('carry' | 'drop', default carry)\n" in methods
    assert "\nflexlora:  (no options)\n" in methods


def test_compare_gives_each_method_only_its_own_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "cmp"
    args = ["compare", str(config), "method_options={empty_partition: drop}", "--out", str(out)]
    assert main([*args, "--quiet"]) == 0, capsys.readouterr().err
    for method in ("hetlora", "flora", "flexlora", "raflora"):
        saved = yaml.safe_load((out / method / "config.yaml").read_text())
        expected = {"empty_partition": "drop"} if method == "raflora" else {}
        assert saved["method_options"] == expected, method
    # each run directory reproduces its run from its own config.yaml
    assert main(["run", "--resume", str(out / "raflora"), "--quiet"]) == 0
    assert main(["export", str(out / "hetlora"), "--out", str(tmp_path / "adapter")]) == 0
    capsys.readouterr()
    # a key no compared method declares is refused before anything runs
    bad = ["compare", str(config), "method_options={weighting: samples}", "--methods", "flora"]
    assert main([*bad, "--out", str(tmp_path / "bad")]) == 2
    assert "method_options.weighting: an option of hetlora" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_compare_all_runs_every_method_that_supports_the_ranks_and_lists_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from raflora.methods import available_methods
    from raflora.methods.registry import unsupported_reason

    assert unsupported_reason("fedit", [2, 4]) is not None
    assert unsupported_reason("fedit", [4]) is None
    assert all(unsupported_reason(m, [2, 4]) is None for m in available_methods() if m != "fedit")
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "task": {"name": "synthetic", "options": {"num_train": 120, "num_eval": 60}},
                "fl": {
                    "num_clients": 3,
                    "clients_per_round": 2,
                    "rounds": 1,
                    "rank_levels": [2, 4],
                },
                "output": {"plots": False},
            }
        )
    )
    out = tmp_path / "all"
    assert main(["compare", str(config), "--methods", "all", "--out", str(out), "--quiet"]) == 0
    assert "skipping fedit: needs a single rank level" in capsys.readouterr().err
    expected = sorted(m for m in available_methods() if m != "fedit")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == expected
    text = (out / "comparison.md").read_text()
    assert "- fedit: needs a single rank level" in text
