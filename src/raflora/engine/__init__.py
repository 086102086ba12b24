"""Engines: the round loop written once against the methods, tasks and adapters.

``local`` trains the sampled clients one after another in this process (deterministic,
checkpoint/resume); the Flower engine reuses :func:`~raflora.engine.federation.train_client`.
"""

from raflora.engine import seeds
from raflora.engine.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from raflora.engine.export import AdapterExport, adapter_factors, write_adapter
from raflora.engine.federation import (
    ClientResult,
    EngineError,
    Federation,
    build_federation,
    evaluate_global,
    learning_rate,
    train_client,
)
from raflora.engine.local import (
    CompletedRound,
    RoundPlan,
    RunResult,
    adapter_meta,
    complete_round,
    finish_run,
    plan_round,
    run_local,
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
