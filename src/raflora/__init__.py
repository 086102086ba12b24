"""raflora: federated LoRA fine-tuning with heterogeneous ranks.

The public API for one module — ``aggregate``, ``aggregate_round``, ``energy_spectrum``,
``higher_rank_energy`` — and the method registry for whole models (:mod:`raflora.methods`).
"""

from raflora import _muted_logs  # noqa: F401  (first: before anything imports PEFT)
from raflora.api import RoundAggregate, aggregate, aggregate_round
from raflora.diagnostics import energy_report, energy_spectrum, higher_rank_energy
from raflora.methods import (
    AggregationResult,
    Aggregator,
    ClientUpdate,
    GlobalState,
    InvalidUpdateError,
    available_methods,
    get_aggregator,
)

__version__ = "0.1.0"

__all__ = [
    "AggregationResult",
    "Aggregator",
    "ClientUpdate",
    "GlobalState",
    "InvalidUpdateError",
    "RoundAggregate",
    "__version__",
    "aggregate",
    "aggregate_round",
    "available_methods",
    "energy_report",
    "energy_spectrum",
    "get_aggregator",
    "higher_rank_energy",
]
