"""A method's private update and its aggregation from noised sums (client-level differential
privacy, DP-FedAvg: McMahan et al., ICLR 2018; docs/privacy.md).

A method declares what its clients' private update ``U_k`` is with one hook,
:meth:`~raflora.methods.Method.private_rule`, returning a :class:`PrivateRule`:

- **product space** (FlexLoRA, raFLoRA, FLoRA, ILoRA): per module
  ``Δ_k = B_k A_k − B_0 A_0`` with ``(B_0, A_0)`` what the client was sent (FLoRA's fresh init
  has ``B_0 = 0``, so its ``Δ_k = B_k A_k``). raFLoRA's ``U_k`` is the concatenation of its
  per-partition pieces ``Δ_k^(h) = B_k[:, l:h] A_k[l:h] − B_0[:, l:h] A_0[l:h]`` for every rank
  level ``h ≤ r_k``, so the joint norm bounds every partition's sum.
- **factor space** (FedIT, HetLoRA, RBLA, FFA-LoRA, RoLoRA, FedRot-LoRA): the zero-padded
  differences ``pad(B_k) − pad(B_0)`` / ``pad(A_k) − pad(A_0)`` of the factors the method
  averages (FFA-LoRA: ``B`` only; RoLoRA: the factor trained this round).
- **heads** (trained dense modules): their difference, always part of ``U_k``.

Each piece has a name (:func:`private_shapes`): ``P:<module>`` (product), ``P<h>:<module>``
(raFLoRA's partition ending at rank level ``h``), ``B:<module>`` / ``A:<module>`` (padded
factors), ``H:<head>``. The engine clips the whole ``U_k``, sums the pieces over the sampled
clients, adds the noise, and hands the noised sums back here.

**Data-independent weights** (sample counts and the sampled cohort are private): a sum is
divided by the expected number of its contributors, ``q N_j`` — ``q`` the sampling rate and
``N_j`` the clients *of the federation* that can contribute to it (ranks are public): ``N`` for a
module, a head or a zero-padded average (``1 / m`` under fixed sampling, ``1 / (q N)`` under
Poisson); the clients of rank ``≥ h`` for raFLoRA's partition ``h``; the clients of rank ``> j``
for RBLA's rank index ``j`` (:attr:`PrivateRule.per_index`). A piece no client of the federation
can reach gets weight 0 (and nothing of it changes). So every ``n_k`` weighting of the
non-private rules is dropped under privacy.

**Aggregation is post-processing** (:func:`private_mean`, :func:`aggregate_mean`): the noised
mean is added to what the clients started from — ``B_g A_g`` in product space (FLoRA: nothing,
its updates start from zero), the global factors in factor space — and the method's own rule is
applied to that one update (:meth:`~raflora.methods.Method.private_aggregate_module`: by default
:meth:`~raflora.methods.Method.aggregate_module` of a single update with ``n = 1``): FlexLoRA and
raFLoRA truncate its SVD to ``r_max``, ILoRA takes its QR, FLoRA merges it, the factor-space
methods keep it. Uncovered parts thereby carry their previous value (raFLoRA's and the
padding methods' carry). The product-space mean is a dense ``d × n`` matrix per module: its
noise is dense, so the release is too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from raflora.linalg import guarded_svd
from raflora.methods.state import AggregationResult, Factors, GlobalState
from raflora.methods.validation import ClientUpdate
from raflora.privacy.clipping import ClientUpdate as PrivateUpdate
from raflora.privacy.clipping import ProductDelta, padded_difference

if TYPE_CHECKING:
    from raflora.methods.base import Method
    from raflora.methods.context import RoundContext

__all__ = [
    "PrivateRule",
    "PrivateUpdate",
    "aggregate_mean",
    "private_mean",
    "private_shapes",
    "private_update",
    "private_weights",
]

PrivateSpace = Literal["product", "factor"]


@dataclass(frozen=True)
class PrivateRule:
    """What a method's private update is (module docstring).

    Attributes
    ----------
    space : {"product", "factor"}
        Where ``U_k`` lives and the noise goes.
    factors : frozenset of {"B", "A"}
        Factor space: the factors the method averages (their padded differences are ``U_k``).
    per_index : bool
        Factor space: divide rank index ``j``'s sum by ``q N_j`` (the clients of the
        federation reaching it: RBLA) instead of ``q N``.
    partitions : tuple of int
        Product space: the rank levels cutting ``Δ_k`` into partitions (raFLoRA); empty: one
        piece per module.
    cumulative : bool
        Product space: the new global product is ``B_g A_g`` plus the noised mean (``False``:
        the mean alone — FLoRA, whose previous updates are merged into the base).
    """

    space: PrivateSpace
    factors: frozenset[str] = frozenset({"B", "A"})
    per_index: bool = False
    partitions: tuple[int, ...] = ()
    cumulative: bool = True

    @classmethod
    def product(cls, *, partitions: Sequence[int] = (), cumulative: bool = True) -> PrivateRule:
        """A product-space rule (optionally per rank-level partition)."""
        return cls("product", partitions=tuple(int(h) for h in partitions), cumulative=cumulative)

    @classmethod
    def factor(cls, factors: str = "BA", *, per_index: bool = False) -> PrivateRule:
        """A factor-space rule over ``factors`` (``"BA"``, ``"B"`` or ``"A"``)."""
        chosen = frozenset(factors)
        if not chosen or not chosen <= {"B", "A"}:
            raise ValueError(f"factors must be 'B', 'A' or 'BA', got {factors!r}")
        return cls("factor", factors=chosen, per_index=per_index)

    def bounds(self) -> list[tuple[int, int]]:
        """0-based ``[l, h)`` column ranges of the partitions."""
        out, prev = [], 0
        for h in self.partitions:
            out.append((prev, h))
            prev = h
        return out


def private_shapes(rule: PrivateRule, state: GlobalState, r_max: int) -> dict[str, tuple[int, ...]]:
    """Name → shape of every piece of ``U_k`` any client may send: the public layout the sums
    (and their noise) take, whoever was sampled.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for m in sorted(state.module_shapes):
        d, n = state.module_shapes[m]
        if rule.space == "product":
            if rule.partitions:
                for h in rule.partitions:
                    shapes[f"P{h}:{m}"] = (d, n)
            else:
                shapes[f"P:{m}"] = (d, n)
        else:
            if "B" in rule.factors:
                shapes[f"B:{m}"] = (d, r_max)
            if "A" in rule.factors:
                shapes[f"A:{m}"] = (r_max, n)
    for name in sorted(state.dense):
        shapes[f"H:{name}"] = tuple(state.dense[name].shape)
    return shapes


