"""Engines: the round loop written once against the methods, tasks and adapters.

``local`` trains the sampled clients one after another in this process (deterministic,
checkpoint/resume); the Flower engine reuses :func:`~raflora.engine.client_round.train_client`
and the server round of :mod:`raflora.engine.server_round`.
"""

from raflora.engine import seeds
from raflora.engine.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from raflora.engine.client_round import ClientResult, train_client
from raflora.engine.evaluation import evaluate_global
from raflora.engine.export import AdapterExport, adapter_factors, write_adapter
from raflora.engine.federation import EngineError, Federation, build_federation, learning_rate
from raflora.engine.local import run_local
from raflora.engine.run_files import RunResult, adapter_meta, finish_run
from raflora.engine.server_round import (
    CompletedRound,
    RoundPlan,
    complete_round,
    plan_round,
    run_round,
)

__all__ = [
    "AdapterExport",
    "Checkpoint",
    "CheckpointError",
    "ClientResult",
    "CompletedRound",
    "EngineError",
    "Federation",
    "RoundPlan",
    "RunResult",
    "adapter_factors",
    "adapter_meta",
    "build_federation",
    "complete_round",
    "evaluate_global",
    "finish_run",
    "learning_rate",
    "load_checkpoint",
    "plan_round",
    "run_local",
    "run_round",
    "seeds",
    "train_client",
    "write_adapter",
]
