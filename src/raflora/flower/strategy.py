"""``RankStrategy``: a Flower strategy that runs any raflora aggregator (docs/flower.md).

Flower's built-in strategies send every node the same arrays and average equal shapes. With
heterogeneous ranks each client needs the factors *of its own rank*, and the replies have
different shapes, so this strategy drives the local engine's round bookkeeping instead:

- :meth:`RankStrategy.configure_train` calls :func:`~raflora.engine.server_round.plan_round` (the
  run's own sampling stream, so the same clients as the local engine), maps each sampled client id
  to the SuperNode whose ``partition-id`` equals it, and sends that node
  :meth:`~raflora.engine.federation.Federation.start_factors` for its rank plus the global heads.
- :meth:`RankStrategy.aggregate_train` decodes the replies into
  :class:`~raflora.engine.client_round.ClientResult` s on the server's device, weighted by the
  sample count of the partition the server assigned to each client (a reply reporting another count
  is rejected as a ``sample count mismatch``), and calls
  :func:`~raflora.engine.server_round.complete_round`, which validates (NaN, shapes, module set),
  aggregates, merges into the base (FLoRA), evaluates and builds the same metrics row as the local
  engine. Replies carrying an error (the ``ClientApp`` raised), missing replies (timed out, node
  gone) and malformed replies are left out and counted in ``rejected`` with a reason; a round with
  no usable reply leaves the global state unchanged.

Node ↔ client mapping: the first time it sees a node, the strategy asks it (a Flower ``query``
message) for its ``partition-id`` and ``num-partitions`` node config; client ``k`` of the local
engine is the node with ``partition-id = k``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from raflora.adapters import adapter_name, base_weights
from raflora.config import config_to_dict
from raflora.engine.client_round import ClientResult
from raflora.engine.federation import EngineError, Federation
from raflora.engine.run_files import record_round
from raflora.engine.server_round import RoundPlan, complete_round, plan_round
from raflora.flower.records import (
    ARRAYS,
    CONFIG,
    METRICS,
    PRIVATE,
    MalformedReplyError,
    decode_contribution,
    decode_result,
    encode_arrays,
    record_bytes,
)
from raflora.methods import GlobalState, InvalidUpdateError
from raflora.methods.private import private_shapes
from raflora.methods.validation import validate_named
from raflora.privacy.mechanism import Contribution

__all__ = [
    "PRIVACY_CLIP",
    "PRIVACY_COHORT",
    "PRIVACY_DELTA",
    "PRIVACY_RATE",
    "PRIVACY_Z",
    "QUERY_PARTITION",
    "RankStrategy",
]

QUERY_PARTITION = "partition-id"
"""``action`` of the query message that asks a node for its ``partition-id``."""

# Train-message config keys of a ``privacy.noise: client`` round (docs/privacy.md): what a
# client needs to clip its update and draw its noise share; their presence tells it to.
PRIVACY_Z = "privacy-noise-multiplier"
PRIVACY_CLIP = "privacy-clip"
PRIVACY_DELTA = "privacy-delta"
PRIVACY_RATE = "privacy-sample-rate"
PRIVACY_COHORT = "privacy-cohort"


def _short(reason: str | None, limit: int = 300) -> str:
    """The gist of a (Ray-wrapped) client traceback: its last ``Message:`` or last line."""
    text = (reason or "unknown error").strip()
    marker = text.rfind("Message: ")
    if marker >= 0:
        text = text[marker + len("Message: ") :]
    lines = [line.strip() for line in text.splitlines() if line.strip().strip("'>")]
    gist = lines[0] if marker >= 0 and lines else (lines[-1] if lines else text)
    gist = gist.rstrip("'>")
    return gist if len(gist) <= limit else gist[: limit - 1] + "…"


class RankStrategy(Strategy):
    """Flower strategy wrapping a server-side :class:`Federation` and its :class:`GlobalState`.

    Parameters
    ----------
    fed : Federation
        The server's federation (task for evaluation, aggregator, client ranks, base model).
    state : GlobalState
        The global state to start from.
    metrics : list[dict], optional
        Metrics rows of rounds already run (appended to).
    run_dir : Path, optional
        Where each round's checkpoint and metrics line go (nothing is written when omitted).
    wall_before : float
        Wall seconds already spent (recorded in checkpoints).
    node_wait : float
        Seconds to wait for all ``num_clients`` SuperNodes to connect before round 1.
    query_timeout : float
        Seconds to wait for the nodes' ``partition-id`` answers.
    on_round : callable, optional
        Called with each round's metrics row after it is saved.
    """

    def __init__(
        self,
        fed: Federation,
        state: GlobalState,
        *,
        metrics: list[dict[str, Any]] | None = None,
        run_dir: Path | None = None,
        wall_before: float = 0.0,
        node_wait: float = 600.0,
        query_timeout: float = 120.0,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.fed = fed
        self.state = state
        self.metrics: list[dict[str, Any]] = [] if metrics is None else metrics
        self.run_dir = run_dir
        self.wall_before = wall_before
        self.node_wait = node_wait
        self.query_timeout = query_timeout
        self.on_round = on_round
        self.nodes: dict[int, int] = {}  # partition-id → node id
        self._asked: set[int] = set()  # node ids already asked for their partition-id
        self._run_config = json.dumps(config_to_dict(fed.config), sort_keys=True)
        self._started = time.perf_counter()
        self._round_start = 0.0
        self._plan: RoundPlan | None = None
        self._base: dict[str, Tensor] | None = None  # FLoRA: merged base weights, per round
        self._sent: dict[int, int] = {}  # node id → client id of this round's messages
        self._unreachable: dict[int, str] = {}
        self._transport = 0  # bytes of this round's messages, both ways (transport_bytes)
        # privacy.noise: client — this round's contributions (client id → pieces, or why not)
        self._private: dict[int, Contribution | str] = {}

    # ------------------------------------------------------------------ node ↔ client mapping
    @property
    def num_clients(self) -> int:
        """``K``: clients of the run, one SuperNode each."""
        return int(self.fed.config.fl.num_clients)

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.node_wait
        while len(nodes := list(grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise EngineError(
                    f"only {len(nodes)} of {self.num_clients} SuperNodes connected within "
                    f"{self.node_wait:.0f} s; start one SuperNode per client "
                    f"(partition-id 0 … {self.num_clients - 1})"
                )
            log(INFO, "Waiting for SuperNodes: %d of %d connected", len(nodes), self.num_clients)
            time.sleep(1.0)
        return nodes

    def map_nodes(self, grid: Grid) -> dict[int, int]:
        """Ask every node not yet asked for its ``partition-id``; return partition-id → node id.

        Nodes that left are forgotten; a node that does not answer, or answers a partition-id
        outside ``0 … K-1`` or a different ``num-partitions``, is ignored with a warning.
        """
        connected = self._wait_for_nodes(grid) if not self.nodes else list(grid.get_node_ids())
        alive = set(connected)
        self.nodes = {pid: node for pid, node in self.nodes.items() if node in alive}
        self._asked &= alive
        new = [node for node in connected if node not in self._asked]
        if not new:
            return self.nodes
        query = [
            Message(
                content=RecordDict({CONFIG: ConfigRecord({"action": QUERY_PARTITION})}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in new
        ]
        self._asked.update(new)
        for reply in grid.send_and_receive(query, timeout=self.query_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "Node %s did not say its partition-id: %s", node, reply.error.reason)
                continue
            answer = reply.content.get(CONFIG)
            pid = answer.get("partition-id") if isinstance(answer, ConfigRecord) else None
            parts = answer.get("num-partitions") if isinstance(answer, ConfigRecord) else None
            if not isinstance(pid, int) or not 0 <= pid < self.num_clients:
                log(
                    WARNING,
                    "Node %s has partition-id %r outside 0 … %d",
                    node,
                    pid,
                    self.num_clients - 1,
                )
                continue
            if parts != self.num_clients:
                log(
                    WARNING,
                    "Node %s has num-partitions %r, the run has %d clients",
                    node,
                    parts,
                    self.num_clients,
                )
                continue
            if pid in self.nodes and self.nodes[pid] != node:
                log(
                    WARNING,
                    "Nodes %s and %s both have partition-id %d; using the first",
                    self.nodes[pid],
                    node,
                    pid,
                )
                continue
            self.nodes[pid] = node
        return self.nodes

    # ------------------------------------------------------------------ training round
    @property
    def client_noise(self) -> bool:
        """A private run whose clients add the noise (``privacy.noise: client``)."""
        return self.fed.privacy is not None and self.fed.config.privacy.noise == "client"

    def train_message(self, plan: RoundPlan, client_id: int, rank: int, node: int) -> Message:
        """The message client ``client_id`` gets: its rank's start factors, heads, round config."""
        fed, state = self.fed, self.state
        message = fed.client_message(state, client_id, plan.round_index)
        arrays = encode_arrays(
            message.factors,
            state.dense,
            self._base,
            extras=message.extras,
            state=fed.client_states.get(client_id),
        )
        self._transport += record_bytes(arrays)
        config = ConfigRecord(
            {
                "round": plan.round_index,
                "lr": float(plan.lr),
                "rank": int(rank),
                "client-id": int(client_id),
                "run-config": self._run_config,
            }
        )
        if self.client_noise:
            run = fed.privacy
            assert run is not None
            config[PRIVACY_Z] = float(run.noise_multiplier)
            config[PRIVACY_CLIP] = float(run.clip)
            config[PRIVACY_DELTA] = float(run.delta)
            config[PRIVACY_RATE] = float(run.sample_rate)
            config[PRIVACY_COHORT] = len(plan.clients)  # m: each client adds (z C)² / m
        return Message(
            content=RecordDict({ARRAYS: arrays, CONFIG: config}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
            group_id=str(plan.round_index),
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the round's clients (:func:`plan_round`) and send each its rank's factors."""
        return self.prepare_round(self.map_nodes(grid))

    def prepare_round(self, nodes: Mapping[int, int]) -> list[Message]:
        """Plan the next round and build its messages, given partition-id → node id.

        Sampled clients without a node are recorded as failed (no message is sent to them).
        """
        self._round_start = time.perf_counter()
        plan = plan_round(self.fed, self.state, len(self.metrics) + 1)
        self._plan = plan
        # FLoRA: the merged base weights go to every client (one copy per round); a client
        # process may serve clients that missed earlier merges, so it cannot rebuild them itself.
        self._base = (
            base_weights(self.fed.bank.model, adapter_name(self.fed.aggregator.r_max))
            if self.state.base_delta
            else None
        )
        self._sent = {}
        self._unreachable = {}
        self._transport = 0
        self._private = {}
        messages = []
        for client_id, rank in zip(plan.clients, plan.ranks, strict=True):
            node = nodes.get(client_id)
            if node is None:
                self._unreachable[client_id] = f"no SuperNode with partition-id {client_id}"
                continue
            self._sent[node] = client_id
            messages.append(self.train_message(plan, client_id, rank, node))
        log(INFO, "Round %d: clients %s, ranks %s", plan.round_index, plan.clients, plan.ranks)
        return messages

    def collect(self, replies: Iterable[Message]) -> tuple[list[ClientResult], dict[int, str]]:
        """Decode this round's replies; every sampled client without a usable one gets a reason.

        Replies are decoded onto the server's device and weighted by the sample count of the
        partition the server assigned to the client (:meth:`Federation.num_samples`); a reply
        that reports another count is left out
        (:class:`~raflora.flower.records.SampleCountMismatchError`).
        """
        assert self._plan is not None
        rank_of = dict(zip(self._plan.clients, self._plan.ranks, strict=True))
        failures = dict(self._unreachable)
        results: list[ClientResult] = []
        answered: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            client_id = self._sent.get(node)
            if client_id is None or client_id in answered:
                log(WARNING, "Ignoring an unexpected reply from node %s", node)
                continue
            answered.add(client_id)
            if reply.has_error():
                failures[client_id] = f"client failed: {_short(reply.error.reason)}"
                continue
            try:
                content = reply.content
                arrays = content.get(ARRAYS)
                if isinstance(arrays, ArrayRecord):
                    self._transport += record_bytes(arrays)
                result = decode_result(
                    arrays,
                    content.get(METRICS),
                    client_id=client_id,
                    rank=rank_of[client_id],
                    num_samples=self.fed.num_samples(client_id),
                    device=self.fed.device,
                )
                self._check_client_state(result)
                if self.client_noise:
                    self._private[client_id] = self._contribution(content.get(PRIVATE), client_id)
                results.append(result)
            except MalformedReplyError as err:  # SampleCountMismatchError included
                failures[client_id] = f"{err.label}: {err}"
            except InvalidUpdateError as err:  # a per-client state the method cannot keep
                failures[client_id] = f"invalid client state: {err.reason}"
        for client_id in self._sent.values():
            if client_id not in answered:
                failures[client_id] = "no reply (timed out or node lost)"
        results.sort(key=lambda r: r.update.client_id)  # the local engine's order
        return results, failures

    def _contribution(self, record: object, client_id: int) -> Contribution:
        """A ``privacy.noise: client`` reply's noised contribution, checked against the round's
        public layout (:func:`~raflora.methods.private.private_shapes`). Its norm and clip scale
        stay with the client: the server sees only the pieces.
        """
        assert self._plan is not None
        ctx = self.fed.context(self._plan.round_index)
        rule = self.fed.aggregator.private_rule(ctx)
        if rule is None:  # refused with the config
            raise EngineError(f"privacy: {self.fed.aggregator.privacy_refusal()}")
        shapes = private_shapes(rule, self.state, self.fed.aggregator.r_max)
        pieces = decode_contribution(record, shapes, client_id=client_id, device=self.fed.device)
        return Contribution(pieces, math.nan, math.nan)

    def _check_client_state(self, result: ClientResult) -> None:
        """Check a reply's per-client state against the method's shapes, like an update's
        tensors (:func:`~raflora.methods.validation.validate_named`): it is kept on the server
        and sent back next time, so a malformed one must not be kept.
        """
        update = result.update
        assert self._plan is not None  # replies are checked within a round
        ctx = self.fed.context(self._plan.round_index).for_client(update.client_id, update.rank)
        expected = self.fed.aggregator.client_state_shapes(ctx, self.state)
        validate_named(
            update.client_id,
            "client state tensor",
            result.state or {},
            expected,
            {torch.float32, self.state.dtype, *self.fed.wire_dtypes},
            self.fed.device,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and aggregate the replies (:func:`complete_round`) and save the round.

        Returns no arrays (the global state is kept here, in :attr:`state`) and a
        :class:`MetricRecord` with the round's scalar metrics.
        """
        plan = self._plan
        if plan is None:
            raise RuntimeError("aggregate_train called before configure_train")
        results, failures = self.collect(replies)
        train_seconds = time.perf_counter() - self._round_start
        private = None
        if self.client_noise:
            private = {r.update.client_id: self._private[r.update.client_id] for r in results}
            if failures:
                # each client carried (z C)² / m of the noise: the missing shares are missing
                share = math.sqrt(len(results) / max(len(plan.clients), 1))
                log(
                    WARNING,
                    "Round %d: %d of %d noise shares arrived; the sums' noise std is %.3g z C",
                    plan.round_index,
                    len(results),
                    len(plan.clients),
                    share,
                )
        self.state, row, energy = complete_round(
            self.fed,
            self.state,
            plan,
            results,
            train_seconds=train_seconds,
            failures=failures,
            private=private,
        )
        if private is not None:  # what travelled up: the dense noised pieces, not factors
            row["upload_bytes"] = sum(
                8 * p.numel()
                for c in private.values()
                if isinstance(c, Contribution)
                for p in c.pieces.values()
            )
        # what the transport moved, beyond the method's algorithmic traffic (the merged base
        # weights of FLoRA and FedEx-LoRA, both factors where a method needs one …)
        row["transport_bytes"] = self._transport
        if self.run_dir is not None:
            wall = self.wall_before + time.perf_counter() - self._started
            record_round(self.fed, self.state, self.metrics, row, self.run_dir, wall, energy)
        else:
            self.metrics.append(row)
        if failures or row["rejected"]:
            log(WARNING, "Round %d left out: %s", plan.round_index, row["rejected_reasons"])
        if self.on_round is not None:
            self.on_round(row)
        self._plan = None
        scalars: dict[str, MetricRecordValues] = {
            k: v
            for k, v in row.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v  # drop NaN
        }
        return None, MetricRecord(scalars)

    # ------------------------------------------------------------------ no client-side eval
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No client-side evaluation: the server evaluates the global model, as locally."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def summary(self) -> None:
        """Log the method, clients and rank levels."""
        cfg = self.fed.config
        log(
            INFO,
            "RankStrategy: method=%s, %d clients (%d per round), rank levels %s",
            cfg.method,
            cfg.fl.num_clients,
            cfg.fl.clients_per_round,
            list(cfg.fl.rank_levels),
        )