def private_update(
    rule: PrivateRule,
    sent: Factors,
    update: ClientUpdate,
    state: GlobalState,
    r_max: int,
) -> PrivateUpdate:
    """Client ``update``'s ``U_k`` (unclipped), from the factors it was ``sent``.

    No ``d × n`` matrix is formed: product pieces stay :class:`ProductDelta` factors (their
    norms come from Gram matrices, :mod:`raflora.privacy.clipping`).
    """
    out = PrivateUpdate()
    for m, (B, A) in update.factors.items():
        B0, A0 = sent[m]
        if rule.space == "product":
            if rule.partitions:
                rank = B.shape[-1]
                for l, h in rule.bounds():
                    if h <= rank:  # partition h is the client's when r_k ≥ h
                        out.product[f"P{h}:{m}"] = ProductDelta(
                            B[:, l:h], A[l:h, :], B0[:, l:h], A0[l:h, :]
                        )
            else:
                out.product[f"P:{m}"] = ProductDelta(B, A, B0, A0)
            continue
        if "B" in rule.factors:
            out.factors[f"B:{m}"] = padded_difference(B.double(), B0.double(), r_max, -1)
        if "A" in rule.factors:
            out.factors[f"A:{m}"] = padded_difference(A.double(), A0.double(), r_max, -2)
    for name, head in update.dense.items():
        out.dense[f"H:{name}"] = head.double() - state.dense[name].double()
    return out


