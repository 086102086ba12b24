"""Flower records ↔ raflora tensors: what travels in a Flower ``Message`` between engine halves.

The server sends each client the factors of its own rank:

- an :class:`~flwr.app.ArrayRecord` ``"arrays"`` with the effective factors of the client's rank
  (``B/<module>`` ``(d, r)`` and ``A/<module>`` ``(r, n)``,
  docs/methods.md#notation-and-the-lora-convention), the global heads
  (``dense/<name>``), the method's extras (``extra/<name>``), the client's per-client state
  (``state/<name>``: a Flower client is stateless across a resume, the server keeps it) and, for
  methods that merge into the base model (FLoRA, FedEx-LoRA), the server's current base weights
  (``base/<module>``), so that a client process's base model equals the server's;
- a :class:`~flwr.app.ConfigRecord` ``"config"`` with the round, learning rate, rank, client id
  and the resolved run configuration (JSON), from which the client builds its own
  :class:`~raflora.engine.federation.Federation`.

The client replies with its effective factors, heads, extras and new per-client state in
``"arrays"`` and a
:class:`~flwr.app.MetricRecord` ``"metrics"`` (sample count, loss, steps, timings). Decoding never
trusts the reply: anything that cannot be turned into a :class:`ClientUpdate` raises
:class:`MalformedReplyError` with a reason the server records. The server weights a client by the
sample count of the partition it assigned to it, never by the count the client reports: a reply
reporting another count raises :class:`SampleCountMismatchError`.

Decoded tensors are put on the device the caller names: the server's (``fed.device``) on the
server, the client federation's on a client.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from torch import Tensor

from raflora.engine.client_round import ClientResult
from raflora.methods import ClientUpdate

__all__ = [
    "ARRAYS",
    "CONFIG",
    "METRICS",
    "PRIVATE",
    "DecodedArrays",
    "MalformedReplyError",
    "SampleCountMismatchError",
    "decode_arrays",
    "decode_contribution",
    "decode_result",
    "encode_arrays",
    "encode_contribution",
    "encode_result",
    "record_bytes",
]

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PRIVATE = "private"
"""Record of a ``privacy.noise: client`` reply: the client's clipped, noised contribution."""

_KINDS = ("B", "A", "dense", "base", "extra", "state")


class MalformedReplyError(ValueError):
    """A reply whose content cannot be read as a client update (the message says why).

    Attributes
    ----------
    label : str
        Short name of the kind of rejection, the prefix of the reason the server records.
    """

    label = "malformed reply"


class SampleCountMismatchError(MalformedReplyError):
    """A reply reporting a sample count other than that of the partition the server assigned.

    The server weights clients by the counts it assigned; a client that reports another one
    (for instance to inflate its weight in the average) is left out of the round.
    """

    label = "sample count mismatch"


@dataclass
class DecodedArrays:
    """The tensors of one ``"arrays"`` record.

    Attributes
    ----------
    factors : dict[str, tuple[Tensor, Tensor]]
        Module → effective ``(B, A)``.
    dense : dict[str, Tensor]
        Fully trained tensors (heads).
    base : dict[str, Tensor]
        Base weights of the adapted modules (methods that merge into them; empty otherwise).
    extras : dict[str, Tensor]
        The method's named extras (empty for most methods).
    state : dict[str, Tensor]
        The client's per-client state (empty when the method keeps none).
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    dense: dict[str, Tensor]
    base: dict[str, Tensor]
    extras: dict[str, Tensor]
    state: dict[str, Tensor]


def _to_array(tensor: Tensor) -> Array:
    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: travel as float32
        t = t.float()
    return Array.from_torch_tensor(t.contiguous())


def encode_arrays(
    factors: Mapping[str, tuple[Tensor, Tensor]],
    dense: Mapping[str, Tensor],
    base: Mapping[str, Tensor] | None = None,
    *,
    extras: Mapping[str, Tensor] | None = None,
    state: Mapping[str, Tensor] | None = None,
) -> ArrayRecord:
    """Pack factors, heads and (optionally) base weights, extras and per-client state into one
    :class:`ArrayRecord`.
    """
    record = ArrayRecord()
    for name, (B, A) in factors.items():
        record[f"B/{name}"] = _to_array(B)
        record[f"A/{name}"] = _to_array(A)
    for kind, tensors in (("dense", dense), ("base", base), ("extra", extras), ("state", state)):
        for name, tensor in (tensors or {}).items():
            record[f"{kind}/{name}"] = _to_array(tensor)
    return record


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays of ``record`` (what the transport moves, headers included)."""
    return sum(len(array.data) for array in record.values())


