"""The methods: one module per method (server and client halves) behind :class:`Method` and a name registry."""

from raflora.methods.base import (
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
from raflora.methods.fedit import FedIT
from raflora.methods.flexlora import FlexLoRA
from raflora.methods.flora import FLoRA
from raflora.methods.hetlora import HetLoRA, HetLoRAOptions
from raflora.methods.options import MethodOptions, OptionsError
from raflora.methods.raflora import (
    RaFLoRA,
    RaFLoRAOptions,
    partition_bounds,
    partition_weights,
)
from raflora.methods.validation import (
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