def private_weights(
    rule: PrivateRule,
    shapes: Mapping[str, tuple[int, ...]],
    client_ranks: Sequence[int],
    sample_rate: float,
) -> dict[str, Tensor]:
    """Name → the data-independent weight ``1 / (q N_j)`` of each sum (module docstring):
    a scalar tensor, or one weight per rank index ``(r_max,)`` under :attr:`PrivateRule.per_index`.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    ranks = torch.tensor([int(r) for r in client_ranks], dtype=torch.int64)

    def inverse(count: Tensor) -> Tensor:
        counted = count.double()
        return torch.where(counted > 0, 1.0 / (sample_rate * counted.clamp_min(1)), 0.0)

    out: dict[str, Tensor] = {}
    everyone = inverse(torch.tensor(len(client_ranks)))
    for key, shape in shapes.items():
        kind = key.split(":", 1)[0]
        if kind.startswith("P") and kind != "P":
            out[key] = inverse((ranks >= int(kind[1:])).sum())
        elif kind in ("B", "A") and rule.per_index:
            r_max = shape[-1] if kind == "B" else shape[-2]
            index = torch.arange(r_max)
            out[key] = inverse((ranks[:, None] > index[None, :]).sum(dim=0))
        else:
            out[key] = everyone
    return out


def _weighted(total: Tensor, weight: Tensor, key: str) -> Tensor:
    if weight.dim() == 0:
        return total * weight
    return total * (weight[None, :] if key.startswith("B:") else weight[:, None])


def private_mean(
    rule: PrivateRule,
    state: GlobalState,
    sums: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
) -> tuple[Factors, dict[str, Tensor]]:
    """The one update the method's rule is applied to: what the clients started from plus the
    weighted noised sums (float64 inside, the state's dtype out).

    Product space: per module the dense ``(B_g A_g) + Σ_pieces w S`` (without ``B_g A_g`` when
    not :attr:`PrivateRule.cumulative`), returned as its thin-SVD factors ``(U Σ, Vᵀ)`` of rank
    ``min(d, n)`` (exact). Factor space: ``B_g + w S_B`` and ``A_g + w S_A`` at ``r_max`` (a
    factor the rule does not average stays ``B_g`` / ``A_g``). Heads: ``h_g + w S_h``.
    """
    dtype = state.dtype
    factors: Factors = {}
    for m in sorted(state.module_shapes):
        B_g, A_g = state.factors[m]
        if rule.space == "product":
            pieces = [k for k in sums if k.endswith(f":{m}") and k.startswith("P")]
            if rule.cumulative:
                dense = B_g.double() @ A_g.double()
            else:
                d, n = state.module_shapes[m]
                dense = torch.zeros(d, n, dtype=torch.float64, device=B_g.device)
            for key in sorted(pieces):
                dense = dense + _weighted(sums[key].double(), weights[key], key).to(dense.device)
            U, S, Vh = guarded_svd(dense)
            factors[m] = ((U * S[None, :]).to(dtype), Vh.to(dtype))
            continue
        B, A = B_g.double(), A_g.double()
        if f"B:{m}" in sums:
            B = B + _weighted(sums[f"B:{m}"].double(), weights[f"B:{m}"], "B:").to(B.device)
        if f"A:{m}" in sums:
            A = A + _weighted(sums[f"A:{m}"].double(), weights[f"A:{m}"], "A:").to(A.device)
        factors[m] = (B.to(dtype), A.to(dtype))
    dense_heads = {
        name: (
            head.double() + (sums[f"H:{name}"].double() * weights[f"H:{name}"]).to(head.device)
        ).to(head.dtype)
        for name, head in state.dense.items()
    }
    return factors, dense_heads


def aggregate_mean(
    method: Method,
    ctx: RoundContext,
    state: GlobalState,
    mean: Factors,
    dense: Mapping[str, Tensor],
    contributors: Sequence[int] = (),
) -> AggregationResult:
    """The next global state from the noised mean (:func:`private_mean`): the method's rule
    applied to it as to one update (:meth:`~raflora.methods.Method.private_aggregate_module` per
    group of same-shape modules, :meth:`~raflora.methods.Method.module_residual`,
    :meth:`~raflora.methods.Method.finish_state` with that one update: ``client_id = -1``,
    ``rank = r_max``, ``num_samples = 1``).

    ``contributors`` are the ids of the clients whose updates went into the sums (reported as
    ``accepted``). The state advances a round even with none: the noise alone was released.
    """
    groups: dict[tuple[int, int], list[str]] = {}
    for name in sorted(state.module_shapes):
        groups.setdefault(state.module_shapes[name], []).append(name)
    factors: Factors = {}
    residual: Factors = {}
    for names in groups.values():
        B = torch.stack([mean[m][0] for m in names])
        A = torch.stack([mean[m][1] for m in names])
        previous = (
            torch.stack([state.factors[m][0] for m in names]),
            torch.stack([state.factors[m][1] for m in names]),
        )
        new = method.private_aggregate_module(ctx, (B, A), previous)
        res = method.module_residual(ctx, [(B, A, 1)], new, previous)
        for i, m in enumerate(names):
            factors[m] = (new[0][i], new[1][i])
            if res is not None:
                residual[m] = (res[0][i], res[1][i])
    new_state = replace(state, factors=factors, dense=dict(dense), round=state.round + 1)
    merged = residual if residual else None
    if merged is not None:
        new_state = method.with_residual(new_state, merged)
    pseudo = ClientUpdate(client_id=-1, rank=method.r_max, num_samples=1, factors=mean)
    new_state = method.finish_state(ctx, state, new_state, [pseudo])
    return AggregationResult(new_state, tuple(contributors), {}, residual=merged)