def decode_arrays(record: object, *, device: torch.device | str) -> DecodedArrays:
    """Inverse of :func:`encode_arrays`, with every tensor on ``device``.

    Parameters
    ----------
    record : object
        The ``"arrays"`` record (anything: replies are untrusted).
    device : torch.device or str
        Where the decoded tensors go (the server's or the client's device).

    Raises
    ------
    MalformedReplyError
        ``record`` is not an :class:`ArrayRecord`, a key has no known prefix, an array cannot be
        read, or a module has only one of its two factors. Shapes and values are checked later by
        the aggregator's validation (:func:`~raflora.methods.validation.validate_update`).
    """
    if not isinstance(record, ArrayRecord):
        raise MalformedReplyError(f"{ARRAYS!r} is {type(record).__name__}, not an ArrayRecord")
    parts: dict[str, dict[str, Tensor]] = {kind: {} for kind in _KINDS}
    for key, array in record.items():
        kind, sep, name = key.partition("/")
        if not sep or kind not in parts or not name:
            raise MalformedReplyError(f"unexpected array {key!r}")
        try:
            values = np.array(array.numpy(), copy=True)
        except Exception as err:  # any decoding failure of untrusted bytes
            raise MalformedReplyError(f"array {key!r} cannot be read: {err}") from None
        parts[kind][name] = torch.from_numpy(values).to(device)
    lone = sorted(set(parts["B"]) ^ set(parts["A"]))
    if lone:
        raise MalformedReplyError(f"module {lone[0]!r} has only one of its two factors")
    factors = {name: (parts["B"][name], parts["A"][name]) for name in parts["B"]}
    return DecodedArrays(factors, parts["dense"], parts["base"], parts["extra"], parts["state"])


def encode_result(result: ClientResult) -> tuple[ArrayRecord, MetricRecord]:
    """A client's reply: its update's tensors and its training metrics."""
    update = result.update
    metrics = MetricRecord(
        {
            "client-id": int(update.client_id),
            "rank": int(update.rank),
            "num-samples": int(update.num_samples),
            "train-loss": float(result.train_loss),
            "steps": int(result.steps),
            "compute-seconds": float(result.compute_seconds),
            "seconds": float(result.seconds),
        }
    )
    return (
        encode_arrays(update.factors, update.dense, extras=update.extras, state=result.state),
        metrics,
    )


def _integer(metrics: MetricRecord, key: str) -> int:
    value = metrics.get(key)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise MalformedReplyError(f"metric {key!r} must be an integer, got {value!r}")
    return int(value)


def _number(metrics: MetricRecord, key: str) -> float:
    value = metrics.get(key)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise MalformedReplyError(f"metric {key!r} must be a number, got {value!r}")
    return float(value)


