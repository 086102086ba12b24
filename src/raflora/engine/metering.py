"""What a round measures: time on the device and bytes on the wire.

Both halves of a round (:mod:`raflora.engine.client_round`, :mod:`raflora.engine.server_round`)
and the Flower transport use these, so the two engines report time and traffic alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["device_clock", "tensor_bytes"]


def device_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work is done.

    CUDA kernels run asynchronously: without synchronising, a time split taken on the host
    books the kernels' time to whatever happens to wait for them next.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def tensor_bytes(tensors: Mapping[str, Any]) -> int:
    """Bytes of every tensor in a mapping of tensors or ``(B, A)`` pairs.

    What is counted: docs/design.md#communication.
    """
    total = 0
    for value in tensors.values():
        parts = value if isinstance(value, tuple) else (value,)
        total += sum(t.numel() * t.element_size() for t in parts)
    return total
