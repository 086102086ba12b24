"""AFLoRA (docs/methods.md#aflora): ``B Λ A`` with a learnable diagonal held in ``lora_A``,
pruning to the client's budget by ``|λ|``, a shared ``A``, per-column aggregation over the
clients that kept each column; ``Λ`` folded into what is uploaded and exported."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load_file
from torch import Tensor

from conftest import config_with, randn
from method_cases import SYNTHETIC, engine_rounds, first_module
from raflora.engine import build_federation, load_checkpoint, run_local
from raflora.engine.client_round import train_client
from raflora.methods import (
    ClientMessage,
    ClientUpdate,
    GlobalState,
    OptionsError,
    RoundContext,
    get_aggregator,
)
from raflora.methods.aflora import AFLoRA, AFLoRAClientRound, shared_a_init
from raflora.methods.private import PrivateRule
from raflora.tasks import build_task

# ------------------------------------------------------------------------ the dense reference


def ref_selection(scores: list[float], budget: int) -> list[int]:
    """The ``budget`` components of largest ``|λ|``, ties to the lower index, ascending."""
    ranked = sorted(range(len(scores)), key=lambda j: (-abs(scores[j]), j))
    return sorted(ranked[:budget])


def ref_columns(previous_B: Tensor, uploads: list[tuple[list[int], Tensor, int]]) -> Tensor:
    """Column ``j`` of ``B̃_g``: the sample-weighted mean of ``(B_i Λ_i)[:, j]`` over the clients
    whose selection holds ``j``; the previous column where none does. Written column by column.
    """
    out = previous_B.clone()
    for j in range(previous_B.shape[1]):
        total = sum(n for sel, _, n in uploads if j in sel)
        if total == 0:
            continue
        out[:, j] = sum(n * B[:, sel.index(j)] for sel, B, n in uploads if j in sel) / total
    return out


@dataclass(frozen=True)
class RoundCase:
    """One module's round: levels, shapes, and per client its rank, samples and stored scores
    (``None``: a client the server has no scores of)."""

    levels: tuple[int, ...]
    d: int
    n: int
    ranks: list[int]
    samples: list[int]
    scores: list[list[float] | None]
    seed: int

    def scores_of(self, client: int) -> list[float]:
        """The client's scores, 1 for every component when it has none."""
        return self.scores[client] or [1.0] * self.levels[-1]


@st.composite
def rounds(draw: st.DrawFn) -> RoundCase:
    levels = tuple(sorted(draw(st.sets(st.integers(1, 6), min_size=1, max_size=3))))
    R = levels[-1]
    clients = draw(st.integers(1, 4))
    score = st.sampled_from([-2.0, -0.5, 0.0, 0.5, 1.0, 1.5, 3.0])
    return RoundCase(
        levels=levels,
        d=draw(st.integers(1, 6)),
        n=draw(st.integers(1, 6)),
        ranks=draw(st.lists(st.sampled_from(levels), min_size=clients, max_size=clients)),
        samples=draw(st.lists(st.integers(1, 500), min_size=clients, max_size=clients)),
        scores=draw(
            st.lists(
                st.none() | st.lists(score, min_size=R, max_size=R),
                min_size=clients,
                max_size=clients,
            )
        ),
        seed=draw(st.integers(0, 2**30)),
    )


def round_state(case: RoundCase) -> tuple[AFLoRA, GlobalState, list[ClientUpdate]]:
    """A float64 state with the clients' stored scores, and their uploads at their selections."""
    d, n, seed, R = case.d, case.n, case.seed, case.levels[-1]
    method = get_aggregator("aflora", case.levels)
    assert isinstance(method, AFLoRA)
    A_g = shared_a_init(R, n, torch.Generator().manual_seed(seed)).double()
    stored = {
        k: {"m": torch.tensor(s, dtype=torch.float32)}
        for k, s in enumerate(case.scores)
        if s is not None
    }
    state = GlobalState(
        factors={"m": (randn(seed - 1, d, R), A_g)},
        module_shapes={"m": (d, n)},
        extras={"scores": stored},
    )
    updates = []
    for k, (r, samples) in enumerate(zip(case.ranks, case.samples, strict=True)):
        sel = ref_selection(case.scores_of(k), r)
        updates.append(
            ClientUpdate(
                client_id=k,
                rank=r,
                num_samples=samples,
                factors={"m": (randn(seed + 2 * k, d, r), A_g[sel].clone())},
                extras={"lambda/m": randn(seed + 2 * k + 1, r, dtype=torch.float32)},
            )
        )
    return method, state, updates