def decode_result(
    arrays: object,
    metrics: object,
    *,
    client_id: int,
    rank: int,
    num_samples: int,
    device: torch.device | str,
) -> ClientResult:
    """Turn a reply's records into a :class:`ClientResult` for the client the server asked.

    Parameters
    ----------
    arrays, metrics : object
        The reply's ``"arrays"`` and ``"metrics"`` records (anything: replies are untrusted).
    client_id : int
        The client the message went to.
    rank : int
        The rank the server sent it (the aggregator validates the factors against it).
    num_samples : int
        The sample count of the partition the server assigned to the client: the update's
        weight, whatever the client reports.
    device : torch.device or str
        Where the update's tensors go (the server's device).

    Raises
    ------
    MalformedReplyError
        A record is missing or of the wrong kind, a metric is missing or not a number, or the
        reply names another client or rank.
    SampleCountMismatchError
        The reply reports a sample count other than ``num_samples``.
    """
    if not isinstance(metrics, MetricRecord):
        raise MalformedReplyError(f"{METRICS!r} is missing or not a MetricRecord")
    decoded = decode_arrays(arrays, device=device)
    if decoded.base:
        raise MalformedReplyError("a client reply must not carry base weights")
    replied_id = _integer(metrics, "client-id")
    if replied_id != client_id:
        raise MalformedReplyError(f"reply names client {replied_id}, expected {client_id}")
    replied_rank = _integer(metrics, "rank")
    if replied_rank != rank:
        raise MalformedReplyError(f"reply trained rank {replied_rank}, expected {rank}")
    reported = _integer(metrics, "num-samples")
    if reported != num_samples:
        raise SampleCountMismatchError(
            f"reply reports {reported} samples, client {client_id}'s partition has {num_samples}"
        )
    loss = _number(metrics, "train-loss")
    update = ClientUpdate(
        client_id=client_id,
        rank=rank,
        num_samples=num_samples,  # the server's count, not the client's word
        factors=decoded.factors,
        dense=decoded.dense,
        extras=decoded.extras,
    )
    return ClientResult(
        update=update,
        train_loss=loss if math.isfinite(loss) else math.nan,
        steps=_integer(metrics, "steps"),
        compute_seconds=_number(metrics, "compute-seconds"),
        seconds=_number(metrics, "seconds"),
        state=decoded.state or None,
    )


# ------------------------------------------------------------------ privacy.noise: client


def encode_contribution(pieces: Mapping[str, Tensor]) -> ArrayRecord:
    """The ``"private"`` record of a ``privacy.noise: client`` reply (docs/privacy.md): the
    client's clipped, densified and noised contribution, one float64 array per piece of the
    round's public layout. Neither the client's factors nor its heads travel: the server learns
    only these pieces, and the training metrics (outside the guarantee).
    """
    record = ArrayRecord()
    for name, piece in pieces.items():
        record[name] = Array.from_torch_tensor(piece.detach().cpu().double().contiguous())
    return record


def decode_contribution(
    record: object,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    client_id: int,
    device: torch.device | str,
) -> dict[str, Tensor]:
    """The pieces of a ``"private"`` record, checked against the round's public layout.

    Raises
    ------
    MalformedReplyError
        The record is missing or not an :class:`ArrayRecord`, its names are not exactly the
        layout's, or a piece has another shape, is not float64 or is not finite.
    """
    if not isinstance(record, ArrayRecord):
        raise MalformedReplyError(f"{PRIVATE!r} is missing or not an ArrayRecord")
    names = set(record.keys())
    if names != set(shapes):
        extra, missing = sorted(names - set(shapes)), sorted(set(shapes) - names)
        what = f"unexpected {extra[0]!r}" if extra else f"missing {missing[0]!r}"
        raise MalformedReplyError(f"client {client_id}'s contribution: {what}")
    pieces: dict[str, Tensor] = {}
    for name in sorted(shapes):
        try:
            values = np.array(record[name].numpy(), copy=True)
        except Exception as err:  # any decoding failure of untrusted bytes
            raise MalformedReplyError(f"piece {name!r} cannot be read: {err}") from None
        if values.dtype != np.float64 or tuple(values.shape) != tuple(shapes[name]):
            raise MalformedReplyError(
                f"piece {name!r} is {values.dtype} {tuple(values.shape)}, expected float64 "
                f"{tuple(shapes[name])}"
            )
        if not np.isfinite(values).all():
            raise MalformedReplyError(f"piece {name!r} is not finite")
        pieces[name] = torch.from_numpy(values).to(device)
    return pieces
