"""Aggregation rules, one module per method, behind :class:`Aggregator` and a name registry."""

from raflora.aggregators.base import (
    AggregationResult,
    Aggregator,
    Factors,
    GlobalState,
    available_methods,
    get_aggregator,
    lora_a_init,
    register,
    sample_weights,
    weighted_average,
)
from raflora.aggregators.fedit import FedIT
from raflora.aggregators.flexlora import FlexLoRA
from raflora.aggregators.flora import FLoRA
from raflora.aggregators.hetlora import HetLoRA
from raflora.aggregators.raflora import RaFLoRA, partition_bounds, partition_weights
from raflora.aggregators.validation import (
    BadSampleCountError,
    ClientUpdate,
    InvalidUpdateError,
    ModuleSetError,
    NonFiniteUpdateError,
    RankError,
    ShapeMismatchError,
    validate_update,
)

__all__ = [
    "AggregationResult",
    "Aggregator",
    "BadSampleCountError",
    "ClientUpdate",
    "FLoRA",
    "Factors",
    "FedIT",
    "FlexLoRA",
    "GlobalState",
    "HetLoRA",
    "InvalidUpdateError",
    "ModuleSetError",
    "NonFiniteUpdateError",
    "RaFLoRA",
    "RankError",
    "ShapeMismatchError",
    "available_methods",
    "get_aggregator",
    "lora_a_init",
    "partition_bounds",
    "partition_weights",
    "register",
    "sample_weights",
    "validate_update",
    "weighted_average",
]