@settings(deadline=None)
@given(rounds())
def test_aflora_matches_the_dense_column_reference(case: RoundCase) -> None:
    method, state, updates = round_state(case)
    outcome = method.aggregate(state, updates)
    assert outcome.accepted == tuple(u.client_id for u in updates)
    B, A = outcome.state.factors["m"]
    B_prev, A_prev = state.factors["m"]
    uploads = [
        (ref_selection(case.scores_of(u.client_id), u.rank), u.factors["m"][0], u.num_samples)
        for u in updates
    ]
    B_ref = ref_columns(B_prev, uploads)
    torch.testing.assert_close(B, B_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(A, A_prev)  # the shared A: the server keeps it
    # each client's scores: what it reported at its selection, the old ones elsewhere
    for (sel, _, _), u in zip(uploads, updates, strict=True):
        row = outcome.state.extras["scores"][u.client_id]["m"]
        expect = torch.tensor(case.scores_of(u.client_id), dtype=torch.float32)
        expect[sel] = u.extras["lambda/m"]
        assert torch.equal(row, expect)


@settings(deadline=None)
@given(rounds())
def test_with_every_column_kept_the_product_is_fedavg_exactly(case: RoundCase) -> None:
    """Every client at rank R keeps every column: ``B̃_g A_g = Σ p_i B_i Λ_i A`` (shared A)."""
    case = replace(case, ranks=[case.levels[-1]] * len(case.ranks))
    method, state, updates = round_state(case)
    B, A = method.aggregate(state, updates).state.factors["m"]
    total = sum(u.num_samples for u in updates)
    fedavg = torch.zeros(case.d, case.n, dtype=torch.float64)
    for u in updates:
        fedavg += (u.num_samples / total) * (u.factors["m"][0] @ u.factors["m"][1])
    torch.testing.assert_close(B @ A, fedavg, rtol=1e-10, atol=1e-12)


def test_nested_updates_through_aggregate_module_keep_a_and_carry_uncovered_columns() -> None:
    A_g = shared_a_init(4, 3, torch.Generator().manual_seed(0)).double()
    prev = (randn(1, 5, 4), A_g)
    B1, B2 = randn(2, 5, 1), randn(3, 5, 2)
    method = get_aggregator("aflora", [1, 2, 4])
    B, A = method.aggregate_module(RoundContext(1), [(B1, A_g[:1], 1), (B2, A_g[:2], 3)], prev)
    torch.testing.assert_close(B[:, 0], (B1[:, 0] + 3 * B2[:, 0]) / 4)
    torch.testing.assert_close(B[:, 1], B2[:, 1])
    assert torch.equal(B[:, 2:], prev[0][:, 2:]) and torch.equal(A, A_g)
    with pytest.raises(ValueError, match="aflora needs previous"):
        method.aggregate_module(RoundContext(1), [(B1, A_g[:1], 1)])


# ----------------------------------------------------------------------------------- pruning


@given(
    st.lists(st.sampled_from([-3.0, -1.0, 0.0, 0.25, 1.0, 2.0]), min_size=1, max_size=8),
    st.data(),
)
def test_pruning_keeps_the_largest_lambdas_within_the_budget(
    scores: list[float], data: st.DataObject
) -> None:
    R = len(scores)
    budget = data.draw(st.integers(1, R))
    method = get_aggregator("aflora", [R])
    assert isinstance(method, AFLoRA)
    B_g = randn(0, 3, R)
    A_g = shared_a_init(R, 2, torch.Generator().manual_seed(1))
    state = GlobalState(
        factors={"m": (B_g, A_g)},
        module_shapes={"m": (3, 2)},
        extras={"scores": {7: {"m": torch.tensor(scores)}}},
    )
    sel = ref_selection(scores, budget)
    assert method.selection(state, 7, "m", budget).tolist() == sel
    kept = [abs(scores[j]) for j in sel]
    dropped = [abs(s) for j, s in enumerate(scores) if j not in sel]
    assert len(sel) == budget and (not dropped or min(kept) >= max(dropped))
    message = method.client_message(RoundContext(1).for_client(7, budget), state)
    B_sent, A_sent = message.factors["m"]
    assert torch.equal(B_sent, B_g[:, sel]) and torch.equal(A_sent, A_g[sel])
    # a client without scores (a newcomer) gets the nested components; so does 'nested'
    assert method.selection(state, 3, "m", budget).tolist() == list(range(budget))
    nested = get_aggregator("aflora", [R], selection="nested")
    assert isinstance(nested, AFLoRA)
    assert nested.selection(state, 7, "m", budget).tolist() == list(range(budget))


# ------------------------------------------------------------- the client's B and Λ training


def client_round(
    R: int, r: int, d: int, n: int, seed: int
) -> tuple[AFLoRA, AFLoRAClientRound, Tensor]:
    method = get_aggregator("aflora", [R])
    assert isinstance(method, AFLoRA)
    A_g = shared_a_init(R, n, torch.Generator().manual_seed(seed))
    sel = torch.arange(R)[R - r :]
    received = ClientMessage({"m": (randn(seed, d, r, dtype=torch.float32), A_g[sel].clone())})
    client = method.client_round(RoundContext(1).for_client(0, r), received)
    assert isinstance(client, AFLoRAClientRound)
    return method, client, A_g[sel]


def loss_of(B: Tensor, A: Tensor, seed: int) -> Tensor:
    """A fixed smooth loss of the product ``B A``."""
    X = randn(seed + 100, A.shape[1], 5, dtype=torch.float32)
    T = randn(seed + 101, B.shape[0], 5, dtype=torch.float32)
    return ((torch.tanh(B @ A @ X) - T) ** 2).sum()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_lora_a_stays_lambda_times_the_shared_rows_under_the_optimizer(optimizer: str) -> None:
    """Every step keeps row j of lora_A at λ_j a_j, entry for entry (bit for bit)."""
    _, client, a = client_round(R=6, r=4, d=5, n=7, seed=3)
    B0, A0 = client.start()["m"]
    B, A = B0.clone().requires_grad_(), A0.clone().requires_grad_()
    opt: torch.optim.Optimizer = (
        torch.optim.AdamW([B, A], lr=0.05, weight_decay=0.1)
        if optimizer == "adamw"
        else torch.optim.SGD([B, A], lr=0.05)
    )
    for _ in range(20):
        opt.zero_grad()
        loss_of(B, A, 3).backward()  # type: ignore[no-untyped-call]
        client.correct_gradients({"m": (B.grad, A.grad)})
        torch.nn.utils.clip_grad_norm_([B, A], 1.0)
        opt.step()
    lam = A.detach()[:, :1] / a[:, :1]
    assert torch.equal(A.detach().abs(), (lam.abs() * a.abs()).expand_as(A))
    assert torch.equal(torch.sign(A.detach()), torch.sign(lam) * torch.sign(a))
    assert not torch.equal(lam.flatten(), torch.ones(4))  # Λ did learn


def test_sgd_on_lora_a_is_exactly_sgd_on_lambda() -> None:
    """One SGD step: the λ the client reports is 1 − η ∂L/∂λ of ``L(B diag(λ) A)``."""
    _, client, a = client_round(R=5, r=3, d=4, n=6, seed=8)
    B0, A0 = client.start()["m"]
    A = A0.clone().requires_grad_()
    loss_of(B0, A, 8).backward()  # type: ignore[no-untyped-call]
    client.correct_gradients({"m": (torch.zeros_like(B0), A.grad)})
    assert A.grad is not None
    A_new = (A - 0.1 * A.grad).detach()
    # the independent reference: λ as its own parameter
    lam = torch.ones(3, requires_grad=True)
    loss_of(B0, lam[:, None] * a, 8).backward()  # type: ignore[no-untyped-call]
    assert lam.grad is not None
    upload = client.finish({"m": (B0, A_new)})
    torch.testing.assert_close(upload.extras["lambda/m"], 1 - 0.1 * lam.grad)


def test_the_upload_folds_lambda_into_b_and_sends_the_shared_rows() -> None:
    _, client, a = client_round(R=4, r=2, d=3, n=5, seed=2)
    B = randn(9, 3, 2, dtype=torch.float32)
    lam = torch.tensor([0.5, -2.0])
    upload = client.finish({"m": (B, lam[:, None] * a)})
    B_up, A_up = upload.factors["m"]
    torch.testing.assert_close(B_up, B * lam)
    assert torch.equal(A_up, a)
    torch.testing.assert_close(upload.extras["lambda/m"], lam)


# ------------------------------------------------------------------------- real engine rounds


def test_real_local_training_keeps_lora_a_on_the_lambda_lines_bit_for_bit() -> None:
    """The engine's loop (AdamW, clipping, weight decay): the trained lora_A is Λ A_g[S_i]
    entry for entry, and the upload's product is the trained adapter's."""
    fed = build_federation(
        config_with(
            SYNTHETIC,
            method="aflora",
            **{"train.max_grad_norm": 0.5, "train.weight_decay": 0.01, "train.local_epochs": 2},
        )
    )
    state = fed.initial_state()
    client_id, rank = 1, fed.client_ranks[1]
    message = fed.client_message(state, client_id, 1)
    result = train_client(fed, client_id, rank, message, state.dense, 1, 1e-2)
    trained = fed.bank.get_factors(rank)
    for name, (B, A) in trained.items():
        a = message.factors[name][1]
        lam = result.update.extras["lambda/" + name]
        assert torch.equal(A.abs(), A.abs()[:, :1].expand_as(A))  # one magnitude per row
        assert torch.equal(torch.sign(A), torch.sign(lam)[:, None] * torch.sign(a))
        B_up, A_up = result.update.factors[name]
        torch.testing.assert_close(B_up @ A_up, B @ A, rtol=1e-5, atol=1e-7)


def test_engine_rounds_keep_a_shared_and_identical_across_clients() -> None:
    steps = engine_rounds("aflora", 2)
    A0 = {k: A for k, (_, A) in steps[0].before.factors.items()}
    for step in steps:
        fed, state = step.fed, step.before
        method = fed.aggregator
        assert isinstance(method, AFLoRA)
        for result in step.results:
            u = result.update
            for name, (_, A_k) in u.factors.items():
                sel = method.selection(state, u.client_id, name, u.rank)
                assert torch.equal(A_k, A0[name][sel])  # the shared rows, bit for bit
                lam = u.extras["lambda/" + name]
                assert lam.shape == (u.rank,) and not torch.equal(lam, torch.ones(u.rank))
            _, A_sent = step.received[u.client_id]
            assert torch.equal(first_module(dict(u.factors))[1], A_sent)
        for name, (_, A) in step.outcome.state.factors.items():
            assert torch.equal(A, A0[name])
        # every sampled client's scores are kept for its next selection
        assert set(step.outcome.state.extras["scores"]) >= {
            r.update.client_id for r in step.results
        }


def test_traffic_is_b_and_the_selection_down_b_and_lambda_up() -> None:
    step = engine_rounds("aflora", 1)[0]
    fed, state = step.fed, step.before
    shapes = state.module_shapes.values()
    for result in step.results:
        r = result.update.rank
        ctx = fed.context(1).for_client(result.update.client_id, r)
        assert fed.aggregator.download_numel(ctx, state) == sum((d + 1) * r for d, _ in shapes)
        up = fed.aggregator.upload_bytes(ctx, result.update)
        assert up == sum((d + 1) * r * 4 for d, _ in shapes)


def test_export_folds_lambda_and_reproduces_the_final_accuracy(tmp_path: Path) -> None:
    cfg = config_with(SYNTHETIC, method="aflora", **{"fl.rounds": 3})
    result = run_local(cfg, tmp_path, progress=False)
    state = load_checkpoint(tmp_path).state
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora_a = {k: v for k, v in weights.items() if "lora_A" in k}
    assert lora_a and len(lora_a) == len(state.factors)
    shared = {A.shape: A for _, A in state.factors.values()}
    for A in lora_a.values():  # the exported A is the shared A itself: Λ went into B
        assert any(torch.equal(A, S) for S in shared.values() if S.shape == A.shape)
    task = build_task(cfg)
    model = PeftModel.from_pretrained(task.load_base_model(), tmp_path / "adapter")
    model.eval()
    metrics = task.evaluate(model, 64, torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx(result.summary["final_accuracy"], abs=1e-9)
    assert metrics["eval_loss"] == pytest.approx(result.summary["final_eval_loss"], rel=1e-4)


# ----------------------------------------------------------------------------------- options


def test_public_refinement_is_refused_with_a_reason() -> None:
    with pytest.raises(OptionsError, match="public_refine: the public-set refinement is not"):
        get_aggregator("aflora", [2, 4], public_refine=True, public_dataset="digits")
    with pytest.raises(OptionsError, match="public_dataset: read only with public_refine"):
        get_aggregator("aflora", [2, 4], public_dataset="digits")
    with pytest.raises(OptionsError, match="selection"):
        get_aggregator("aflora", [2, 4], selection="largest")


# ------------------------------------------------------------------ nested selection, privacy


def test_nested_selection_uploads_no_lambda_and_sends_no_indices() -> None:
    step = engine_rounds("aflora", 1, method_options={"selection": "nested"})[0]
    fed, state = step.fed, step.before
    shapes = state.module_shapes.values()
    for result in step.results:
        u = result.update
        assert u.extras == {}
        for name, (_, A_k) in u.factors.items():
            assert torch.equal(A_k, state.factors[name][1][: u.rank])
        ctx = fed.context(1).for_client(u.client_id, u.rank)
        assert fed.aggregator.download_numel(ctx, state) == sum(d * u.rank for d, _ in shapes)
        assert fed.aggregator.upload_bytes(ctx, u) == sum(d * u.rank * 4 for d, _ in shapes)
    assert step.outcome.state.extras["scores"] == {}


def test_privacy_is_refused_with_pruning_and_per_index_on_b_when_nested() -> None:
    pruning = get_aggregator("aflora", [2, 4])
    assert pruning.private_rule(RoundContext(1)) is None
    reason = pruning.privacy_refusal()
    assert reason is not None and "selection: nested" in reason
    nested = get_aggregator("aflora", [2, 4], selection="nested")
    assert nested.privacy_refusal() is None
    rule = nested.private_rule(RoundContext(1))
    assert rule == PrivateRule.factor("B", per_index=True)


def test_a_private_nested_run_trains_b_only_and_keeps_a_shared(tmp_path: Path) -> None:
    cfg = config_with(
        SYNTHETIC,
        method="aflora",
        method_options={"selection": "nested"},
        **{"fl.rounds": 2, "privacy.enabled": True, "privacy.noise_multiplier": 0.5},
    )
    result = run_local(cfg, tmp_path, progress=False)
    assert [r["accepted"] for r in result.metrics] == [3, 3]
    state = load_checkpoint(tmp_path).state
    start = build_federation(cfg).initial_state()
    for name, (B, A) in state.factors.items():
        assert torch.equal(A, start.factors[name][1])  # the shared A, untouched by the noise
        assert bool(B.abs().sum() > 0)
