"""What every engine shares: the federation's set-up and the device helpers.

A :class:`Federation` holds the one base model in memory (wrapped by an
:class:`~raflora.adapters.AdapterBank` with one adapter per client rank), the task, the
aggregator, each client's fixed rank and data indices; :func:`build_federation` builds it from a
run configuration (the task, the data split, the client ranks, the wrapped base model). The
helpers here (:func:`resolve_device`, :func:`learning_rate`) are shared by both halves of a
round; what a round measures (time on the device, bytes on the wire) is in
:mod:`raflora.engine.metering`.

A client's local training is in :mod:`raflora.engine.client_round`, evaluation in
:mod:`raflora.engine.evaluation`; neither is imported here (they import this module).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from raflora.adapters import AdapterBank, adapter_name, wrap_model
from raflora.adapters.merge import effective_base_weights
from raflora.adapters.quantized import place_model
from raflora.config import RunConfig, method_options_of
from raflora.data import partition, summarize_partition
from raflora.engine import seeds
from raflora.engine.client_states import ClientStates
from raflora.engine.errors import EngineError
from raflora.methods import Aggregator, GlobalState, RoundContext, get_aggregator
from raflora.methods.base import ClientMessage
from raflora.tasks import Task, TaskError, build_task

if TYPE_CHECKING:
    from raflora.engine.private_round import PrivacyRun

__all__ = [
    "EngineError",
    "Federation",
    "build_federation",
    "learning_rate",
    "resolve_device",
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

    ``linear``: ``lr · (1 − (t − 1) / T)``, decaying over the rounds
    (docs/design.md#local-training-and-rounds);
    ``constant``: ``lr``.
    """
    if config.train.lr_schedule == "constant":
        return float(config.train.lr)
    return float(config.train.lr) * (1.0 - (round_index - 1) / config.fl.rounds)


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
        store replaces it: :func:`~raflora.engine.run_files.open_run`).
    privacy : PrivacyRun or None
        A private run's noise, clip and ledger (``privacy.enabled``; set by
        :func:`~raflora.engine.run_files.open_run`, docs/privacy.md); ``None`` otherwise.
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
    privacy: PrivacyRun | None = None

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
        ctx = replace(self.context(0), generator=seeds.init_generator(self.seed))
        return self.aggregator.init_state(ctx, self.bank.module_shapes(), dense)

    def context(self, round_index: int) -> RoundContext:
        """The context of round ``round_index`` (0: the round-0 state) for the method's hooks:
        the federation's client ranks, float32 on the run's device, and the base weights when
        the method declares it reads them.
        """
        reads = self.aggregator.capabilities.reads_base_weights
        return RoundContext(
            round_index=round_index,
            client_ranks=tuple(self.client_ranks),
            dtype=torch.float32,
            device=self.device,
            base_weights=self._base_weights if reads else None,
        )

    def client_context(self, state: GlobalState, client_id: int, round_index: int) -> RoundContext:
        """The context of client ``client_id`` in round ``round_index``: its rank this round and
        its own seeded generator (a fresh one each call, so each draw starts the same stream).
        """
        return self.context(round_index).for_client(
            client_id,
            self.rank_of(state, client_id, round_index),
            generator=seeds.client_init_generator(self.seed, round_index, client_id),
        )

    def _base_weights(self) -> dict[str, torch.Tensor]:
        """The current base weights of the adapted modules, float32 on the run's device."""
        weights = effective_base_weights(self.bank.model, adapter_name(self.aggregator.r_max))
        return {k: v.to(device=self.device, dtype=torch.float32) for k, v in weights.items()}

    def merge_initial_residual(self, state: GlobalState) -> GlobalState:
        """Merge the method's :meth:`~raflora.methods.Method.initial_residual` of the round-0
        ``state`` into the base model (ILoRA's base shift) and record it in ``base_delta``;
        ``state`` unchanged for the methods that merge none. Call it once, when a run starts.
        """
        residual = self.aggregator.initial_residual(state)
        if residual is None:
            return state
        state = self.aggregator.with_residual(state, residual)
        self.bank.merge_into_base(residual, state.base_delta)
        return state

    @property
    def wire_dtypes(self) -> tuple[torch.dtype, ...]:
        """Dtypes a client update may arrive in besides float32: the model's."""
        return (self.dtype,)

    def client_message(self, state: GlobalState, client_id: int, round_index: int) -> ClientMessage:
        """What the server sends client ``client_id`` in round ``round_index`` (the method's
        :meth:`~raflora.methods.Method.client_message`, with the client's seeded generator).
        """
        return self.aggregator.client_message(
            self.client_context(state, client_id, round_index), state
        )

    def rank_of(self, state: GlobalState, client_id: int, round_index: int | None = None) -> int:
        """Rank client ``client_id`` trains at in round ``round_index`` (HetLoRA may have pruned
        it); default: the round after ``state``'s (behind the real round after a round in which
        no update was accepted, so the engines pass it).
        """
        when = state.round + 1 if round_index is None else round_index
        ctx = self.context(when).for_client(client_id, 0)
        return self.aggregator.client_rank(ctx, state, self.client_ranks[client_id])


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
    aggregator = get_aggregator(  # the options parsed once, when the config was validated
        config.method, config.fl.rank_levels, method_options_of(config)
    )
    lo = config.lora
    target = task.target_modules if lo.target_modules == "all-linear" else lo.target_modules
    model = place_model(task.model, device, dtype)  # a quantised base takes no dtype cast
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
    problem = aggregator.module_shape_problem(bank.module_shapes())
    if problem is not None:
        raise EngineError(f"method {config.method!r}: {problem}")
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
