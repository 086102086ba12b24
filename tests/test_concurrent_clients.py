"""A round's clients trained together (``train.concurrent_clients``, docs/concurrency.md): every
client's upload equals the sequential loop's, for every method and for the causal LM; resume is
bit for bit; the configuration and the models that cannot batch clients are refused."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from conftest import SYNTHETIC, config_with
from hf_fixtures import make_gsm8k_jsonl, make_tiny_llama
from raflora.adapters.slots import SlotGroup, _scaled
from raflora.config import ConfigError, RunConfig
from raflora.engine import build_federation, load_checkpoint, run_local
from raflora.engine.client_round import ClientResult, train_client
from raflora.engine.concurrent import _GroupOptimizer, grouping_problem, train_concurrent
from raflora.engine.errors import EngineError
from raflora.engine.federation import Federation
from raflora.engine.server_round import complete_round, plan_round, run_round
from raflora.methods import GlobalState, available_methods
from raflora.methods.registry import unsupported_reason
from raflora.tasks import move_batch

# 6 clients, 5 of them per round, ranks 2/4/8, 240 examples in batches of 32: clients of
# different sizes (a smaller last batch) and mixed ranks in one group
BASE: dict[str, Any] = {
    **SYNTHETIC,
    "task": {"name": "synthetic", "options": {"num_train": 240, "num_eval": 50}},
    "fl": {"num_clients": 6, "clients_per_round": 5, "rounds": 2, "rank_levels": [2, 4, 8]},
}


def method_config(method: str, **over: Any) -> RunConfig:
    if unsupported_reason(method, BASE["fl"]["rank_levels"]) is not None:
        over.setdefault("fl.rank_levels", [4])  # a method that takes one rank level
    return config_with(BASE, method=method, **over)


def sequential(fed: Federation, state: GlobalState, round_index: int) -> list[ClientResult]:
    plan = plan_round(fed, state, round_index)
    return [
        train_client(
            fed,
            k,
            r,
            fed.client_message(state, k, round_index),
            state.dense,
            round_index,
            plan.lr,
            state=fed.client_states.get(k, device=fed.device),
        )
        for r, k in sorted(zip(plan.ranks, plan.clients, strict=True))
    ]


def grouped(fed: Federation, state: GlobalState, round_index: int) -> list[ClientResult]:
    plan = plan_round(fed, state, round_index)
    order = sorted(zip(plan.ranks, plan.clients, strict=True))
    return train_concurrent(fed, state, order, round_index, plan.lr)


def assert_close_rel(a: Any, b: Any, rel: float = 1e-5, where: str = "") -> None:
    """Nested tensors equal within ``rel`` relative (Frobenius norms)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.shape == b.shape, where
        err = float((a.double() - b.double()).norm())
        assert err <= rel * float(a.double().norm()) + 1e-12, f"{where}: {err}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_close_rel(a[key], b[key], rel, f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close_rel(x, y, rel, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_uploads(seq: list[ClientResult], grp: list[ClientResult]) -> None:
    by_id = {r.update.client_id: r for r in grp}
    assert sorted(by_id) == sorted(r.update.client_id for r in seq)
    for one in seq:
        other = by_id[one.update.client_id]
        name = f"client {one.update.client_id}"
        assert other.update.rank == one.update.rank and other.steps == one.steps
        assert other.update.num_samples == one.update.num_samples
        assert_close_rel(one.update.factors, other.update.factors, where=f"{name} factors")
        assert_close_rel(one.update.dense, other.update.dense, where=f"{name} heads")
        assert_close_rel(one.update.extras, other.update.extras, where=f"{name} extras")
        assert_close_rel(one.state, other.state, where=f"{name} state")
        assert one.train_loss == pytest.approx(other.train_loss, rel=1e-5)


@pytest.mark.parametrize("method", available_methods())
def test_every_client_upload_with_k5_equals_k1(method: str) -> None:
    """Round 1, then round 2 from the same aggregate (per-client state, HetLoRA's pruned ranks
    …): each client's factors, heads, extras and state within 1e-5 of the sequential loop's."""
    over: dict[str, Any] = {"train.max_grad_norm": 0.5, "train.weight_decay": 0.01}
    if method == "hetlora":
        over["method_options"] = {"self_pruning": True}
    fed = build_federation(method_config(method, **over, **{"train.concurrent_clients": 5}))
    state = fed.merge_initial_residual(fed.initial_state())
    for round_index in (1, 2):
        seq = sequential(fed, state, round_index)
        assert_same_uploads(seq, grouped(fed, state, round_index))
        plan = plan_round(fed, state, round_index)
        state = complete_round(fed, state, plan, seq, train_seconds=0.0).state


