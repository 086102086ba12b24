"""glibc's malloc kept from handing a grouped client phase's freed memory back to the system
(raflora.engine.host_memory)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from raflora.engine import host_memory
from raflora.engine.host_memory import keep_freed_memory

_RELEASED = """
import importlib.util, os, sys, torch
spec = importlib.util.spec_from_file_location("host_memory", sys.argv[2])
host_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_memory)  # the module alone: no raflora import, a quick start
if sys.argv[1] == "keep":
    assert host_memory.keep_freed_memory(torch.device("cpu"))
def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
blocks = [torch.ones(4 * 2**20) for _ in range(16)]  # 16 x 16 MiB, every page touched
peak = resident()
del blocks
print((peak - resident()) // 2**20)
"""


def released_mib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _RELEASED, mode, host_memory.__file__],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_freed_memory_stays_with_the_process_once_kept() -> None:
    assert released_mib("default") >= 200  # glibc hands the 256 MiB back on free
    assert released_mib("keep") <= 16  # kept for the next step's allocations


def test_nothing_is_changed_for_a_device_other_than_the_cpu() -> None:
    assert keep_freed_memory(torch.device("meta")) is False
