"""Loading a frozen base in 4 or 8 bits (``task.quantization``; QLoRA, docs/quantization.md).

The tasks whose base model comes from ``from_pretrained`` pass :func:`pretrained_kwargs` to it:
transformers' ``BitsAndBytesConfig`` then replaces the linear layers by bitsandbytes'
``Linear4bit`` (``nf4``, ``fp4``) or ``Linear8bitLt`` (``int8``) as it loads the weights; PEFT
later puts the LoRA adapters over those layers, as QLoRA does. No quantiser is written here: the
weights are quantised by transformers' bitsandbytes integration, and the ``digits`` task, which
pretrains its ViT in-process, reloads its saved model through the same route.

What is not quantised: the heads (``classifier``, ``score``, ``lm_head``: trained in full or
tied to the embeddings), and every non-linear module (embeddings, norms); they stay in the run's
``dtype``, as do the LoRA factors. The 4-bit layers compute in the run's ``dtype``
(``bnb_4bit_compute_dtype``). bitsandbytes (≥ 0.50) runs these layers on the CPU as well as on
CUDA; the model is loaded on the run's device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raflora.tasks.base import TaskError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

    from raflora.config import RunConfig

__all__ = [
    "HEAD_MODULES",
    "QUANTIZATIONS",
    "bnb_config",
    "load_device",
    "one_cpu_path",
    "pretrained_kwargs",
]

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
"""The values of ``task.quantization``."""

HEAD_MODULES = ("classifier", "score", "lm_head")
"""Modules never quantised: the new heads (trained in full, FedAvg-aggregated) and the LM head
(tied to the input embeddings in small models; transformers keeps it in full precision too)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bnb_config(
    quantization: str,
    compute_dtype: torch.dtype = torch.float32,
    skip_modules: tuple[str, ...] = HEAD_MODULES,
) -> BitsAndBytesConfig | None:
    """The ``BitsAndBytesConfig`` (transformers) for ``quantization`` (``None`` for ``"none"``).

    Parameters
    ----------
    quantization : str
        ``"none"``, ``"nf4"``, ``"fp4"`` or ``"int8"``.
    compute_dtype : torch.dtype
        The dtype 4-bit layers compute in (the run's ``dtype``).
    skip_modules : tuple of str
        Module names kept unquantised.

    Raises
    ------
    TaskError
        An unknown value, or bitsandbytes is not installed.
    """
    if quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise TaskError(
            f"task.quantization: expected one of {', '.join(QUANTIZATIONS)}, got {quantization!r}"
        )
    try:
        import bitsandbytes  # noqa: F401  (transformers checks it too, with a longer message)
    except ImportError:
        raise TaskError(
            f"task.quantization {quantization!r} needs the 'bitsandbytes' package; "
            "pip install 'raflora[quantization]'"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_8bit=True, llm_int8_skip_modules=list(skip_modules)
        )
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(skip_modules),
    )


def one_cpu_path(model: nn.Module) -> nn.Module:
    """Keep every 4-bit layer of ``model`` on one computation path on the CPU; returns it.

    bitsandbytes 0.50 repacks a ``Linear4bit``'s weight in place for an AVX512-BF16 kernel the
    first time it runs in evaluation mode on such a CPU; the repacked layer then fails in
    training (an in-place bias add on an autograd view) and computes evaluation differently
    from training. With the switch off, training and evaluation both dequantise and multiply
    in the compute dtype, on every CPU alike.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010
    return model


def load_device(config: RunConfig) -> str:
    """Where a quantised base is loaded: the run's device (``auto``: CUDA when available).

    A bitsandbytes model is not cast afterwards (transformers forbids a dtype cast), so it is
    loaded where it runs; the engine then moves only what is not already there.
    """
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(config.device)


def pretrained_kwargs(
    config: RunConfig, skip_modules: tuple[str, ...] = HEAD_MODULES
) -> dict[str, Any]:
    """Extra ``from_pretrained`` keywords of ``config.task.quantization``: none for ``"none"``
    (the float32 path is untouched); else the ``BitsAndBytesConfig``, the run's ``dtype`` for
    the modules left unquantised, and the device to load on (:func:`load_device`).
    """
    dtype = _DTYPES[config.dtype]
    quant = bnb_config(config.task.quantization, dtype, skip_modules)
    if quant is None:
        return {}
    return {"quantization_config": quant, "dtype": dtype, "device_map": load_device(config)}