def test_heads_and_the_digits_vit_with_continuous_batching() -> None:
    """The quickstart's task (a ViT with a trained classifier head per slot); K = 2 < M = 4,
    so clients leave and others take their slots."""
    cfg = config_with(
        {"task": {"name": "digits"}, "output": {"plots": False}, "seed": 1},
        **{
            "fl.num_clients": 30,
            "fl.clients_per_round": 4,
            "fl.rank_levels": [4, 8, 16],
            "train.batch_size": 16,
            "train.concurrent_clients": 2,
        },
    )
    fed = build_federation(cfg)
    state = fed.initial_state()
    seq = sequential(fed, state, 1)
    assert all(r.update.dense for r in seq)
    assert_same_uploads(seq, grouped(fed, state, 1))


def test_a_grouped_round_leaves_the_global_rng_and_the_sequential_path_alone() -> None:
    fed = build_federation(method_config("raflora", **{"train.concurrent_clients": 3}))
    state = fed.initial_state()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    grouped(fed, state, 1)
    assert torch.equal(torch.random.get_rng_state(), before)
    # the bank's own adapters train as before after a grouped round
    assert_same_uploads(sequential(fed, state, 1), grouped(fed, state, 1))


def test_killed_and_resumed_grouped_run_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    over: dict[str, Any] = {
        "fl.rounds": 2,
        "lora.dropout": 0.1,
        "train.concurrent_clients": 2,
        "method": "ilora",  # per-client state carried across the cut
    }

    class StopError(Exception):
        pass

    def stop_after_one(row: dict[str, Any]) -> None:
        if row["round"] == 1:
            raise StopError

    full = run_local(config_with(BASE, **over), tmp_path / "full", progress=False)
    cut = tmp_path / "cut"
    with pytest.raises(StopError):
        run_local(config_with(BASE, **over), cut, progress=False, on_round=stop_after_one)
    resumed = run_local(config_with(BASE, **over), cut, resume=True, progress=False)
    strip = [{k: v for k, v in row.items() if k != "time"} for row in full.metrics]
    assert [{k: v for k, v in row.items() if k != "time"} for row in resumed.metrics] == strip
    a, b = load_checkpoint(tmp_path / "full").state, load_checkpoint(cut).state
    for name, (B, A) in a.factors.items():
        assert torch.equal(B, b.factors[name][0]) and torch.equal(A, b.factors[name][1])


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("concurrent-llm")
    return {"llama": make_tiny_llama(root / "llama"), "gsm8k": make_gsm8k_jsonl(root / "gsm8k")}


def llm_config(files: dict[str, Path], **over: Any) -> RunConfig:
    data = {
        "method": "raflora",
        "seed": 0,
        "task": {
            "name": "math-reasoning",
            "model": str(files["llama"]),
            "dataset": str(files["gsm8k"]),
            "max_length": 96,
            "options": {"max_new_tokens": 4},
        },
        "fl": {"num_clients": 4, "clients_per_round": 4, "rounds": 1, "rank_levels": [2, 4]},
        "data": {"partition": "iid"},
        "train": {"lr": 1e-2, "batch_size": 2},
        "lora": {"target_modules": ["q_proj", "v_proj"]},
        "output": {"plots": False},
    }
    return config_with(data, **over)


@pytest.mark.usefixtures("hf_offline")
def test_causal_lm_group_padding_keeps_each_client_loss_and_upload(
    llama_files: dict[str, Path],
) -> None:
    fed = build_federation(llm_config(llama_files, **{"train.concurrent_clients": 3}))
    task, model = fed.task, fed.bank.model
    # two batches of different lengths: the shorter is padded to the longer in the group
    a = move_batch(task.train_batch([0, 1]), fed.device)
    b = move_batch(task.train_batch([2]), fed.device)
    assert a["input_ids"].shape[1] != b["input_ids"].shape[1]
    group = SlotGroup.for_bank(fed.bank)
    gen = torch.Generator().manual_seed(0)
    slots, expected = [], []
    for rank, batch in ((2, a), (4, b)):
        factors = {
            name: (
                0.1 * torch.randn(d, rank, generator=gen),
                0.1 * torch.randn(rank, n, generator=gen),
            )
            for name, (d, n) in fed.bank.module_shapes().items()
        }
        slots.append(group.slot(rank, fed.bank.scaling(rank), factors, {}))
        fed.bank.activate(rank)
        fed.bank.set_factors(rank, factors)
        expected.append(float(task.loss(model, batch)))
    with group.attached(), group.routing(slots, [2, 1]):
        got = [float(x) for x in task.group_losses(model, [a, b])]
    assert got == pytest.approx(expected, rel=1e-5)
    state = fed.initial_state()
    assert_same_uploads(sequential(fed, state, 1), grouped(fed, state, 1))


