"""What a round measures: time on the device and bytes on the wire.

Both halves of a round (:mod:`raflora.engine.client_round`, :mod:`raflora.engine.server_round`)
and the Flower transport use these, so the two engines report time and traffic alike.
"""

from __future__ import annotations

import time

import torch

from raflora.methods.state import tensor_bytes

__all__ = ["device_clock", "tensor_bytes"]


def device_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work is done.

    CUDA kernels run asynchronously: without synchronising, a time split taken on the host
    books the kernels' time to whatever happens to wait for them next.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
