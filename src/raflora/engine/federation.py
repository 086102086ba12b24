"""What every engine shares: the federation's set-up, a client's local training, evaluation.

A :class:`Federation` holds the one base model in memory (wrapped by an
:class:`~raflora.adapters.AdapterBank` with one adapter per client rank), the task, the
aggregator, each client's fixed rank and data indices. The local engine and the Flower client
both call :func:`train_client` — there is a single copy of the training loop.

Local training follows the paper's protocol (Algorithm 1 lines 5–7, Appendix E): the client
starts from the factors the server sent for its rank, trains with AdamW for ``local_epochs`` at the
round's learning rate (linear decay over rounds), and returns its effective factors and heads.
The method's client half (:class:`~raflora.methods.ClientRound`) decides where the factors start,
which of them train, the gradient correction and what is uploaded; the loop itself is the same
for every method.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raflora.adapters import (
    AdapterBank,
    adapter_name,
    base_weights,
    live_factors,
    lora_parameters,
    wrap_model,
)
from raflora.config import RunConfig
from raflora.data import partition, summarize_partition
from raflora.engine import seeds
from raflora.engine.client_states import ClientStates
from raflora.engine.errors import EngineError
from raflora.methods import Aggregator, ClientUpdate, GlobalState, get_aggregator
from raflora.methods.base import ClientMessage, ClientRound, Factors, options_for
from raflora.tasks import Task, TaskError, build_task, move_batch

__all__ = [
    "ClientResult",
    "EngineError",
    "Federation",
    "build_federation",
    "device_clock",
    "evaluate_global",
    "evaluate_levels",
    "evaluate_round",
    "learning_rate",
    "resolve_device",
    "tensor_bytes",
    "train_client",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available) as a ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EngineError("device: 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def learning_rate(config: RunConfig, round_index: int) -> float:
    """Client learning rate in round ``round_index`` (1-based).

    ``linear``: ``lr · (1 − (t − 1) / T)``, decaying over the rounds (SPEC §7);
    ``constant``: ``lr``.
    """
    if config.train.lr_schedule == "constant":
        return float(config.train.lr)
    return float(config.train.lr) * (1.0 - (round_index - 1) / config.fl.rounds)


def device_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work is done.

    CUDA kernels run asynchronously: without synchronising, a time split taken on the host
    books the kernels' time to whatever happens to wait for them next.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def tensor_bytes(tensors: Mapping[str, Any]) -> int:
    """Bytes of every tensor in a mapping of tensors or ``(B, A)`` pairs (SPEC §8)."""
    total = 0
    for value in tensors.values():
        parts = value if isinstance(value, tuple) else (value,)
        total += sum(t.numel() * t.element_size() for t in parts)
    return total


@dataclass
class Federation:
    """Everything a round needs besides the global state.

    Attributes
    ----------
    config : RunConfig
        The resolved run configuration.
    task : Task
        Model, data, loss and metric.
    bank : AdapterBank
        The base model with one adapter per client rank.
    aggregator : Aggregator
        The method.
    client_ranks : list[int]
        Rank ``r_k`` of every client (drawn once from the run's seed).
    client_indices : list[np.ndarray]
        Training example indices of every client.
    partition_summary : dict
        Samples and classes per client (written to ``partition.json``).
    device : torch.device
        Where training runs.
    dtype : torch.dtype
        Model dtype.
    client_states : ClientStates
        The per-client state of the method's clients (in memory until a run directory's
        store replaces it: :func:`~raflora.engine.local.open_run`).
    """

    config: RunConfig
    task: Task
    bank: AdapterBank
    aggregator: Aggregator
    client_ranks: list[int]
    client_indices: list[np.ndarray]
    partition_summary: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    client_states: ClientStates = field(default_factory=ClientStates)

    @property
    def seed(self) -> int:
        """The run seed."""
        return int(self.config.seed)

    def num_samples(self, client_id: int) -> int:
        """``n_k``: training examples of client ``client_id``."""
        return len(self.client_indices[client_id])

    def initial_state(self) -> GlobalState:
        """The round-0 global state (``B_g = 0``, seeded ``A_g``; the task's initial heads).

        In float32 whatever the model's dtype, on the run's device (the random draws are made on
        the CPU, so every device starts from the same numbers).
        """
        dense = {
            k: v.to(device=self.device, dtype=torch.float32)
            for k, v in self.bank.get_dense(self.aggregator.r_max).items()
        }
        method = self.aggregator
        base = None
        if method.reads_base_weights:
            weights = base_weights(self.bank.model, adapter_name(method.r_max))
            base = {k: v.to(device=self.device, dtype=torch.float32) for k, v in weights.items()}
        return method.init_state(
            self.bank.module_shapes(),
            generator=seeds.init_generator(self.seed),
            dense=dense,
            dtype=torch.float32,
            device=self.device,
            base_weights=base,
        )

    @property
    def wire_dtypes(self) -> tuple[torch.dtype, ...]:
        """Dtypes a client update may arrive in besides float32: the model's."""
        return (self.dtype,)

    def client_message(self, state: GlobalState, client_id: int, round_index: int) -> ClientMessage:
        """What the server sends client ``client_id`` in round ``round_index`` (the method's
        :meth:`~raflora.methods.Method.client_message`, with the client's seeded generator).
        """
        return self.aggregator.client_message(
            state,
            self.rank_of(state, client_id),
            client_id=client_id,
            round_index=round_index,
            generator=seeds.client_init_generator(self.seed, round_index, client_id),
        )

    def rank_of(self, state: GlobalState, client_id: int) -> int:
        """Rank client ``client_id`` trains at (HetLoRA may have pruned it)."""
        return self.aggregator.client_rank(state, client_id, self.client_ranks[client_id])


def _split(config: RunConfig, task: Task) -> tuple[list[np.ndarray], dict[str, Any]]:
    spec = config.data.partition
    labels = task.partition_labels
    if labels is None and spec != "iid":
        raise EngineError(
            f"data.partition {spec!r} needs class labels, but task {task.name!r} has none; "
            f"use data.partition=iid"
        )
    try:
        parts = partition(
            spec,
            labels,
            config.fl.num_clients,
            seeds.partition_seed(config.seed),
            num_samples=task.num_train,
            min_samples=config.data.min_samples,
        )
    except ValueError as err:
        raise EngineError(f"data.partition {spec!r}: {err}") from None
    empty = [k for k, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise EngineError(
            f"data.partition {spec!r}: {len(empty)} of {len(parts)} clients got no training "
            f"example (e.g. client {empty[0]}); use fewer clients or a different partition"
        )
    return parts, summarize_partition(parts, labels)


def build_federation(config: RunConfig, *, task: Task | None = None) -> Federation:
    """Build the task, split its data, draw client ranks and wrap the base model.

    Parameters
    ----------
    config : RunConfig
        A validated configuration.
    task : Task, optional
        An already built task (``raflora compare`` reuses one across methods is *not* done: each
        method needs a pristine base model, so this is for tests and the Flower client).

    Raises
    ------
    TaskError
        The model or dataset cannot be loaded.
    EngineError
        The partition or device cannot be satisfied.
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)  # every process of the run builds a federation
    device = resolve_device(config.device)
    dtype = _DTYPES[config.dtype]
    task = task if task is not None else build_task(config)
    parts, summary = _split(config, task)
    ranks = seeds.client_ranks(
        config.seed, config.fl.num_clients, config.fl.rank_levels, config.fl.rank_probs
    )
    summary["client_ranks"] = ranks
    aggregator = get_aggregator(
        config.method, config.fl.rank_levels, **options_for(config.method, config.method_options)
    )
    lo = config.lora
    target = task.target_modules if lo.target_modules == "all-linear" else lo.target_modules
    model = task.model.to(device=device, dtype=dtype)
    if config.train.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
            model, "gradient_checkpointing_enable", None
        )
        if not callable(enable):
            raise TaskError(
                f"task {task.name!r}: the model does not support gradient checkpointing"
            )
        enable()
        require_grads = getattr(model, "enable_input_require_grads", None)
        if callable(require_grads):
            require_grads()
    try:
        bank = wrap_model(
            model,
            target_modules=target,
            max_rank=aggregator.r_max,
            modules_to_save=lo.modules_to_save or task.modules_to_save,
            lora_alpha=None if lo.alpha == "rank" else float(lo.alpha),
            lora_dropout=lo.dropout,
            use_rslora=lo.use_rslora,
            task_type=task.task_type,
        )
    except ValueError as err:  # PEFT: target modules not found
        raise EngineError(f"lora.target_modules {target!r}: {err}") from None
    if lo.modules_to_save:
        heads = bank.saved_module_names()
        missing = [
            m for m in lo.modules_to_save if not any(h == m or h.endswith("." + m) for h in heads)
        ]
        if missing:
            raise EngineError(
                f"lora.modules_to_save: no module named {missing[0]!r} in the model "
                f"(modules trained in full: {', '.join(heads) or 'none'})"
            )
    return Federation(
        config=config,
        task=task,
        bank=bank,
        aggregator=aggregator,
        client_ranks=ranks,
        client_indices=parts,
        partition_summary=summary,
        device=device,
        dtype=dtype,
    )


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
    client = fed.aggregator.client_round(received, rank=rank, round_index=round_index, state=state)
    # Creating a rank's adapter (PEFT's init) and dropout draw from torch's global generator:
    # all of it runs inside a fork, seeded for this client, so the caller's random state is
    # left exactly as it was (nothing here reseeds or consumes the global RNG).
    with torch.random.fork_rng(devices=_rng_devices(fed.device), device_type=fed.device.type):
        losses, compute = _local_round(fed, client_id, client, dense, round_index, lr)
    upload = client.finish(fed.bank.get_factors(rank))
    head = {k: v.float() for k, v in fed.bank.get_dense(rank).items()} if dense else {}
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
    _seed_forked(fed.device, seeds.training_torch_seed(fed.seed, round_index, client_id))
    bank.set_factors(rank, client.start())
    if dense:
        bank.set_dense(rank, dense)
    model = bank.model
    if not model.training:  # train() walks every module; evaluation is what switches it off
        model.train()
    lora = lora_parameters(model, adapter)
    frozen = [
        param
        for pair in lora.values()
        for kind, param in zip(("B", "A"), pair, strict=True)
        if kind not in client.trains
    ]
    frozen_ids = {id(p) for p in frozen}
    params = [p for p in bank.trainable_parameters() if id(p) not in frozen_ids]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=fed.config.train.weight_decay)
    shuffle = seeds.shuffle_stream(fed.seed, round_index, client_id)
    for param in frozen:
        param.requires_grad_(False)
    try:
        return _local_steps(fed, client_id, client, adapter, optimizer, params, lora, shuffle)
    finally:
        for param in frozen:
            param.requires_grad_(True)


def _seed_forked(device: torch.device, seed: int) -> None:
    """Seed the CPU generator and, on CUDA, the run's device — exactly the generators that
    :func:`train_client` forks (``torch.manual_seed`` would reseed every GPU of the host).
    """
    torch.default_generator.manual_seed(seed)
    for index in _rng_devices(device):
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)


def _rng_devices(device: torch.device) -> list[int]:
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
    cfg, task, model = fed.config, fed.task, fed.bank.model
    indices = fed.client_indices[client_id]
    batch_size = cfg.train.batch_size
    penalize = client.uses_penalty
    losses: list[float] = []
    compute = 0.0
    for _ in range(cfg.train.local_epochs):
        order = shuffle.permutation(indices)
        for lo in range(0, len(order), batch_size):
            batch = move_batch(
                task.train_batch(order[lo : lo + batch_size].tolist()), fed.device, fed.dtype
            )
            c0 = device_clock(fed.device)
            loss = task.loss(model, batch)
            total = loss
            if penalize:
                penalty = client.penalty(live_factors(model, adapter))
                total = loss if penalty is None else loss + penalty
            optimizer.zero_grad(set_to_none=True)
            total.backward()  # type: ignore[no-untyped-call]
            if client.corrects_gradients:
                client.correct_gradients({k: (B.grad, A.grad) for k, (B, A) in lora.items()})
            if cfg.train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            compute += device_clock(fed.device) - c0
            losses.append(float(loss.detach()))
    return losses, compute


def load_global_model(fed: Federation, state: GlobalState) -> None:
    """Put the global model on the base model's ``r_max`` adapter and activate it."""
    _load_model(fed, fed.aggregator.model_factors(state), state.dense)


def _load_model(fed: Federation, factors: Factors, dense: Mapping[str, Tensor]) -> None:
    """Put ``factors`` (at ``r_max``) and the heads on the ``r_max`` adapter and activate it."""
    r_max = fed.aggregator.r_max
    fed.bank.activate(r_max)
    fed.bank.set_factors(r_max, factors)
    if dense:
        fed.bank.set_dense(r_max, dense)


def _evaluate_loaded(fed: Federation) -> dict[str, float]:
    """The task's metrics of the model the bank holds now (deterministic, no RNG drawn)."""
    model = fed.bank.model
    model.eval()
    with torch.no_grad():
        metrics: dict[str, float] = fed.task.evaluate(model, fed.config.eval.batch_size, fed.device)
    return metrics


def evaluate_global(fed: Federation, state: GlobalState) -> dict[str, float]:
    """The task's metrics (``accuracy``, ``eval_loss`` …) of the global model."""
    load_global_model(fed, state)
    return _evaluate_loaded(fed)


def _same_factors(a: Factors, b: Factors) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a
    )


def evaluate_levels(
    fed: Federation, state: GlobalState, full: Mapping[str, float] | None = None
) -> dict[str, float]:
    """The task's metrics of the model a client of each rank level holds (``eval.per_level``).

    Level ``r`` gets the aggregator's :meth:`~raflora.methods.Aggregator.level_factors`
    (the nested truncation of the global factors; FLoRA: the merged base, so every level
    equals the global model) with the global heads; its metrics are keyed ``"{name}@{r}"``
    (``accuracy@8``, ``eval_loss@8``). The global model is back on the ``r_max`` adapter
    afterwards, and nothing draws from a random generator, so the run continues exactly as
    without per-level evaluation.

    Parameters
    ----------
    fed : Federation
        The federation (its ``r_max`` adapter is used for every level).
    state : GlobalState
        The global state to evaluate.
    full : Mapping[str, float], optional
        The global model's metrics when already computed: a level whose factors are the global
        model's (the top level; every level of FLoRA) reuses them instead of evaluating again.
    """
    aggregator = fed.aggregator
    global_factors = aggregator.model_factors(state)
    out: dict[str, float] = {}
    for rank in aggregator.rank_levels:
        factors = aggregator.level_factors(state, rank)
        if full is not None and _same_factors(factors, global_factors):
            metrics = dict(full)
        else:
            _load_model(fed, factors, state.dense)
            metrics = _evaluate_loaded(fed)
        out.update({f"{name}@{rank}": value for name, value in metrics.items()})
    load_global_model(fed, state)  # what an evaluation leaves on the adapter, as without levels
    return out


def evaluate_round(fed: Federation, state: GlobalState) -> dict[str, float]:
    """The global model's metrics, then each rank level's when ``eval.per_level`` is on."""
    metrics = evaluate_global(fed, state)
    if fed.config.eval.per_level:
        metrics.update(evaluate_levels(fed, state, full=metrics))
    return metrics