def test_padded_ranks_get_exactly_zero_gradient_and_stay_zero_under_adamw() -> None:
    """The stacked factors of a group zero-padded to its largest rank: the padded columns of
    ``B`` and rows of ``A`` get exactly zero gradient and AdamW with weight decay keeps them 0."""
    gen = torch.Generator().manual_seed(0)
    ranks, d, n, r_c = [2, 5], 6, 7, 5
    A_all = torch.zeros(2, r_c, n)
    B_all = torch.zeros(2, d, r_c)
    for s, r in enumerate(ranks):
        A_all[s, :r] = torch.randn(r, n, generator=gen)
        B_all[s, :, :r] = torch.randn(d, r, generator=gen)
    A_all.requires_grad_(True)
    B_all.requires_grad_(True)
    opt = torch.optim.AdamW([A_all, B_all], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        xs = torch.randn(2, 4, n, generator=gen)
        out = torch.bmm(torch.bmm(xs, A_all.transpose(1, 2)), B_all.transpose(1, 2))
        opt.zero_grad()
        (out**2).sum().backward()
        assert A_all.grad is not None and B_all.grad is not None
        assert torch.equal(A_all.grad[0, 2:], torch.zeros(3, n))
        assert torch.equal(B_all.grad[0, :, 2:], torch.zeros(d, 3))
        assert A_all.grad[0, :2].abs().sum() > 0
        opt.step()
        assert torch.equal(A_all[0, 2:].detach(), torch.zeros(3, n))
        assert torch.equal(B_all[0, :, 2:].detach(), torch.zeros(d, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_per_row_lora_scale_is_peft_s_multiplication_by_a_python_float(
    dtype: torch.dtype,
) -> None:
    """The slots scale a group's LoRA output once, row by row: bit for bit what each slot's
    ``lora_B(lora_A(x)) * scaling`` gives in PEFT (a Python float; rsLoRA's irrational
    ``α / sqrt(r)`` included, which no low-precision dtype holds exactly)."""
    gen = torch.Generator().manual_seed(0)
    scales = [16 / 4, 16 / math.sqrt(48), 0.1, 2 / 3]
    rows = [3, 1, 5, 2]
    delta = torch.randn(sum(rows), 7, generator=gen).to(dtype)
    per_row = torch.tensor(scales, dtype=torch.float64).repeat_interleave(torch.tensor(rows))
    got = _scaled(delta, lambda dt: per_row.view(-1, 1).to(dt))
    expected = torch.cat(
        [part * s for part, s in zip(torch.split(delta, rows), scales, strict=True)]
    )
    assert got.dtype == dtype
    assert torch.equal(got.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_grouped_optimizer_steps_bit_for_bit_as_torchs_per_tensor_one(optimizer: str) -> None:
    """The grouped engine's one optimizer over the running clients' tensors laid flat (one
    arena per cohort of clients that joined together, gradients accumulated in place): the
    same bits as torch's optimizer over each client's own tensors, for cohorts that join at
    different steps (their own step counts), a client that leaves its cohort early, and
    gradients with zeros of both signs; a tensor without a gradient is refused."""
    fed = build_federation(
        method_config("raflora", **{"train.weight_decay": 0.01, "train.optimizer": optimizer})
    )
    reference = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 8), (8, 256), (10, 64), (10,), (7, 3)]

    def draw(shape: tuple[int, ...], step: int) -> Tensor:
        values = torch.randn(shape, generator=gen) * 10.0 ** (step - 3)
        signs = torch.randint(0, 4, shape, generator=gen)
        values[signs == 0] = 0.0
        values[signs == 1] = -0.0
        return values

    grouped = _GroupOptimizer(fed, lr=5e-3)
    clients: list[tuple[list[nn.Parameter], list[nn.Parameter], Any, int, Any]] = []
    for step in range(6):
        if step in (0, 2):  # a cohort of two clients joins
            joining = []
            for _ in range(2):
                start = [draw(shape, 3) for shape in shapes]
                ours = [nn.Parameter(t.clone()) for t in start]
                theirs = [nn.Parameter(t.clone()) for t in start]
                own = reference(theirs, lr=5e-3, weight_decay=0.01, foreach=False)
                joining.append((ours, theirs, own))
            cohort = grouped.join([ours for ours, _, _ in joining])
            clients += [(o, t, cohort, i, own) for i, (o, t, own) in enumerate(joining)]
        if step == 3:  # the first client of the first cohort leaves (its part stays)
            _, _, cohort, position, _ = clients.pop(0)
            grouped.leave(cohort, position)
        if step == 4:  # the last client of the second cohort leaves (its arena is cut back)
            _, _, cohort, position, _ = clients.pop(2)
            size = cohort.arenas[0].flat.numel()
            grouped.leave(cohort, position)
            assert cohort.arenas[0].flat.numel() == size // 2
        for ours, theirs, _, _, own in clients:
            for a, b in zip(ours, theirs, strict=True):
                # through autograd, as in the engine: the gradient of sum(p * w) is w
                weight = draw(a.shape, step)
                (a * weight).sum().backward()  # type: ignore[no-untyped-call]
                (b * weight).sum().backward()  # type: ignore[no-untyped-call]
            own.step()
            own.zero_grad(set_to_none=True)
        grouped.step()
        for ours, theirs, _, _, _ in clients:
            for a, b in zip(ours, theirs, strict=True):
                assert torch.equal(a.detach().view(torch.int32), b.detach().view(torch.int32))
    assert len(grouped.cohorts) == 2
    for _, _, cohort, position, _ in clients:
        grouped.leave(cohort, position)
    assert grouped.cohorts == [] and grouped.optimizer is not None
    assert grouped.optimizer.param_groups[0]["params"] == []
    lone = [nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))]
    grouped.join([lone])
    lone[0].sum().backward()  # type: ignore[no-untyped-call]
    with pytest.raises(EngineError, match="got no gradient in its first step"):
        grouped.step()


