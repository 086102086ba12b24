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
optimizer state (one torch optimizer steps every running client's tensors laid flat, bit for bit
each client's own: :class:`_GroupOptimizer`), the round's learning rate, clipping on its own
gradient norm, ``α / r_k``.
The loss of a group step is the SUM of the clients' own mean losses
(:meth:`~raflora.tasks.Task.group_losses`), so no client's gradient depends on another's batch
size. With dropout off every upload equals the sequential one up to the summation order of the
batched products; with dropout on, each client's masks come from the group's stream (seeded per
round): the same distribution, not the same masks.
"""

from __future__ import annotations

import itertools
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
from raflora.engine.host_memory import keep_freed_memory
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

_PROBLEMS: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()
"""What :func:`grouping_problem` found for a model (its modules are walked once per run)."""


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
    t0: float
    cohort: _Cohort | None = None
    position: int = 0
    batch: dict[str, Tensor] | None = None
    losses: list[float] = field(default_factory=list)
    compute: float = 0.0


@dataclass
class _Arena:
    """The trained tensors of one device and dtype of a cohort's clients, laid end to end in
    one flat tensor of which each of them is now a view; after the first step, their gradients
    are views of one flat buffer too.
    """

    pieces: list[nn.Parameter]
    flat: nn.Parameter
    sizes: list[int]
    """Each piece's number of elements, in :attr:`pieces`' order."""
    ends: list[int]
    """Where each client's tensors end in :attr:`flat` (the clients in the cohort's order)."""

    @classmethod
    def of(cls, clients: Sequence[list[nn.Parameter]]) -> _Arena:
        pieces = [piece for params in clients for piece in params]
        flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in pieces]))
        arena = cls(pieces, flat, [p.numel() for p in pieces], [])
        for piece, part in arena.views(flat.data):
            piece.data = part
        arena.ends = list(itertools.accumulate(sum(p.numel() for p in ps) for ps in clients))
        return arena

    def views(self, buffer: Tensor) -> Iterator[tuple[nn.Parameter, Tensor]]:
        """Each piece with its part of the flat ``buffer``, shaped as the piece."""
        for piece, part in zip(self.pieces, torch.split(buffer, self.sizes), strict=True):
            yield piece, part.view_as(piece)

    def gather_grad(self) -> None:
        """On the first step: the pieces' gradients (as autograd left them), end to end, as
        the flat tensor's; each piece's gradient is from now on a view of it, into which the
        next backward passes accumulate in place. A piece without a gradient is refused here:
        which tensors a client's loss reaches does not change from one step to the next.
        """
        if self.flat.grad is not None:
            return
        grads = [p.grad for p in self.pieces]
        if any(g is None for g in grads):
            raise EngineError(
                "train.concurrent_clients: a trained tensor of a client got no gradient in "
                "its first step (the grouped optimizer steps every trained tensor); use "
                "train.concurrent_clients=1"
            )
        buffer = torch.cat([g.reshape(-1) for g in grads])  # type: ignore[union-attr]
        for piece, part in self.views(buffer):
            piece.grad = part
        self.flat.grad = buffer

    def clear_grad(self) -> None:
        """Every gradient back to ``-0.0``, the one value ``v`` with ``v + g == g`` bit for
        bit for every float ``g`` (``+0.0 + -0.0`` is ``+0.0``): the next backward's in-place
        accumulation leaves exactly the gradient torch would have set.
        """
        assert self.flat.grad is not None
        self.flat.grad.fill_(-0.0)


@dataclass
class _Cohort:
    """The clients that joined at one group step: they take every group step until they
    leave, so they share one step count, and their trained tensors share :class:`_Arena` s,
    laid in the order they joined — most steps first (:func:`train_concurrent`'s queue), so
    the clients that leave first are at the end: each arena is cut back to the clients still
    running (what a client that left mid-arena leaves behind is stepped, never read again).
    """

    arenas: list[_Arena]
    running: set[int]
    """The positions (in the cohort's order) of its clients still training."""


def _prefix(flat: nn.Parameter, end: int) -> nn.Parameter:
    """A parameter over the first ``end`` elements of ``flat`` (same storage), with the
    matching part of its gradient.
    """
    cut = nn.Parameter(flat.data[:end])
    if flat.grad is not None:
        cut.grad = flat.grad[:end]
    return cut


def _like(value: object, flat: Tensor) -> bool:
    """Whether an optimizer state entry holds one value per element of ``flat``."""
    return isinstance(value, Tensor) and value.shape == flat.shape


class _GroupOptimizer:
    """The running clients' optimizers as ONE torch optimizer over a few flat tensors.

    AdamW and SGD act element by element, with each tensor's own moments and step count in
    ``optimizer.state``, and every client of a round has the same learning rate and weight
    decay. So one optimizer over the trained tensors of the clients that joined at the same
    group step (a :class:`_Cohort`: one step count), laid end to end (:class:`_Arena`, one
    per device and dtype), is, bit for bit, each client's own optimizer over its tensors
    (tests/test_concurrent_clients.py checks it against torch's). A cohort that joins adds
    its arenas with fresh state; when its last client leaves they and their state go.

    Flat: the CPU has no multi-tensor kernels, so an optimizer step over every running
    client's tensors one by one, and gathering their gradients each step, cost more than
    the clients' own loops (measured: benchmarks/concurrent_clients.py).
    """

    def __init__(self, fed: Federation, lr: float) -> None:
        self.fed, self.lr = fed, lr
        self.optimizer: torch.optim.Optimizer | None = None
        self.cohorts: list[_Cohort] = []

    def join(self, clients: Sequence[list[nn.Parameter]]) -> _Cohort:
        """Lay the trained tensors of the ``clients`` joining at this group step flat (a
        client's position in the cohort is its index in ``clients``).
        """
        kinds: dict[tuple[torch.device, torch.dtype], list[list[nn.Parameter]]] = {}
        for i, params in enumerate(clients):
            for param in params:
                key = (param.device, param.dtype)
                if key not in kinds:
                    kinds[key] = [[] for _ in clients]
                kinds[key][i].append(param)
        cohort = _Cohort([_Arena.of(each) for each in kinds.values()], set(range(len(clients))))
        tensors = [arena.flat for arena in cohort.arenas]
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.fed, tensors, self.lr)
        else:
            self.optimizer.param_groups[0]["params"].extend(tensors)
        self.cohorts.append(cohort)
        return cohort

    def leave(self, cohort: _Cohort, position: int) -> None:
        """The client at ``position`` of ``cohort`` has left: the arenas are cut back to the
        clients still running; the last one takes them out.
        """
        cohort.running.discard(position)
        assert self.optimizer is not None
        group = self.optimizer.param_groups[0]
        if not cohort.running:
            gone = {id(arena.flat) for arena in cohort.arenas}
            group["params"] = [p for p in group["params"] if id(p) not in gone]
            for arena in cohort.arenas:
                self.optimizer.state.pop(arena.flat, None)
            self.cohorts.remove(cohort)
            return
        for arena in cohort.arenas:
            end = max(arena.ends[i] for i in cohort.running)
            if end < arena.flat.numel():
                old, arena.flat = arena.flat, _prefix(arena.flat, end)
                state = self.optimizer.state.pop(old, None)
                if state is not None:
                    self.optimizer.state[arena.flat] = {
                        key: value[:end] if _like(value, old) else value
                        for key, value in state.items()
                    }
                group["params"] = [arena.flat if p is old else p for p in group["params"]]

    def step(self) -> None:
        """One step of every running client; their gradients are then cleared."""
        arenas = [arena for cohort in self.cohorts for arena in cohort.arenas]
        for arena in arenas:
            arena.gather_grad()
        assert self.optimizer is not None
        self.optimizer.step()
        for arena in arenas:
            arena.clear_grad()


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
    if model not in _PROBLEMS:
        _PROBLEMS[model] = grouping_problem(fed.task, model)
    problem = _PROBLEMS[model]
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
    optimizer = _GroupOptimizer(fed, lr)
    keep_freed_memory(fed.device)
    with torch.random.fork_rng(devices=rng_devices(fed.device), device_type=fed.device.type):
        seed_forked(fed.device, seeds.torch_seed(fed.seed, _GROUP_STREAM, round_index))
        if not model.training:
            model.train()
        running: list[_Running] = []
        with group.attached():
            while queue or running:
                joining: list[_Running] = []
                while queue and len(running) + len(joining) < capacity:
                    joined = _join(fed, group, state, *queue.popleft(), round_index)
                    if joined.batch is None:  # no example: nothing to train
                        results.append(_leave(fed, joined))
                    else:
                        joining.append(joined)
                if joining:
                    cohort = optimizer.join([run.params for run in joining])
                    for position, run in enumerate(joining):
                        run.cohort, run.position = cohort, position
                    running += joining
                if running:  # else only clients without an example were left to join
                    _group_step(fed, group, running, optimizer)
                still: list[_Running] = []
                for run in running:
                    if _advance(fed, run):
                        still.append(run)
                    else:
                        assert run.cohort is not None
                        optimizer.leave(run.cohort, run.position)
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
) -> _Running:
    """A client takes a free slot: its start factors, heads and first batch."""
    t0 = device_clock(fed.device)
    received = fed.client_message(state, client_id, round_index)
    previous = fed.client_states.get(client_id, device=fed.device)
    client = open_client(fed, client_id, rank, received, round_index, previous)
    slot = group.slot(rank, fed.bank.scaling(rank), client.start(), state.dense, client.trains)
    _, params = trained_split(client, slot.lora, slot.parameters())
    shuffle = seeds.shuffle_stream(fed.seed, round_index, client_id)
    run = _Running(client, slot, params, batch_order(fed, client_id, shuffle), t0)
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


def _group_step(
    fed: Federation, group: SlotGroup, running: list[_Running], optimizer: _GroupOptimizer
) -> None:
    """One forward and backward over the running clients' batches, then each client's step."""
    c0 = device_clock(fed.device)
    # the rows in (rank, rows) order: equal slots sit side by side and share one batched
    # LoRA product (raflora.adapters.slots)
    running = sorted(running, key=lambda r: (r.slot.rank, batch_rows(r.batch) if r.batch else 0))
    batches = [run.batch for run in running if run.batch is not None]
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
    optimizer.step()
    values = torch.stack([loss.detach().float() for loss in losses]).tolist()  # one sync
    share = (device_clock(fed.device) - c0) / len(running)
    for run, value in zip(running, values, strict=True):
        run.losses.append(float(value))
        run.compute += share


def _leave(fed: Federation, run: _Running) -> ClientResult:
    """The client's result from its slot (the slot's tensors are then dropped)."""
    head = run.slot.dense() if run.slot.heads else {}
    return close_client(fed, run.client, run.slot.factors(), head, run.losses, run.compute, run.t0)
