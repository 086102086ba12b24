"""Engines: the round loop written once against the aggregators, tasks and adapters.

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
from raflora.engine.local import RunResult, run_local, run_round

__all__ = [
    "AdapterExport",
    "Checkpoint",
    "CheckpointError",
    "ClientResult",
    "EngineError",
    "Federation",
    "RunResult",
    "adapter_factors",
    "build_federation",
    "evaluate_global",
    "learning_rate",
    "load_checkpoint",
    "run_local",
    "run_round",
    "seeds",
    "train_client",
    "write_adapter",
]
