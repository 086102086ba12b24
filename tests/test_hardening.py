"""Hardening on the CPU: devices, dtypes, RNG hygiene, CUDA timing, FLoRA in bf16."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY_SYNTHETIC, config_with
from raflora.adapters import adapter_name, base_weights
from raflora.config import ConfigError, RunConfig, validated
from raflora.engine import build_federation, run_local
from raflora.engine import client_round as client_round_module
from raflora.engine.client_round import train_client
from raflora.engine.metering import device_clock
from raflora.engine.run_files import open_run
from raflora.methods import ClientUpdate, get_aggregator
from raflora.methods.context import RoundContext
from raflora.methods.validation import DeviceMismatchError, DTypeError

SHAPES = {"a": (5, 4), "b": (3, 6)}


def tiny_config(**over: Any) -> RunConfig:
    return config_with(TINY_SYNTHETIC, **over)


def update(cid: int, rank: int, dtype: torch.dtype, device: str = "cpu") -> ClientUpdate:
    g = torch.Generator().manual_seed(cid)
    factors = {
        name: (
            torch.randn(d, rank, generator=g).to(device=device, dtype=dtype),
            torch.randn(rank, n, generator=g).to(device=device, dtype=dtype),
        )
        for name, (d, n) in SHAPES.items()
    }
    head = torch.randn(2, 3, generator=g).to(device=device, dtype=dtype)
    return ClientUpdate(cid, rank, 10, factors, {"head": head})


def state_for(method: str, device: str = "cpu") -> Any:
    agg = get_aggregator(method, [2, 4])
    ctx = RoundContext(generator=torch.Generator().manual_seed(0), device=device)
    state = agg.init_state(ctx, SHAPES, {"head": torch.zeros(2, 3, device=device)})
    return agg, state


# ------------------------------------------------------------------------------------ devices


def test_initial_state_lives_on_the_runs_device() -> None:
    fed = build_federation(tiny_config())
    fed = dataclasses.replace(fed, device=torch.device("meta"))
    state = fed.initial_state()
    tensors = [t for pair in state.factors.values() for t in pair] + list(state.dense.values())
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert all(t.dtype == torch.float32 for t in tensors)


def test_a_resumed_state_is_loaded_onto_the_runs_device(tmp_path: Path) -> None:
    cfg = tiny_config(**{"fl.rounds": 1})
    run_local(cfg, tmp_path, progress=False)
    fed = dataclasses.replace(build_federation(cfg), device=torch.device("meta"))
    start = open_run(cfg, tmp_path, resume=True, fed=fed)
    assert start.state.device.type == "meta"
    assert all(B.device.type == "meta" for B, _ in start.state.factors.values())


@pytest.mark.parametrize("method", ["hetlora", "flexlora", "raflora", "flora"])
def test_an_update_on_another_device_is_rejected_by_name(method: str) -> None:
    agg, state = state_for(method, device="meta")
    outcome = agg.aggregate(state, [update(1, 2, torch.float32, device="cpu")])
    assert outcome.accepted == ()
    assert "device cpu" in outcome.rejected[1] and "meta" in outcome.rejected[1]
    with pytest.raises(DeviceMismatchError):
        agg.validate(state, update(1, 2, torch.float32, device="cpu"))


def test_device_clock_synchronises_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    device_clock(torch.device("cpu"))
    assert calls == []
    device_clock(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]


def test_the_clients_time_split_is_read_from_the_device_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fed = build_federation(tiny_config())
    state = fed.initial_state()
    reads: list[torch.device] = []

    def clock(device: torch.device) -> float:
        reads.append(device)
        return 0.0

    monkeypatch.setattr(client_round_module, "device_clock", clock)
    rank = fed.rank_of(state, 0)
    result = train_client(fed, 0, rank, fed.client_message(state, 0, 1), state.dense, 1, 1e-3)
    # one read before and after every step, and around the whole local round
    assert len(reads) == 2 * result.steps + 2 and result.steps > 0
    assert set(reads) == {fed.device}


# ------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("method", ["hetlora", "flexlora", "raflora", "flora", "fedit"])
def test_the_state_stays_float32_when_a_bf16_update_is_accepted(method: str) -> None:
    levels = [4] if method == "fedit" else [2, 4]
    agg = get_aggregator(method, levels)
    ctx = RoundContext(generator=torch.Generator().manual_seed(0))
    state = agg.init_state(ctx, SHAPES, {"head": torch.zeros(2, 3)})
    updates = [update(1, 4, torch.bfloat16), update(2, levels[0], torch.float32)]
    outcome = agg.aggregate(state, updates, wire_dtypes=(torch.bfloat16,))
    assert outcome.accepted == (1, 2)
    new = outcome.state
    assert all(B.dtype == A.dtype == torch.float32 for B, A in new.factors.values())
    assert new.dense["head"].dtype == torch.float32
    # the bf16 update was upcast, not rounded back: the head is the float32 FedAvg
    expected = 0.5 * updates[0].dense["head"].float() + 0.5 * updates[1].dense["head"]
    torch.testing.assert_close(new.dense["head"], expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("dtype", "wire"),
    [
        (torch.int64, ()),
        (torch.float16, (torch.bfloat16,)),  # float16 in a bf16 run
        (torch.bfloat16, ()),  # bf16 in a float32 run
    ],
)
def test_an_update_of_another_dtype_is_rejected_with_a_dtype_error(
    dtype: torch.dtype, wire: tuple[torch.dtype, ...]
) -> None:
    agg, state = state_for("hetlora")
    bad = update(7, 2, dtype)
    outcome = agg.aggregate(state, [bad, update(8, 4, torch.float32)], wire_dtypes=wire)
    assert outcome.accepted == (8,)
    assert "dtype" in outcome.rejected[7]
    assert outcome.state.factors["a"][0].dtype == torch.float32
    with pytest.raises(DTypeError, match="accepted: "):
        agg.validate(state, bad, wire_dtypes=wire)


# ---------------------------------------------------------------------------------------- RNG


def test_client_training_leaves_the_global_rng_untouched() -> None:
    cfg = tiny_config(**{"lora.dropout": 0.1})
    fed = build_federation(cfg)
    state = fed.initial_state()
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    rank = fed.rank_of(state, 1)
    first = train_client(fed, 1, rank, fed.client_message(state, 1, 1), state.dense, 1, 1e-3)
    assert torch.equal(torch.get_rng_state(), before)
    # and the client's own stream still fixes its dropout: the same call gives the same factors
    torch.manual_seed(999)
    again = train_client(fed, 1, rank, fed.client_message(state, 1, 1), state.dense, 1, 1e-3)
    for name, (B, A) in first.update.factors.items():
        assert torch.equal(B, again.update.factors[name][0])
        assert torch.equal(A, again.update.factors[name][1])


# ------------------------------------------------------------------------------- FLoRA in bf16


def test_flora_in_bf16_keeps_the_base_at_bf16_of_w0_plus_the_float32_cumulative_delta(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(method="flora", dtype="bfloat16", **{"fl.rounds": 3})
    fed = build_federation(cfg)
    name = adapter_name(fed.aggregator.r_max)
    w0 = base_weights(fed.bank.model, name)  # pristine, bf16
    assert all(w.dtype == torch.bfloat16 for w in w0.values())
    run_local(cfg, tmp_path, progress=False, fed=fed)
    from raflora.engine import load_checkpoint

    delta = load_checkpoint(tmp_path).state.base_delta
    merged = base_weights(fed.bank.model, name)
    assert delta and set(delta) == set(merged)
    for module, weight in merged.items():
        expected = (w0[module].float() + delta[module]).to(torch.bfloat16)
        assert torch.equal(weight, expected), module
    assert any(not torch.equal(merged[m], w0[m]) for m in merged)  # something was merged


def test_narrow_merges_round_once_where_sequential_merges_lose_small_deltas() -> None:
    cfg = tiny_config(dtype="bfloat16")
    fed = build_federation(cfg)
    name = adapter_name(fed.aggregator.r_max)
    w0 = base_weights(fed.bank.model, name)
    module = sorted(w0)[0]
    d, n = w0[module].shape
    step = (torch.full((d, 1), 1e-2), torch.full((1, n), 1e-2))  # ΔW = 1e-4 per entry
    cumulative = torch.zeros(d, n)
    for _ in range(20):
        cumulative = cumulative + step[0] @ step[1]
        fed.bank.merge_into_base({module: step}, {module: cumulative})
    weight = base_weights(fed.bank.model, name)[module]
    assert torch.equal(weight, (w0[module].float() + cumulative).to(torch.bfloat16))
    # the same 20 deltas merged one by one into bf16 weights mostly vanish in rounding
    sequential = w0[module].clone()
    for _ in range(20):
        sequential = (sequential.float() + step[0] @ step[1]).to(torch.bfloat16)
    lost = (sequential.float() - w0[module].float()).abs().sum()
    kept = (weight.float() - w0[module].float()).abs().sum()
    assert kept > 1.5 * lost


def test_the_engines_take_only_validated_configs(tmp_path: Path) -> None:
    good = tiny_config()
    # derived by dataclasses.replace, not by with_changes: never validated
    cfg = dataclasses.replace(good, method="nope", fl=dataclasses.replace(good.fl, rounds=0))
    with pytest.raises(ConfigError, match="not validated"):
        run_local(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError) as err:  # validating it names every problem
        validated(cfg)
    assert len(err.value.problems) >= 2


# -------------------------------------------------------------------- per-module diagnostics


def test_energy_jsonl_has_one_row_per_round_for_every_module(tmp_path: Path) -> None:
    from raflora.report import read_energy, read_metrics

    cfg = tiny_config(**{"fl.rounds": 3, "output.plots": True})
    run_local(cfg, tmp_path, progress=False)
    rows = read_energy(tmp_path / "energy.jsonl")
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    from raflora.engine import load_checkpoint

    modules = set(load_checkpoint(tmp_path).state.factors)
    for row, metric in zip(rows, metrics, strict=True):
        assert set(row["modules"]) == modules
        values = [m["higher_rank_energy"] for m in row["modules"].values()]
        assert all(v is not None for v in values)
        assert sum(values) / len(values) == pytest.approx(metric["higher_rank_energy"])
    assert (tmp_path / "energy_heatmap.png").stat().st_size > 0


def test_a_client_seeds_only_the_generators_it_forks(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.manual_seed would also reseed every CUDA device of the host (never restored)
    fed = build_federation(tiny_config())
    state = fed.initial_state()
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    rank = fed.rank_of(state, 0)
    train_client(fed, 0, rank, fed.client_message(state, 0, 1), state.dense, 1, 1e-3)
    assert calls == []  # a CPU run leaves every GPU's generator alone
