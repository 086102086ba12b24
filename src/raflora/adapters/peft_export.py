"""Export of effective factors as a standard PEFT LoRA adapter directory."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from peft import LoraConfig, PeftModel
from torch import Tensor, nn

from raflora.adapters.factors import PEFT_PREFIX

__all__ = [
    "export_peft_adapter",
]


def export_peft_adapter(
    base_model_or_peft: nn.Module | None,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    dense: Mapping[str, Tensor] | None,
    out_dir: str | os.PathLike[str],
    *,
    rank: int,
    target_modules: Sequence[str] | str | None = None,
    modules_to_save: Sequence[str] | None = None,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a standard PEFT LoRA adapter directory for the given effective factors.

    The adapter has ``r = lora_alpha = rank`` (scaling 1, no rsLoRA), so the saved
    ``lora_B.weight`` is ``B_eff[:, :rank]`` and ``lora_A.weight`` is ``A[:rank]``.
    ``PeftModel.from_pretrained(fresh_base_model, out_dir)`` then computes ``W + B_eff A`` on
    every module, like the in-memory model. No model copy is made.

    Parameters
    ----------
    base_model_or_peft : nn.Module | None
        The base model or the ``PeftModel``; used to check shapes and for
        ``base_model_name_or_path``. ``None`` skips the shape checks against a model (the
        factors' own consistency is still checked).
    factors : Mapping[str, tuple[Tensor, Tensor]]
        Canonical module name → effective ``(B (d, r'), A (r', n))`` with ``r' >= rank``.
    dense : Mapping[str, Tensor] | None
        ``modules_to_save`` tensors, canonical names (as :func:`get_dense` returns).
    out_dir : str | os.PathLike[str]
        Output directory (created).
    rank : int
        Rank of the exported adapter (factors are truncated to it).
    target_modules : Sequence[str] | str | None
        PEFT ``target_modules``; ``None`` uses the factors' module names.
    modules_to_save : Sequence[str] | None
        PEFT ``modules_to_save``; required when ``dense`` is non-empty (unless ``task_type``
        implies it, as ``"SEQ_CLS"`` does).
    task_type : str | None
        PEFT task type.
    base_model_name_or_path : str | None
        Recorded in ``adapter_config.json``; defaults to the model's ``name_or_path``.

    Returns
    -------
    Path
        ``out_dir``.
    """
    from safetensors.torch import save_file

    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not factors:
        raise ValueError("export_peft_adapter: no factors given")
    root: nn.Module | None = (
        base_model_or_peft.get_base_model()
        if isinstance(base_model_or_peft, PeftModel)
        else base_model_or_peft
    )
    tensors: dict[str, Tensor] = {}
    for name, (B, A) in factors.items():
        out_f = in_f = None
        if root is not None:
            try:
                module = root.get_submodule(name)
            except AttributeError as err:
                raise KeyError(f"export_peft_adapter: no module named {name!r}") from err
            out_f = getattr(module, "out_features", None)
            in_f = getattr(module, "in_features", None)
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"module {name!r}: B (d, r) and A (r, n) expected, got B {tuple(B.shape)} "
                f"and A {tuple(A.shape)}"
            )
        if (out_f is not None and B.shape[0] != out_f) or (in_f is not None and A.shape[1] != in_f):
            raise ValueError(
                f"module {name!r}: weight is ({out_f}, {in_f}), got B {tuple(B.shape)} and "
                f"A {tuple(A.shape)}"
            )
        if B.shape[1] < rank:
            raise ValueError(f"module {name!r}: factors have rank {B.shape[1]} < rank {rank}")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A[:rank].detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B[:, :rank].detach().cpu().contiguous()

    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        lora_dropout=0.0,
        target_modules=(
            sorted(factors)
            if target_modules is None
            else target_modules
            if isinstance(target_modules, str)
            else list(target_modules)
        ),
        modules_to_save=None if modules_to_save is None else list(modules_to_save),
        task_type=task_type,
        inference_mode=True,
        base_model_name_or_path=base_model_name_or_path
        or getattr(root, "name_or_path", None)
        or None,
    )
    if dense:
        # PEFT's task models add their heads at load time (SEQ_CLS: classifier, score).
        if not config.modules_to_save and task_type is None:
            raise ValueError(
                "export_peft_adapter: dense tensors given but no modules_to_save "
                "(pass modules_to_save or a task_type that implies it)"
            )
        for key, value in dense.items():
            tensors[f"{PEFT_PREFIX}{key}"] = value.detach().cpu().contiguous()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
