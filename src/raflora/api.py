"""The small public API for one module (what the docs show and other layers use)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from raflora.methods import RoundContext, available_methods, get_aggregator
from raflora.methods.registry import unsupported_reason
from raflora.methods.validation import (
    ClientUpdate,
    InvalidUpdateError,
    RankError,
    validate_update,
)

__all__ = ["RoundAggregate", "aggregate", "aggregate_round"]


@dataclass(frozen=True)
class RoundAggregate:
    """One module's aggregation (:func:`aggregate_round`).

    Attributes
    ----------
    B, A : Tensor
        The global factors (what :func:`aggregate` returns).
    residual : tuple[Tensor, Tensor] or None
        The factored residual the method merges into the base weights this round (FLoRA: the
        stack; FedEx-LoRA: ``Σ p_k B_k A_k − B_g A_g``), ``None`` for a method that merges none.
    """

    B: Tensor
    A: Tensor
    residual: tuple[Tensor, Tensor] | None


def aggregate(
    method: str,
    updates: Sequence[tuple[Tensor, Tensor, int]],
    *,
    rank_levels: Sequence[int],
    previous: tuple[Tensor, Tensor] | None = None,
    round_index: int = 1,
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """Aggregate one module's client updates with ``method``.

    Parameters
    ----------
    method : str
        A registered method (``raflora.methods.available_methods()``): ``fedit``, ``hetlora``,
        ``flora``, ``flexlora``, ``raflora``, ``rbla``, ``ffa``, ``rolora``, ``fedex`` ….
    updates : Sequence[tuple[Tensor, Tensor, int]]
        ``(B_k (d, r_k), A_k (r_k, n), n_k)`` effective factors (LoRA scaling folded into ``B``)
        and sample counts.
    rank_levels : Sequence[int]
        Configured rank levels ``r_1 < … < r_max``.
    previous : tuple[Tensor, Tensor], optional
        The previous global ``(B_g, A_g)``. raFLoRA, RBLA and FedEx-LoRA carry the indices no
        client reaches from it (without it they contribute nothing); FFA-LoRA and RoLoRA need it
        (the frozen factor).
    round_index : int
        The 1-based round (RoLoRA averages ``B`` in odd rounds, ``A`` in even ones).
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
    result = aggregate_round(
        method,
        updates,
        rank_levels=rank_levels,
        previous=previous,
        round_index=round_index,
        **options,
    )
    return result.B, result.A


def aggregate_round(
    method: str,
    updates: Sequence[tuple[Tensor, Tensor, int]],
    *,
    rank_levels: Sequence[int],
    previous: tuple[Tensor, Tensor] | None = None,
    round_index: int = 1,
    **options: Any,
) -> RoundAggregate:
    """:func:`aggregate`, also returning the factored base residual of the round.

    Same arguments as :func:`aggregate`. The module's global model after the round is
    ``W + B A`` on a base ``W`` into which ``residual`` was merged (``W ← W + B_res A_res``).

    Examples
    --------
    >>> import torch, raflora
    >>> g = torch.Generator().manual_seed(0)
    >>> ups = [(torch.randn(6, r, generator=g), torch.randn(r, 5, generator=g), 10) for r in (2, 4)]
    >>> out = raflora.aggregate_round("fedex", ups, rank_levels=[2, 4])
    >>> exact = sum(0.5 * B @ A for B, A, _ in ups)
    >>> B_res, A_res = out.residual
    >>> bool(torch.allclose(out.B @ out.A + B_res @ A_res, exact, atol=1e-5))
    True
    """
    if not updates:
        raise ValueError("aggregate needs at least one update")
    aggregator = get_aggregator(method, rank_levels, **options)
    # the same checks as a whole-model round (validate_update), with the update's index as id
    shapes = {"module": (int(updates[0][0].shape[0]), int(updates[0][1].shape[-1]))}
    levels_only = aggregator.capabilities.ranks_must_be_levels
    for i, (B, A, n_k) in enumerate(updates):
        rank = int(B.shape[-1]) if B.ndim else 0
        try:
            validate_update(
                ClientUpdate(i, rank, n_k, {"module": (B, A)}),
                shapes,
                allowed_ranks=aggregator.rank_levels if levels_only else None,
                max_rank=aggregator.r_max,
            )
        except RankError as err:
            mixed = [m for m in available_methods() if unsupported_reason(m, [1, 2]) is None]
            hint = f" (methods for heterogeneous ranks: {', '.join(mixed)})" if levels_only else ""
            raise ValueError(f"update {i}: {err.reason} for {method}{hint}") from None
        except InvalidUpdateError as err:
            raise ValueError(f"update {i}: {err.reason}") from None
    batch = [(B, A, int(n_k)) for B, A, n_k in updates]
    ctx = RoundContext(round_index=round_index, dtype=batch[0][0].dtype, device=batch[0][0].device)
    B, A = aggregator.aggregate_module(ctx, batch, previous)
    residual = aggregator.module_residual(ctx, batch, (B, A), previous)
    return RoundAggregate(B, A, residual)
