"""Aggregation rules, one module per method, behind :class:`Aggregator` and a name registry."""

from raflora.aggregators.base import (
    AggregationResult,
    Aggregator,
    Factors,
    GlobalState,
    available_methods,
    get_aggregator,
    lora_a_init,
    options_for,
    register,
    resolve_method_options,
    sample_weights,
    weighted_average,
)
from raflora.aggregators.fedit import FedIT
from raflora.aggregators.flexlora import FlexLoRA
from raflora.aggregators.flora import FLoRA
from raflora.aggregators.hetlora import HetLoRA, HetLoRAOptions
from raflora.aggregators.options import MethodOptions, OptionsError
from raflora.aggregators.raflora import (
    RaFLoRA,
    RaFLoRAOptions,
    partition_bounds,
    partition_weights,
)
from raflora.aggregators.validation import (
    BadSampleCountError,
    ClientUpdate,
    DeviceMismatchError,
    DTypeError,
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
    "DTypeError",
    "DeviceMismatchError",
    "FLoRA",
    "Factors",
    "FedIT",
    "FlexLoRA",
    "GlobalState",
    "HetLoRA",
    "HetLoRAOptions",
    "InvalidUpdateError",
    "MethodOptions",
    "ModuleSetError",
    "NonFiniteUpdateError",
    "OptionsError",
    "RaFLoRA",
    "RaFLoRAOptions",
    "RankError",
    "ShapeMismatchError",
    "available_methods",
    "get_aggregator",
    "lora_a_init",
    "options_for",
    "partition_bounds",
    "partition_weights",
    "register",
    "resolve_method_options",
    "sample_weights",
    "validate_update",
    "weighted_average",
]
