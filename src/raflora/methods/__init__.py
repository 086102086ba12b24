"""The methods: one module per method (server and client halves) behind :class:`Method`, and
a name registry.

A method registers itself when its module is imported (:func:`register`); :data:`METHOD_MODULES`
is the registry's list of modules, one line per method. Writing a method: ``examples/README.md``
(the hooks table) and ``examples/custom_method.py``.
"""

import importlib

from raflora.methods.averaging import sample_weights, weighted_average
from raflora.methods.base import Aggregator, ClientRound, Method, ModuleUpdates
from raflora.methods.context import Capabilities, RoundContext
from raflora.methods.fedit import FedIT
from raflora.methods.flexlora import FlexLoRA
from raflora.methods.flora import FLoRA
from raflora.methods.hetlora import HetLoRA, HetLoRAOptions
from raflora.methods.options import MethodOptions, OptionsError, option
from raflora.methods.raflora import (
    RaFLoRA,
    RaFLoRAOptions,
    partition_bounds,
    partition_weights,
)
from raflora.methods.registry import (
    available_methods,
    get_aggregator,
    options_for,
    register,
    resolve_method_options,
)
from raflora.methods.state import (
    AggregationResult,
    ClientMessage,
    ClientUpload,
    FactorAggregation,
    Factors,
    GlobalState,
    lora_a_init,
    map_tensors,
    tensor_bytes,
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
    "METHOD_MODULES",
    "AggregationResult",
    "Aggregator",
    "BadSampleCountError",
    "Capabilities",
    "ClientMessage",
    "ClientRound",
    "ClientUpdate",
    "ClientUpload",
    "DTypeError",
    "DeviceMismatchError",
    "FLoRA",
    "FactorAggregation",
    "Factors",
    "FedIT",
    "FlexLoRA",
    "GlobalState",
    "HetLoRA",
    "HetLoRAOptions",
    "InvalidUpdateError",
    "Method",
    "MethodOptions",
    "ModuleSetError",
    "ModuleUpdates",
    "NonFiniteUpdateError",
    "OptionsError",
    "RaFLoRA",
    "RaFLoRAOptions",
    "RankError",
    "RoundContext",
    "ShapeMismatchError",
    "available_methods",
    "get_aggregator",
    "lora_a_init",
    "map_tensors",
    "option",
    "options_for",
    "partition_bounds",
    "partition_weights",
    "register",
    "resolve_method_options",
    "sample_weights",
    "tensor_bytes",
    "validate_update",
    "weighted_average",
]

METHOD_MODULES = (
    "fedit",
    "hetlora",
    "flora",
    "flexlora",
    "raflora",
    "rbla",
    "ffa",
    "fedex",
    "rolora",
    "fedrot",
    "lora_fair",
    "ilora",
    "fedhl",
    "haflq",
    "aflora",
)
"""The modules of the built-in methods (importing one registers its method)."""

for _module in METHOD_MODULES:
    importlib.import_module(f"{__name__}.{_module}")
