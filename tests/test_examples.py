"""The "Writing your own method" example: it runs, trains through both of its halves, and its
README's tables list every hook, capability and context field of the method API.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from raflora.methods import Capabilities, ClientRound, Method, RoundContext, get_aggregator
from raflora.methods import registry as methods_registry

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
README = (EXAMPLES / "README.md").read_text()


def load_example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``examples/custom_method.py`` as a user would, its registration undone afterwards
    (the registry is global: other tests list every registered method).
    """
    monkeypatch.setattr(methods_registry, "_REGISTRY", dict(methods_registry._REGISTRY))
    spec = importlib.util.spec_from_file_location(
        "custom_method_example", EXAMPLES / "custom_method.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def test_the_example_method_trains_through_both_halves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example(monkeypatch)
    assert example.NAME in methods_registry.available_methods()
    method_cls = example.ProxWarmup
    rounds_seen: list[int] = []
    aggregate_module = method_cls.aggregate_module

    def recording(self: Any, ctx: RoundContext, updates: Any, previous: Any = None) -> Any:
        rounds_seen.append(ctx.round_index)
        if ctx.round_index == 1:  # the warm-up: A came back exactly as it was sent
            for _, A_k, _ in updates:
                assert torch.equal(A_k, previous[1][..., : A_k.shape[-2], :])
        return aggregate_module(self, ctx, updates, previous)

    monkeypatch.setattr(method_cls, "aggregate_module", recording)
    example.main(["--out", str(tmp_path / "run")])

    assert sorted(set(rounds_seen)) == [1, 2]  # the server rule ran in both rounds
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["round 1", "round 2"]
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["train_loss"]) and 0 <= row["accuracy"] <= 1
        assert row["accepted"] == 3
    # upload_bytes reads ctx.round_index: B only in the warm-up round, both factors after it
    assert rows[0]["upload_bytes"] < rows[1]["upload_bytes"]


# ----------------------------------------------------------------- the hooks table


def public_hooks(cls: type) -> set[str]:
    """The public methods and properties a class defines (what a subclass may override)."""
    return {
        name
        for name, value in vars(cls).items()
        if not name.startswith("_")
        and (callable(value) or isinstance(value, property | staticmethod | classmethod))
        and not isinstance(value, type)
    }


def table_rows(heading: str) -> list[str]:
    """The table rows (``| … |``) of the README section under ``## heading``."""
    section = README.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]


def first_cell_names(heading: str, column: int) -> set[str]:
    """The names in backticks in column ``column`` of the section's table."""
    names = set()
    for row in table_rows(heading):
        cell = row.strip("|").split("|")[column]
        names.update(re.findall(r"`([A-Za-z_.]+)", cell))
    return names


def test_the_hooks_table_lists_every_hook_of_both_halves_and_nothing_else() -> None:
    listed = first_cell_names("The hooks", 1)
    server = public_hooks(Method)
    client = {f"ClientRound.{name}" for name in public_hooks(ClientRound)}
    client |= {
        f"ClientRound.{name}" for name in ("trains", "uses_penalty", "corrects_gradients")
    }  # class attributes a client half sets
    assert {"client_rank", "client_factors", "model_factors", "level_factors"} <= server
    assert server | client == listed


def test_the_capabilities_and_context_tables_list_every_field() -> None:
    capabilities = {f.name for f in dataclasses.fields(Capabilities)}
    assert first_cell_names("Capabilities", 0) == capabilities
    context = {f.name for f in dataclasses.fields(RoundContext)}
    assert first_cell_names("The context", 0) == context
    for attribute in ("name", "capabilities", "Options", "ClientRoundType"):
        assert f"`{attribute}`" in README


def test_a_0_1_capability_flag_in_a_subclass_is_refused_with_the_way_to_declare_it() -> None:
    with pytest.raises(TypeError, match=r"capabilities = Capabilities\(single_rank_level=True\)"):

        class _Old(Method):
            single_rank_level = True  # type: ignore[assignment]

    class _New(Method):
        capabilities = Capabilities(single_rank_level=True)

    assert _New.single_rank_level and not _New.reads_base_weights  # the read-only views
    with pytest.raises(AttributeError, match="read from the method's capabilities"):
        get_aggregator("raflora", [2, 4]).single_rank_level = True  # on an instance too
