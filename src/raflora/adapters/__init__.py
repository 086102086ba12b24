"""The bridge between PEFT LoRA modules and effective factors.

The LoRA convention: docs/methods.md#notation-and-the-lora-convention.

One base model lives in memory; every client rank ``r`` gets its own PEFT adapter named
``f"r{r}"`` on that same model (created lazily, swapped in with ``set_adapter``), so no per-client
model copies are made. Outside this package, factors are *effective*: the LoRA scaling is folded
into ``B`` (``B_eff = s · lora_B.weight`` with ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)``
under rsLoRA), so ``ΔW = B_eff A`` whatever ``lora_alpha`` the adapters were built with.

Module names are *canonical*: the model's own module path, without PEFT's ``base_model.model.``
prefix and without adapter names (``vit.layers.0.attention.q_proj``). Dense tensors of
``modules_to_save`` heads are keyed by the canonical module name plus the parameter name
(``classifier.weight``), the same keys PEFT writes to ``adapter_model.safetensors`` (behind
``base_model.model.``).

Only ``nn.Linear``-style LoRA layers (``peft.tuners.lora.Linear``) are supported.

Submodules: :mod:`~raflora.adapters.factors` (effective factors, LoRA scaling),
:mod:`~raflora.adapters.heads` (``modules_to_save`` tensors, trainable parameters),
:mod:`~raflora.adapters.merge` (base weights, FLoRA merge), :mod:`~raflora.adapters.bank`
(:class:`AdapterBank`, :func:`wrap_model`). Writing a PEFT adapter directory
(:func:`~raflora.engine.export.export_peft_adapter`) is in :mod:`raflora.engine.export`, the one
place for export.
"""

from raflora.adapters.bank import AdapterBank, wrap_model
from raflora.adapters.bank import Alpha as Alpha
from raflora.adapters.factors import (
    PEFT_PREFIX,
    adapter_name,
    get_factors,
    live_factors,
    lora_parameters,
    lora_scaling,
    module_shapes,
    scaling_for,
    set_factors,
)
from raflora.adapters.heads import get_dense, set_dense, trainable_parameters
from raflora.adapters.merge import (
    base_weights,
    load_base_weights,
    merge_into_base,
    set_merged_base,
)

__all__ = [
    "PEFT_PREFIX",
    "AdapterBank",
    "adapter_name",
    "base_weights",
    "get_dense",
    "get_factors",
    "live_factors",
    "load_base_weights",
    "lora_parameters",
    "lora_scaling",
    "merge_into_base",
    "module_shapes",
    "scaling_for",
    "set_dense",
    "set_factors",
    "set_merged_base",
    "trainable_parameters",
    "wrap_model",
]
