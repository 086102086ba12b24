"""The client half of a round: one client's local training (Algorithm 1 lines 5–7).

The local engine and the Flower client both call :func:`train_client` — there is a single copy
of the training loop. The per-client pieces it is made of — :func:`open_client` (the method's
client half), :func:`trained_split` (what trains), :func:`make_optimizer`, :func:`batch_order`
(the shuffle stream), :func:`prepare_step` (gradient correction and clipping) and
:func:`close_client` (the upload) — are also what :mod:`raflora.engine.concurrent` uses when a
round's clients train together (``train.concurrent_clients``, docs/concurrency.md), so each
client's semantics has one copy.

Local training follows the paper's protocol (Algorithm 1 lines 5–7, Appendix E): the client
starts from the factors the server sent for its rank, trains with AdamW for ``local_epochs`` at the
round's learning rate (linear decay over rounds), and returns its effective factors and heads.
The method's client half (:class:`~raflora.methods.ClientRound`) decides where the factors start,
which of them train, the gradient correction and what is uploaded; the loop itself is the same
for every method.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from raflora.adapters import live_factors, lora_parameters
from raflora.engine import seeds
from raflora.engine.federation import Federation
from raflora.engine.metering import device_clock
from raflora.methods import ClientUpdate
from raflora.methods.base import ClientMessage, ClientRound, Factors
from raflora.tasks import move_batch

__all__ = [
    "ClientResult",
    "batch_order",
    "close_client",
    "make_optimizer",
    "open_client",
    "prepare_step",
    "rng_devices",
    "seed_forked",
    "train_client",
    "trained_split",
]


@dataclass
class ClientResult:
    """One client's round: its update and how training went.

    Attributes
    ----------
    update : ClientUpdate
        Effective factors, heads and sample count (validated by the server).
    train_loss : float
        Mean training loss over the client's local steps (``nan`` if it diverged).
    steps : int
        Optimizer steps taken.
    compute_seconds : float
        Time inside forward, backward and optimizer steps.
    seconds : float
        Whole local round, including loading the factors and reading them back.
    state : dict[str, Tensor] or None
        The client's new per-client state (``None``: the method keeps none for it).
    """

    update: ClientUpdate
    train_loss: float
    steps: int
    compute_seconds: float
    seconds: float
    state: dict[str, Tensor] | None = None


def train_client(
    fed: Federation,
    client_id: int,
    rank: int,
    received: ClientMessage,
    dense: Mapping[str, Tensor],
    round_index: int,
    lr: float,
    *,
    state: Mapping[str, Tensor] | None = None,
) -> ClientResult:
    """Local training of one client on the shared base model (Algorithm 1 lines 5–7).

    Parameters
    ----------
    fed : Federation
        The federation (its base model is reused; only the rank's adapter changes).
    client_id : int
        The client.
    rank : int
        Its rank this round.
    received : ClientMessage
        What the server sent (effective factors of rank ``rank``, the method's extras).
    dense : Mapping[str, Tensor]
        Global head tensors.
    round_index : int
        1-based round (seeds the batch order and dropout).
    lr : float
        This round's learning rate.
    state : Mapping[str, Tensor], optional
        The client's per-client state from its last round (the method's, e.g. ILoRA's ``c_k``).
    """
    t0 = device_clock(fed.device)
    client = open_client(fed, client_id, rank, received, round_index, state)
    # Creating a rank's adapter (PEFT's init) and dropout draw from torch's global generator:
    # all of it runs inside a fork, seeded for this client, so the caller's random state is
    # left exactly as it was (nothing here reseeds or consumes the global RNG).
    with torch.random.fork_rng(devices=rng_devices(fed.device), device_type=fed.device.type):
        losses, compute = _local_round(fed, client_id, client, dense, round_index, lr)
    head = {k: v.float() for k, v in fed.bank.get_dense(rank).items()} if dense else {}
    return close_client(fed, client, fed.bank.get_factors(rank), head, losses, compute, t0)


def open_client(
    fed: Federation,
    client_id: int,
    rank: int,
    received: ClientMessage,
    round_index: int,
    state: Mapping[str, Tensor] | None = None,
) -> ClientRound:
    """The method's client half for ``client_id`` at ``rank`` in round ``round_index``."""
    ctx = fed.context(round_index).for_client(client_id, rank)
    return fed.aggregator.client_round(ctx, received, state)


def close_client(
    fed: Federation,
    client: ClientRound,
    trained: Factors,
    head: dict[str, Tensor],
    losses: list[float],
    compute: float,
    t0: float,
) -> ClientResult:
    """The client's result from its trained effective factors and float32 heads: the method's
    :meth:`~raflora.methods.ClientRound.finish` makes the upload.
    """
    client_id, rank = client.ctx.client_id, client.rank
    assert client_id is not None  # a client's context (open_client) names it
    upload = client.finish(trained)
    update = ClientUpdate(
        client_id=client_id,
        rank=rank,
        num_samples=len(fed.client_indices[client_id]),
        factors=upload.factors,
        dense=head,
        extras=upload.extras,
    )
    mean_loss = sum(losses) / len(losses) if losses else math.nan
    seconds = device_clock(fed.device) - t0
    return ClientResult(update, mean_loss, len(losses), compute, seconds, upload.state)


def _local_round(
    fed: Federation,
    client_id: int,
    client: ClientRound,
    dense: Mapping[str, Tensor],
    round_index: int,
    lr: float,
) -> tuple[list[float], float]:
    """Load the client's start, build its optimizer and run its local epochs.

    Factors the method freezes this round (:attr:`ClientRound.trains`) get no gradient and
    are left out of the optimizer; they are unfrozen again afterwards.
    """
    bank = fed.bank
    rank = client.rank
    adapter = bank.activate(rank)
    # seeded after the adapter exists, so creating one never shifts this client's dropout
    seed_forked(fed.device, seeds.training_torch_seed(fed.seed, round_index, client_id))
    bank.set_factors(rank, client.start())
    if dense:
        bank.set_dense(rank, dense)
    model = bank.model
    if not model.training:  # train() walks every module; evaluation is what switches it off
        model.train()
    lora = lora_parameters(model, adapter)
    frozen, params = trained_split(client, lora, bank.trainable_parameters())
    optimizer = make_optimizer(fed, params, lr)
    shuffle = seeds.shuffle_stream(fed.seed, round_index, client_id)
    for param in frozen:
        param.requires_grad_(False)
    try:
        return _local_steps(fed, client_id, client, adapter, optimizer, params, lora, shuffle)
    finally:
        for param in frozen:
            param.requires_grad_(True)


def trained_split(
    client: ClientRound,
    lora: Mapping[str, tuple[torch.nn.Parameter, torch.nn.Parameter]],
    trainable: list[torch.nn.Parameter],
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """``(frozen, params)``: the LoRA weights the method freezes this round
    (:attr:`ClientRound.trains`), and the ``trainable`` parameters without them (what the
    optimizer and gradient clipping see).
    """
    frozen = [
        param
        for pair in lora.values()
        for kind, param in zip(("B", "A"), pair, strict=True)
        if kind not in client.trains
    ]
    frozen_ids = {id(p) for p in frozen}
    return frozen, [p for p in trainable if id(p) not in frozen_ids]


def make_optimizer(
    fed: Federation, params: list[torch.nn.Parameter], lr: float, *, foreach: bool | None = None
) -> torch.optim.Optimizer:
    """``train.optimizer``: AdamW (the paper's, Appendix E) or plain SGD (no momentum).

    ``foreach``: torch's multi-tensor implementation (``None``: torch's default for the
    device); the same per-element arithmetic, one call for many tensors.
    """
    decay = fed.config.train.weight_decay
    if fed.config.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=decay, foreach=foreach)
    return torch.optim.AdamW(params, lr=lr, weight_decay=decay, foreach=foreach)


def batch_order(
    fed: Federation, client_id: int, shuffle: np.random.Generator
) -> Iterator[list[int]]:
    """The client's local minibatches (example indices), epoch after epoch; each epoch's
    permutation is drawn from ``shuffle`` when the epoch starts.
    """
    indices = fed.client_indices[client_id]
    batch_size = fed.config.train.batch_size
    for _ in range(fed.config.train.local_epochs):
        order = shuffle.permutation(indices)
        for lo in range(0, len(order), batch_size):
            yield order[lo : lo + batch_size].tolist()


def prepare_step(
    fed: Federation,
    client: ClientRound,
    params: list[torch.nn.Parameter],
    lora: Mapping[str, tuple[torch.nn.Parameter, torch.nn.Parameter]],
) -> None:
    """After the backward pass, before the optimizer step: the method's gradient correction,
    then clipping on the client's own gradient norm.
    """
    if client.corrects_gradients:
        client.correct_gradients({k: (B.grad, A.grad) for k, (B, A) in lora.items()})
    if fed.config.train.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, fed.config.train.max_grad_norm)


def seed_forked(device: torch.device, seed: int) -> None:
    """Seed the CPU generator and, on CUDA, the run's device — exactly the generators that
    :func:`train_client` forks (``torch.manual_seed`` would reseed every GPU of the host).
    """
    torch.default_generator.manual_seed(seed)
    for index in rng_devices(device):
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)


def rng_devices(device: torch.device) -> list[int]:
    """The accelerator indices whose random state a client's training forks (none on CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _local_steps(
    fed: Federation,
    client_id: int,
    client: ClientRound,
    adapter: str,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    lora: Mapping[str, tuple[torch.nn.Parameter, torch.nn.Parameter]],
    shuffle: np.random.Generator,
) -> tuple[list[float], float]:
    """The client's local epochs; returns the per-step losses and the compute seconds."""
    task, model = fed.task, fed.bank.model
    penalize = client.uses_penalty
    losses: list[float] = []
    compute = 0.0
    for indices in batch_order(fed, client_id, shuffle):
        batch = move_batch(task.train_batch(indices), fed.device, fed.dtype)
        c0 = device_clock(fed.device)
        loss = task.loss(model, batch)
        total = loss
        if penalize:
            penalty = client.penalty(live_factors(model, adapter))
            total = loss if penalty is None else loss + penalty
        optimizer.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[no-untyped-call]
        prepare_step(fed, client, params, lora)
        optimizer.step()
        compute += device_clock(fed.device) - c0
        losses.append(float(loss.detach()))
    return losses, compute
