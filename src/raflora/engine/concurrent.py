"""A round's clients trained together: one frozen base, one adapter slot per client, one pass
(``train.concurrent_clients: K``; docs/concurrency.md).

:func:`train_concurrent` is the local engine's client phase when ``K > 1``. Up to ``K`` of the
round's sampled clients hold a slot of a :class:`~raflora.adapters.slots.SlotGroup` on the one
base model; each step is one forward and one backward over the concatenation of their
minibatches, each client's rows through its own adapter of its own rank and its own heads
(docs/design.md#local-training-and-rounds for what a client's local round is). A client that has
taken all its steps leaves and the round's next client takes its slot (continuous batching), so
a round costs about ``Σ_k steps_k / K`` group steps; clients join longest first, which keeps the
last group steps full.

Per client, everything is the sequential loop's, from the same pieces of
:mod:`raflora.engine.client_round`: the method's client half (start factors, frozen factors,
penalty, gradient correction, the upload and per-client state), the same shuffle stream, its own
optimizer and state, the round's learning rate, clipping on its own gradient norm, ``α / r_k``.
The loss of a group step is the SUM of the clients' own mean losses
(:meth:`~raflora.tasks.Task.group_losses`), so no client's gradient depends on another's batch
size. With dropout off every upload equals the sequential one up to the summation order of the
batched products; with dropout on, each client's masks come from the group's stream (seeded per
round): the same distribution, not the same masks.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from raflora.adapters.factors import _canonical
from raflora.adapters.slots import Slot, SlotGroup
from raflora.engine import seeds
from raflora.engine.client_round import (
    ClientResult,
    batch_order,
    close_client,
    make_optimizer,
    open_client,
    prepare_step,
    rng_devices,
    seed_forked,
    trained_split,
)
from raflora.engine.errors import EngineError
from raflora.engine.federation import Federation
from raflora.engine.metering import device_clock
from raflora.methods import GlobalState
from raflora.methods.base import ClientRound
from raflora.tasks import Task, move_batch
from raflora.tasks.base import batch_rows

__all__ = ["grouping_problem", "train_concurrent"]

_GROUP_STREAM = 100
"""Key of the torch stream a round's grouped training draws dropout from (seeds.torch_seed);
far from the keys of :mod:`raflora.engine.seeds`' own streams."""

_GROUPS: weakref.WeakKeyDictionary[nn.Module, SlotGroup] = weakref.WeakKeyDictionary()
"""One slot group per model: its layer lookup is made once per run, not once per round."""


def grouping_problem(task: Task, model: nn.Module) -> str | None:
    """Why the clients of ``task`` on ``model`` cannot be trained together (``None``: they can).

    Two things make a client's result depend on the other clients of its group: a task without
    :meth:`~raflora.tasks.Task.group_losses`, and a layer that mixes the rows of a batch in
    training mode (batch normalisation: its batch statistics would be the group's).
    """
    if type(task).group_losses is Task.group_losses:
        return (
            f"task {task.name!r} defines no group_losses (one forward over several clients' "
            f"batches with each client's own loss), so its clients cannot train together"
        )
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            return (
                f"module {_canonical(name)!r} ({type(module).__name__}) normalises with the "
                f"statistics of the whole batch in training mode: clients trained together "
                f"would change each other's results"
            )
    return None


@dataclass
class _Running:
    """A client holding a slot: its method half, trained parameters and batches."""

    client: ClientRound
    slot: Slot
    params: list[nn.Parameter]
    batches: Iterator[list[int]]
    optimizer: _FlatOptimizer
    t0: float
    batch: dict[str, Tensor] | None = None
    losses: list[float] = field(default_factory=list)
    compute: float = 0.0


class _FlatOptimizer:
    """One client's optimizer, over its trained tensors laid end to end in flat tensors (one
    per device and dtype).

    AdamW and SGD act element by element, so one step over a flat tensor is, bit for bit, the
    step torch's per-tensor loop takes over each of its pieces (tests/test_concurrent_clients.py
    checks it); the client's tensors become views of the flat ones. A client's tensors all step
    together, so they share one step count, as their own counts would be. It replaced one
    multi-tensor optimizer over every running client's tensors: the CPU has no multi-tensor
    kernels, and that optimizer's per-tensor work cost more than the clients' own loops.

    The flat tensors are made at the first step, from the tensors that got a gradient (torch
    skips a tensor without one); a later step whose gradients are not on the same tensors is
    refused, as a flat step could not skip some of them.
    """

    def __init__(self, fed: Federation, params: list[nn.Parameter], lr: float) -> None:
        self.fed, self.lr, self.params = fed, lr, params
        self.pieces: list[list[nn.Parameter]] = []
        self.flats: list[nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def step(self) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        if self.optimizer is None:
            if not with_grad:
                return
            by_kind: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
            for param in with_grad:
                by_kind.setdefault((param.device, param.dtype), []).append(param)
            self.pieces = list(by_kind.values())
            self.flats = [_flatten(pieces) for pieces in self.pieces]
            self.optimizer = make_optimizer(self.fed, self.flats, self.lr)
        elif sum(map(len, self.pieces)) != len(with_grad) or any(
            p.grad is None for pieces in self.pieces for p in pieces
        ):
            raise EngineError(
                "train.concurrent_clients: a client's trained tensors got gradients in one "
                "step but not in another; train it with train.concurrent_clients=1"
            )
        for flat, pieces in zip(self.flats, self.pieces, strict=True):
            flat.grad = torch.cat([p.grad.reshape(-1) for p in pieces])  # type: ignore[union-attr]
        self.optimizer.step()


def _flatten(pieces: list[nn.Parameter]) -> nn.Parameter:
    """One flat parameter holding ``pieces`` end to end; each piece becomes a view of it."""
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in pieces]))
    offset = 0
    for piece in pieces:
        size = piece.numel()
        piece.data = flat.data[offset : offset + size].view_as(piece)
        offset += size
    return flat


