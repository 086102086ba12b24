"""glibc's malloc told to keep freed memory for the next allocation, for grouped client phases on
the CPU (docs/concurrency.md#speed).

A group step of ``K`` clients allocates activations ``K`` times a client's, step after step. Left
to itself, glibc's malloc hands the top of its heap back to the system whenever more than its
trim threshold (at most 64 MiB) is free there, so every step maps that memory afresh and pays a
page fault per page. On a 6-layer BERT at ``K = 10`` (2.6 GiB of activations) that made the
grouped client phase 0.82-0.93x the sequential one; with freed memory kept it is 1.07x, and the
quickstart's 1.9-2.1x is unchanged or better (``benchmarks/concurrent_clients.py``, this
project's 2-core CPU).

:func:`keep_freed_memory` sets two ``mallopt`` parameters for the rest of the process: the trim
threshold to the largest value (the heap is never trimmed) and the mmap threshold to the value
glibc's own dynamic adjustment reaches after large frees (32 MiB on 64-bit: larger blocks are
still mapped and unmapped each time). The cost: the process keeps the largest heap it has used
until it exits. Setting these back, or trimming the heap after each phase, was measured: the next
phase then maps its memory afresh and the gain is gone. Elsewhere (not Linux with glibc, or not
a CPU run) it does nothing.
"""

from __future__ import annotations

import ctypes
import platform
from functools import cache
from typing import Any

import torch

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 2**20
"""glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the largest value its dynamic threshold reaches
and the largest ``mallopt`` accepts."""
_TRIM_THRESHOLD = 2**31 - 1
"""The largest trim threshold ``mallopt`` takes (an ``int``): the heap is not trimmed."""


@cache
def _glibc() -> Any | None:
    """The C library when it is glibc with ``mallopt``; ``None`` otherwise."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


@cache
def _kept() -> bool:
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def keep_freed_memory(device: torch.device) -> bool:
    """Before a grouped client phase on ``device``: on a CPU with glibc, keep freed memory in the
    process from now on (see the module docstring; once per process). Whether it is kept.
    """
    return device.type == "cpu" and _kept()
