"""Validation of client updates before aggregation (named errors that say which client and what).

A client update is rejected when a factor's shape does not match its module and the client's
declared rank, a tensor has a dtype the server does not accept or lives on another device than the
server state, a value is not finite, a module is missing or unknown, or its sample count is not a
positive integer. Aggregators call :func:`validate_update` on every reply and aggregate the rest.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "BadSampleCountError",
    "ClientUpdate",
    "DTypeError",
    "DeviceMismatchError",
    "InvalidUpdateError",
    "ModuleSetError",
    "NonFiniteUpdateError",
    "RankError",
    "ShapeMismatchError",
    "is_positive_int",
    "validate_named",
    "validate_update",
]


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after local training.

    Attributes
    ----------
    client_id : int
        The client's index in ``0 … K-1``.
    rank : int
        The client's declared LoRA rank ``r_k``.
    num_samples : int
        ``n_k``, the number of local training samples (aggregation weight).
    factors : Mapping[str, tuple[Tensor, Tensor]]
        Module name → effective factors ``(B_k (d, r_k), A_k (r_k, n))`` with the LoRA scaling
        folded into ``B`` (docs/methods.md#notation-and-the-lora-convention), so that the
        module's update is ``B_k A_k``.
    dense : Mapping[str, Tensor]
        Fully trained parameters (a new classification head …), FedAvg-aggregated by every method.
    extras : Mapping[str, Tensor]
        The method's named extra tensors (ILoRA's control-variate change …); empty for most.
    """

    client_id: int
    rank: int
    num_samples: int
    factors: Mapping[str, tuple[Tensor, Tensor]]
    dense: Mapping[str, Tensor] = field(default_factory=dict)
    extras: Mapping[str, Tensor] = field(default_factory=dict)


class InvalidUpdateError(ValueError):
    """A client update that cannot be aggregated; ``client_id`` and ``reason`` say which and why."""

    def __init__(self, client_id: int, reason: str) -> None:
        self.client_id = client_id
        self.reason = reason
        super().__init__(f"client {client_id}: {reason}")


class ShapeMismatchError(InvalidUpdateError):
    """A factor's shape does not match the module and the client's declared rank."""


class NonFiniteUpdateError(InvalidUpdateError):
    """A factor or dense tensor holds NaN or ±inf."""


class BadSampleCountError(InvalidUpdateError):
    """The sample count is not a positive integer."""


class ModuleSetError(InvalidUpdateError):
    """Modules are missing from the update, or it names modules the model does not have."""


class RankError(InvalidUpdateError):
    """The declared rank is not one this aggregator accepts."""


class DTypeError(InvalidUpdateError):
    """A tensor's dtype is not one the server accepts (float32 or the run's model dtype)."""


class DeviceMismatchError(InvalidUpdateError):
    """A tensor lives on another device than the server's state."""