def test_concurrent_clients_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"train\.concurrent_clients"):
        config_with(BASE, **{"train.concurrent_clients": 0})
    with pytest.raises(ConfigError) as err:
        config_with(BASE, **{"train.concurrent_clients": 6})
    message = str(err.value)
    assert "train.concurrent_clients: at most fl.clients_per_round (5)" in message
    assert "got 6" in message and "\n" not in message.strip().splitlines()[0]
    with pytest.raises(ConfigError, match="trains one client per message"):
        config_with(BASE, engine="flower", **{"train.concurrent_clients": 2})
    assert config_with(BASE, **{"train.concurrent_clients": 5}).train.concurrent_clients == 5


def test_a_batch_norm_model_is_refused_before_any_client_trains() -> None:
    fed = build_federation(method_config("raflora", **{"train.concurrent_clients": 2}))
    assert grouping_problem(fed.task, fed.bank.model) is None
    layers = fed.task.model.layers
    layers.append(nn.BatchNorm1d(fed.task.model.head.in_features))
    why = grouping_problem(fed.task, fed.bank.model)
    assert why is not None and "BatchNorm1d" in why and f"layers.{len(layers) - 1}" in why
    state = fed.initial_state()
    with pytest.raises(EngineError, match="BatchNorm1d") as err:
        run_round(fed, state, 1)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.usefixtures("hf_offline")
def test_the_device_check_of_concurrent_clients_rehearses_on_the_cpu(tmp_path: Path) -> None:
    """scripts/gpu_check.sh's concurrent checks: the equality runs on any device, the speed-up
    needs CUDA and says it skipped."""
    from raflora.experiments.gpu_check import (
        build_assets,
        check_concurrent_equal,
        check_concurrent_speed,
    )

    result = check_concurrent_equal(build_assets(tmp_path, ["llama"]), "cpu")
    assert result.ok, str(result)
    skipped = check_concurrent_speed("cpu", tmp_path / "bert", 6, 384)
    assert skipped.ok and "skipped" in skipped.detail
