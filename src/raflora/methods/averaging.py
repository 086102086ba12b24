"""FedAvg's sample weights and weighted average (``p_k = n_k / Σ_j n_j``, paper Eq. 2 with
sample weights; docs/methods.md#aggregation-rules), shared by the methods' server rules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["sample_weights", "weighted_average"]


def sample_weights(samples: Sequence[int], *, like: Tensor) -> Tensor:
    """``p_k = n_k / Σ_j n_j`` as a 1-D tensor on ``like``'s device (float64 for accuracy)."""
    n = torch.tensor([float(s) for s in samples], dtype=torch.float64, device=like.device)
    return n / n.sum()


def weighted_average(tensors: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``Σ_k w_k T_k`` for equally shaped tensors (FedAvg; weights are used as given)."""
    out = torch.zeros_like(tensors[0], dtype=torch.promote_types(tensors[0].dtype, torch.float32))
    for w, t in zip(weights.tolist(), tensors, strict=True):
        out.add_(t.to(out.dtype), alpha=w)
    return out.to(tensors[0].dtype)