def is_positive_int(value: object) -> bool:
    """A positive integer (Python or numpy; ``bool`` excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0


def _check_module_set(
    client_id: int, kind: str, got: Collection[str], expected: Collection[str]
) -> None:
    missing = sorted(set(expected) - set(got))
    unknown = sorted(set(got) - set(expected))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(
                f"missing {kind} {', '.join(missing[:5])}" + (" …" if len(missing) > 5 else "")
            )
        if unknown:
            parts.append(
                f"unknown {kind} {', '.join(unknown[:5])}" + (" …" if len(unknown) > 5 else "")
            )
        raise ModuleSetError(client_id, "; ".join(parts))


def _check_tensor(
    client_id: int,
    what: str,
    tensor: Tensor,
    dtypes: Collection[torch.dtype] | None,
    device: torch.device | None,
) -> None:
    """A tensor of an accepted dtype, on the server's device, with finite values only."""
    if not torch.is_tensor(tensor):
        raise InvalidUpdateError(client_id, f"{what} is {type(tensor).__name__}, not a tensor")
    if dtypes is not None and tensor.dtype not in dtypes:
        accepted = ", ".join(sorted(_dtype_name(d) for d in set(dtypes)))
        raise DTypeError(
            client_id, f"{what} has dtype {_dtype_name(tensor.dtype)}; accepted: {accepted}"
        )
    if device is not None and tensor.device != device:
        raise DeviceMismatchError(
            client_id, f"{what} is on device {tensor.device}, the server state on {device}"
        )
    if device is not None and device.type == "meta":
        return  # no values to check (tests of device placement)
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteUpdateError(client_id, f"{what} has {bad} non-finite value(s)")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def validate_update(
    update: ClientUpdate,
    module_shapes: Mapping[str, tuple[int, int]],
    *,
    dense_shapes: Mapping[str, tuple[int, ...]] | None = None,
    allowed_ranks: Collection[int] | None = None,
    max_rank: int | None = None,
    dtypes: Collection[torch.dtype] | None = None,
    device: torch.device | None = None,
    extra_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Raise an :class:`InvalidUpdateError` subclass if ``update`` cannot be aggregated.

    Parameters
    ----------
    update : ClientUpdate
        The client's reply.
    module_shapes : Mapping[str, tuple[int, int]]
        Module name → ``(d, n)`` = (out_features, in_features) of the adapted weight.
    dense_shapes : Mapping[str, tuple[int, ...]], optional
        Name → shape of every fully trained tensor the update must carry (none when omitted).
    allowed_ranks : Collection[int], optional
        Ranks the aggregator accepts (raFLoRA: the configured rank levels).
    max_rank : int, optional
        Largest acceptable rank (the server's ``r_max``).
    dtypes : Collection[torch.dtype], optional
        Accepted tensor dtypes (the server state's and the run's model dtype); any other one
        (an integer tensor, float16 in a bfloat16 run …) is a :class:`DTypeError`.
    device : torch.device, optional
        Where every tensor must be (the server state's device): else a
        :class:`DeviceMismatchError`.
    extra_shapes : Mapping[str, tuple[int, ...]], optional
        Name → shape of every extra tensor the method expects (none when omitted); checked
        like the heads.
    """
    cid = update.client_id
    n_k = update.num_samples
    if not is_positive_int(n_k):
        raise BadSampleCountError(cid, f"sample count must be a positive integer, got {n_k!r}")
    r = update.rank
    if not is_positive_int(r):
        raise RankError(cid, f"rank must be a positive integer, got {r!r}")
    if max_rank is not None and r > max_rank:
        raise RankError(cid, f"rank {r} exceeds the server's maximum rank {max_rank}")
    if allowed_ranks is not None and r not in allowed_ranks:
        raise RankError(cid, f"rank {r} is not one of the rank levels {sorted(allowed_ranks)}")
    _check_module_set(cid, "module", update.factors.keys(), module_shapes.keys())
    for name, (d, n) in module_shapes.items():
        pair = update.factors[name]
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise InvalidUpdateError(cid, f"{name}: expected a (B, A) pair")
        B, A = pair
        _check_tensor(cid, f"{name}.B", B, dtypes, device)
        _check_tensor(cid, f"{name}.A", A, dtypes, device)
        if tuple(B.shape) != (d, r) or tuple(A.shape) != (r, n):
            raise ShapeMismatchError(
                cid,
                f"{name}: expected B ({d}, {r}) and A ({r}, {n}) for rank {r}, "
                f"got B {tuple(B.shape)} and A {tuple(A.shape)}",
            )
    validate_named(cid, "dense tensor", update.dense, dense_shapes or {}, dtypes, device)
    validate_named(cid, "extra", update.extras, extra_shapes or {}, dtypes, device)


def validate_named(
    client_id: int,
    kind: str,
    tensors: Mapping[str, Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Collection[torch.dtype] | None,
    device: torch.device | None,
) -> None:
    """Raise an :class:`InvalidUpdateError` subclass unless ``tensors`` holds exactly the named
    tensors of ``shapes``, each of its shape, finite, of an accepted dtype, on ``device``
    (``kind`` names them in the message: heads, extras, a client's per-client state).
    """
    _check_module_set(client_id, kind, tensors.keys(), shapes.keys())
    for name, shape in shapes.items():
        tensor = tensors[name]
        _check_tensor(client_id, name, tensor, dtypes, device)
        if tuple(tensor.shape) != tuple(shape):
            raise ShapeMismatchError(
                client_id, f"{name}: expected shape {tuple(shape)}, got {tuple(tensor.shape)}"
            )
