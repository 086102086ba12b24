"""Degenerate blocks never reach LAPACK: all-zero and non-finite matrices, the Monte Carlo's
degenerate cases, and ``raflora theory --json`` whose stdout is one JSON object.

MKL's SVD prints ``Intel oneMKL ERROR: Parameter 4 was incorrect on entry to DLASCL`` to the
process's stdout when handed a non-finite block. :mod:`raflora.linalg` answers such blocks (and
all-zero ones) itself; the checking proxy below wraps every ``torch.linalg`` decomposition the
library calls and fails on any input matrix that is all zero or non-finite. MKL also prints it
for one finite core of the issue's own Monte Carlo (``tests/data/mkl_dlascl_core.pt``): there
the SVD falls back to the Gram matrix and the command's stdout is protected instead.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from conftest import dense_svd, randn
from raflora import linalg
from raflora.diagnostics import energy_spectrum
from raflora.theory import TheorySetup, simulate

LAPACK = ("qr", "svd", "svdvals", "eigh")
"""The ``torch.linalg`` decompositions :mod:`raflora.linalg` and :mod:`raflora.theory` call."""


class CheckingProxy:
    """Wraps the decompositions of ``torch.linalg``; records every input matrix's health."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = dict.fromkeys(LAPACK, 0)
        self.bad: list[str] = []

    def wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def proxy(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            flat = x.reshape(-1, *x.shape[-2:])
            for i, m in enumerate(flat):
                if not bool(torch.isfinite(m).all()):
                    self.bad.append(f"{name}: matrix {i} of {tuple(x.shape)} is not finite")
                elif not bool(m.any()):
                    self.bad.append(f"{name}: matrix {i} of {tuple(x.shape)} is all zero")
            return real(x, *args, **kwargs)

        return proxy


@pytest.fixture
def lapack(monkeypatch: pytest.MonkeyPatch) -> Iterator[CheckingProxy]:
    """Every ``torch.linalg`` decomposition checked; the test fails on a degenerate input."""
    proxy = CheckingProxy()
    for name in LAPACK:
        monkeypatch.setattr(torch.linalg, name, proxy.wrap(name, getattr(torch.linalg, name)))
    yield proxy
    assert proxy.bad == [], "\n".join(proxy.bad[:10])


def _fail(*args: object, **kwargs: object) -> None:
    raise torch.linalg.LinAlgError("forced non-convergence")


# --------------------------------------------------------------------------- the guards


def test_proxy_sees_a_degenerate_block() -> None:
    """The proxy is not vacuous: a zero matrix handed straight to LAPACK is reported."""
    proxy = CheckingProxy()
    proxy.wrap("svdvals", torch.linalg.svdvals)(torch.zeros(2, 3, 3))
    proxy.wrap("qr", torch.linalg.qr)(torch.tensor([[1.0, math.inf]]))
    assert proxy.bad == [
        "svdvals: matrix 0 of (2, 3, 3) is all zero",
        "svdvals: matrix 1 of (2, 3, 3) is all zero",
        "qr: matrix 0 of (1, 2) is not finite",
    ]


def test_zero_factors_give_the_exact_decomposition(lapack: CheckingProxy) -> None:
    B, A = torch.zeros(6, 3, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float64)
    U, S, Vh = linalg.factored_svd(B, A)
    eye = torch.eye(6, 3, dtype=torch.float64)
    assert torch.equal(S, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(U, eye) and torch.equal(Vh, torch.eye(3, 5, dtype=torch.float64))
    assert torch.equal(linalg.factored_energy(B, A), torch.zeros(3, dtype=torch.float64))
    B_g, A_g = linalg.svd_to_factors(B, A, 4)  # completes A_g with orthonormal rows
    assert torch.equal(B_g, torch.zeros(6, 4, dtype=torch.float64))
    torch.testing.assert_close(A_g @ A_g.T, torch.eye(4, dtype=torch.float64))
    assert lapack.calls["qr"] == 1  # only the complement's (a full-rank block)


def test_empty_factors_have_an_empty_spectrum(lapack: CheckingProxy) -> None:
    """FLoRA's round-0 stack has rank 0: ``B (d, 0)``, ``A (0, n)``, alone and in a batch."""
    assert linalg.factored_energy(torch.zeros(4, 0), torch.zeros(0, 5)).shape == (0,)
    assert linalg.factored_energy(torch.zeros(3, 4, 0), torch.zeros(3, 0, 5)).shape == (3, 0)
    B_g, A_g = linalg.svd_to_factors(torch.zeros(4, 0), torch.zeros(0, 5), 2)
    assert torch.equal(B_g, torch.zeros(4, 2))
    torch.testing.assert_close(A_g @ A_g.T, torch.eye(2))


def test_zero_left_factor_keeps_the_right_factors_row_space(lapack: CheckingProxy) -> None:
    """``B = 0`` with a non-zero ``A``: only ``A``'s QR runs; the result is today's exactly."""
    A = randn(1, 3, 5)
    B = torch.zeros(6, 3, dtype=torch.float64)
    _, S, Vh = linalg.factored_svd(B, A)
    Q_a, _ = torch.linalg.qr(A.T)
    assert torch.equal(S, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(Vh, Q_a.T)  # the zero core's right vectors are I: Vh spans A's rows


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_block_is_nan_and_its_batch_neighbours_unchanged(
    bad: float, lapack: CheckingProxy
) -> None:
    B, A = randn(2, 3, 8, 4), randn(3, 3, 4, 7)
    B[1, 2, 0] = bad  # module 1 of 3 is non-finite
    B[2] = 0.0  # module 2 of 3 is zero
    U, S, Vh = linalg.factored_svd(B, A)
    energy = linalg.factored_energy(B, A)
    assert bool(S[1].isnan().all() and U[1].isnan().all() and Vh[1].isnan().all())
    assert bool(energy[1].isnan().all()) and bool((energy[2] == 0).all())
    U0, S0, Vh0 = linalg.factored_svd(B[0], A[0])  # module 0 alone
    for got, alone in ((U[0], U0), (S[0], S0), (Vh[0], Vh0)):
        torch.testing.assert_close(got, alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S[0], dense_svd(B[0] @ A[0])[1][:4], rtol=1e-10, atol=1e-12)
    B_g, A_g = linalg.svd_to_factors(B, A, 6)
    assert bool((B_g[1] @ A_g[1]).isnan().all() and A_g[1].isnan().all())
    assert torch.equal(B_g[2], torch.zeros(8, 6, dtype=torch.float64))


def test_regular_batches_take_the_unguarded_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """No degenerate matrix: each decomposition is one call on the whole batch, as before."""
    seen: list[tuple[int, ...]] = []
    real = torch.linalg.qr

    def spy(x: Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", spy)
    linalg.factored_energy(randn(4, 5, 8, 3), randn(5, 5, 3, 6))
    assert seen == [(5, 8, 3), (5, 6, 3)]


def test_svd_fallback_with_an_underflowing_gram_matrix(
    monkeypatch: pytest.MonkeyPatch, lapack: CheckingProxy
) -> None:
    """The eigh fallback's Gram matrix ``coreᵀ core`` of a tiny core underflows to zero."""
    monkeypatch.setattr(torch.linalg, "svd", _fail)
    core = randn(6, 4, 4) * 1e-200  # its Gram matrix, ~1e-400, is exactly zero
    assert not bool((core.T @ core).any())
    U, _, Vh = linalg._small_svd(core)
    eye = torch.eye(4, dtype=torch.float64)
    # the zero Gram matrix's eigenvectors are I (without eigh): Vh is a permutation of it
    assert torch.equal(Vh @ Vh.T, eye) and set(Vh.flatten().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(U.T @ U, eye)
    assert lapack.calls["eigh"] == 0 and lapack.calls["qr"] == 1


# --------------------------------------------------------------------------- the Monte Carlo


@pytest.mark.parametrize("method", ["flexlora", "raflora"])
def test_monte_carlo_zero_updates_and_zero_spectra(method: str, lapack: CheckingProxy) -> None:
    """``β = 1e-200``: round 1's energies (σ² ~ 1e-400) underflow to zero spectra, round 2's
    client factors underflow to zero updates; every later round aggregates zero blocks."""
    setup = TheorySetup((2, 4), num_clients=6, per_round=3, beta=1e-200)
    energies = simulate(setup, 4, 2, method=method, seed=3)
    np.testing.assert_allclose(energies[:, 0], 1.0)
    assert bool((energies[:, 1:] == 0.0).all())
    assert lapack.calls["svdvals"] > 0 and lapack.calls["qr"] > 0


@pytest.mark.parametrize("method", ["flexlora", "raflora"])
@pytest.mark.parametrize("empty_partition", ["carry", "drop"])
def test_monte_carlo_rank_levels_without_a_sampled_client(
    method: str, empty_partition: str, lapack: CheckingProxy
) -> None:
    """One client per round: every round leaves rank levels without a sampled client."""
    setup = TheorySetup(
        (1, 2, 3), num_clients=3, per_round=1, init="decay", empty_partition=empty_partition
    )
    energies = simulate(setup, 6, 3, method=method, seed=3)
    assert bool(np.isfinite(energies).all())
    if method == "raflora" and empty_partition == "carry":  # β = 1, carry: nothing decays
        np.testing.assert_allclose(energies, np.broadcast_to([1.0, 0.5, 1 / 3], energies.shape))


def test_monte_carlo_overflow_reaches_no_lapack_routine(lapack: CheckingProxy) -> None:
    """``β = 1e150``: the factors overflow to ±inf in round 3; its energies are NaN, not an MKL
    message."""
    setup = TheorySetup((2, 4), num_clients=4, per_round=2, beta=1e150)
    energies = simulate(setup, 3, 1, method="flexlora", seed=0)
    assert bool(np.isnan(energies[0, 3]).all())


def test_energy_spectrum_of_a_zero_module(lapack: CheckingProxy) -> None:
    B = torch.zeros(2, 7, 4)
    assert torch.equal(energy_spectrum(B, torch.ones(2, 4, 5)), torch.zeros(2, 4))


# --------------------------------------------------------------------------- the CLI

THEORY = [sys.executable, "-m", "raflora.cli", "theory"]
CORE = Path(__file__).parent / "data" / "mkl_dlascl_core.pt"
"""The core ``R_b R_aᵀ`` (64 × 64, float64) FlexLoRA's SVD was handed in the issue's Monte Carlo
(ranks 8…64, 100 clients, 10 per round, flat init, seed 3, two MKL threads): finite and not zero,
singular values 1 and 3.2e-5 each exactly repeated, 16 of them ~1e-17. MKL 2024.2's ``gesdd``
prints the DLASCL message on it and does not converge (measured on AVX-512)."""

_CORE_SCRIPT = f"""
import torch
from raflora import linalg
from raflora.cli.theory import stdout_to_stderr
core = torch.load({str(CORE)!r})
with stdout_to_stderr():
    U, S, Vh = linalg._small_svd(core)
print(float((U * S @ Vh - core).abs().max()), float((U.T @ U - torch.eye(64)).abs().max()))
"""


def test_the_issues_core_gets_its_svd_and_stdout_stays_clean() -> None:
    """Whatever LAPACK prints on this core, the SVD comes back and stdout holds our line only."""
    done = subprocess.run(
        [sys.executable, "-c", _CORE_SCRIPT], capture_output=True, text=True, check=True
    )
    error, orthogonality = (float(v) for v in done.stdout.split())  # nothing else on stdout
    assert error < 1e-10 and orthogonality < 1e-10


def test_theory_json_stdout_is_one_json_object() -> None:
    """The issue's settings (ranks 8…64, 100 clients, 10 per round, 20 rounds, flat init,
    seed 3), with 2 simulations instead of 1000 to stay fast; then an overflowing ``β``."""
    issue = ["--ranks", "8,16,32,48,64", "--clients", "100", "--per-round", "10"]
    issue += ["--rounds", "20", "--init", "flat", "--simulate", "2", "--seed", "3", "--json"]
    done = subprocess.run([*THEORY, *issue], capture_output=True, text=True, check=True)
    data = json.loads(done.stdout)
    assert len(data["rounds"]) == 21 and data["rounds"][20]["simulated_raflora"] > 0.8
    assert "MKL" not in done.stderr
    overflow = ["--ranks", "2,4", "--clients", "4", "--per-round", "2", "--rounds", "3"]
    overflow += ["--beta", "1e150", "--simulate", "1", "--json"]  # β² finite, β⁴ not
    done = subprocess.run([*THEORY, *overflow], capture_output=True, text=True, check=True)
    data = json.loads(done.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["rounds"][3]["simulated_flexlora"] is None  # NaN: not strict JSON, so null


_NOISY = """
import ctypes, os, sys
from raflora.cli.theory import stdout_to_stderr
print("before", flush=True)
with stdout_to_stderr():
    os.write(1, b"native write\\n")
    ctypes.CDLL(None).printf(b"native printf\\n")  # C stdio, buffered: flushed on exit
    print("python print")
print("after")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="C's printf through ctypes.CDLL(None)")
def test_stdout_to_stderr_moves_native_output() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _NOISY], capture_output=True, text=True, check=True
    )
    assert done.stdout == "before\nafter\n"
    assert sorted(done.stderr.splitlines()) == ["native printf", "native write", "python print"]
