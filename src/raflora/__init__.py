"""raflora: federated LoRA fine-tuning with heterogeneous ranks.

The public API for one module — ``aggregate``, ``energy_spectrum``, ``higher_rank_energy`` — and
the aggregator registry for whole models (:mod:`raflora.methods`).
"""

from raflora.api import aggregate
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
    "__version__",
    "aggregate",
    "available_methods",
    "energy_report",
    "energy_spectrum",
    "get_aggregator",
    "higher_rank_energy",
]
