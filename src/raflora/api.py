"""The small public API for one module (what the docs show and other layers use)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from raflora.methods import get_aggregator
from raflora.methods.validation import (
    ClientUpdate,
    InvalidUpdateError,
    RankError,
    validate_update,
)

__all__ = ["aggregate"]


def aggregate(
    method: str,
    updates: Sequence[tuple[Tensor, Tensor, int]],
    *,
    rank_levels: Sequence[int],
    previous: tuple[Tensor, Tensor] | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """Aggregate one module's client updates with ``method``.

    Parameters
    ----------
    method : str
        ``fedit``, ``hetlora``, ``flora``, ``flexlora`` or ``raflora``.
    updates : Sequence[tuple[Tensor, Tensor, int]]
        ``(B_k (d, r_k), A_k (r_k, n), n_k)`` effective factors (LoRA scaling folded into ``B``)
        and sample counts.
    rank_levels : Sequence[int]
        Configured rank levels ``r_1 < … < r_max``.
    previous : tuple[Tensor, Tensor], optional
        The previous global ``(B_g, A_g)``. raFLoRA carries empty partitions from it; without
        it an empty partition contributes nothing (there is nothing to carry).
    **options
        Method options (``weighting``, ``empty_partition`` …).

    Returns
    -------
    tuple[Tensor, Tensor]
        ``B (d, r_max)``, ``A (r_max, n)`` for fedit/hetlora/flexlora/raflora; the stacked
        ``(d, Σ r_k)``, ``(Σ r_k, n)`` update for flora.

    Examples
    --------
    >>> import torch, raflora
    >>> g = torch.Generator().manual_seed(0)
    >>> ups = [(torch.randn(6, r, generator=g), torch.randn(r, 5, generator=g), 10) for r in (2, 4)]
    >>> B, A = raflora.aggregate("raflora", ups, rank_levels=[2, 4])
    >>> tuple(B.shape), tuple(A.shape)
    ((6, 4), (4, 5))
    """
    if not updates:
        raise ValueError("aggregate needs at least one update")
    aggregator = get_aggregator(method, rank_levels, **options)
    # the same checks as a whole-model round (validate_update), with the update's index as id
    shapes = {"module": (int(updates[0][0].shape[0]), int(updates[0][1].shape[-1]))}
    for i, (B, A, n_k) in enumerate(updates):
        rank = int(B.shape[-1]) if B.ndim else 0
        try:
            validate_update(
                ClientUpdate(i, rank, n_k, {"module": (B, A)}),
                shapes,
                allowed_ranks=aggregator.rank_levels if aggregator.ranks_must_be_levels else None,
                max_rank=aggregator.r_max,
            )
        except RankError as err:
            hint = (
                " (methods for heterogeneous ranks: hetlora, flora, flexlora, raflora)"
                if aggregator.ranks_must_be_levels
                else ""
            )
            raise ValueError(f"update {i}: {err.reason} for {method}{hint}") from None
        except InvalidUpdateError as err:
            raise ValueError(f"update {i}: {err.reason}") from None
    return aggregator.aggregate_module([(B, A, int(n_k)) for B, A, n_k in updates], previous)