def train_concurrent(
    fed: Federation,
    state: GlobalState,
    order: Sequence[tuple[int, int]],
    round_index: int,
    lr: float,
    *,
    capacity: int | None = None,
) -> list[ClientResult]:
    """Train the round's clients ``order`` (``(rank, client_id)`` pairs) ``K`` at a time
    (``capacity``; default ``train.concurrent_clients``).

    Returns their results, one per client (in the order they finished). ``compute_seconds``
    of a client is its share of the group steps it took part in (the step's time divided by
    the clients in it), so the round's sum is the client phase's compute time.

    Raises
    ------
    EngineError
        The task or model cannot train clients together (:func:`grouping_problem`).
    """
    model = fed.bank.model
    problem = grouping_problem(fed.task, model)
    if problem is not None:
        raise EngineError(f"train.concurrent_clients: {problem}; use train.concurrent_clients=1")
    group = _GROUPS.get(model)
    if group is None:
        group = _GROUPS[model] = SlotGroup.for_bank(fed.bank)
    capacity = capacity if capacity is not None else fed.config.train.concurrent_clients
    # longest first: the clients with most steps start at once, the short ones fill the tail
    size = fed.config.train.batch_size
    queue = deque(
        sorted(order, key=lambda rc: (-math.ceil(fed.num_samples(rc[1]) / size), rc[0], rc[1]))
    )
    results: list[ClientResult] = []
    with torch.random.fork_rng(devices=rng_devices(fed.device), device_type=fed.device.type):
        seed_forked(fed.device, seeds.torch_seed(fed.seed, _GROUP_STREAM, round_index))
        if not model.training:
            model.train()
        running: list[_Running] = []
        with group.attached():
            while queue or running:
                while queue and len(running) < capacity:
                    joined = _join(fed, group, state, *queue.popleft(), round_index, lr)
                    if joined.batch is None:  # no example: nothing to train
                        results.append(_leave(fed, joined))
                    else:
                        running.append(joined)
                _group_step(fed, group, running)
                still: list[_Running] = []
                for run in running:
                    if _advance(fed, run):
                        still.append(run)
                    else:
                        results.append(_leave(fed, run))
                running = still
    return results


def _join(
    fed: Federation,
    group: SlotGroup,
    state: GlobalState,
    rank: int,
    client_id: int,
    round_index: int,
    lr: float,
) -> _Running:
    """A client takes a free slot: its start factors, heads and first batch."""
    t0 = device_clock(fed.device)
    received = fed.client_message(state, client_id, round_index)
    previous = fed.client_states.get(client_id, device=fed.device)
    client = open_client(fed, client_id, rank, received, round_index, previous)
    slot = group.slot(rank, fed.bank.scaling(rank), client.start(), state.dense, client.trains)
    _, params = trained_split(client, slot.lora, slot.parameters())
    shuffle = seeds.shuffle_stream(fed.seed, round_index, client_id)
    run = _Running(
        client,
        slot,
        params,
        batch_order(fed, client_id, shuffle),
        _FlatOptimizer(fed, params, lr),
        t0,
    )
    _advance(fed, run)
    return run


def _advance(fed: Federation, run: _Running) -> bool:
    """Load the client's next minibatch; ``False`` when it has taken all its steps."""
    indices = next(run.batches, None)
    run.batch = (
        None
        if indices is None
        else move_batch(fed.task.train_batch(indices), fed.device, fed.dtype)
    )
    return run.batch is not None


def _group_step(fed: Federation, group: SlotGroup, running: list[_Running]) -> None:
    """One forward and backward over the running clients' batches, then each client's step."""
    c0 = device_clock(fed.device)
    # the rows in (rank, rows) order: equal slots sit side by side and share one batched
    # LoRA product (raflora.adapters.slots)
    running = sorted(running, key=lambda r: (r.slot.rank, batch_rows(r.batch) if r.batch else 0))
    batches = [run.batch for run in running if run.batch is not None]
    for run in running:
        run.optimizer.zero_grad()
    with group.routing([run.slot for run in running], [batch_rows(b) for b in batches]):
        losses = fed.task.group_losses(fed.bank.model, batches)
    total: Tensor | None = None
    for run, loss in zip(running, losses, strict=True):
        term = loss
        if run.client.uses_penalty:
            penalty = run.client.penalty(run.slot.live_factors())
            term = loss if penalty is None else loss + penalty
        total = term if total is None else total + term
    assert total is not None
    total.backward()  # type: ignore[no-untyped-call]
    for run in running:
        prepare_step(fed, run.client, run.params, run.slot.lora)
    for run in running:
        run.optimizer.step()
    values = torch.stack([loss.detach().float() for loss in losses]).tolist()  # one sync
    share = (device_clock(fed.device) - c0) / len(running)
    for run, value in zip(running, values, strict=True):
        run.losses.append(float(value))
        run.compute += share


def _leave(fed: Federation, run: _Running) -> ClientResult:
    """The client's result from its slot (the slot's tensors are then dropped)."""
    head = run.slot.dense() if run.slot.heads else {}
    return close_client(fed, run.client, run.slot.factors(), head, run.losses, run.compute, run.t0)
