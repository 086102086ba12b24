"""Shared hypothesis profile and dense reference helpers for the correctness tests.

The references here form the ``d × n`` matrix and run ``torch.linalg.svd`` on it: they are the
slow, obviously correct versions of the factored code in :mod:`raflora.linalg`.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from hypothesis import settings
from torch import Tensor

settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Bound at import so that tests which make ``torch.linalg.svd`` fail (to drive the library's
# fallback path) still get a working dense reference.
_dense_svd = torch.linalg.svd


def randn(seed: int, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Seeded standard normal tensor (independent of the global RNG)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense_svd(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin dense SVD of ``M (..., d, n)``."""
    U, S, Vh = _dense_svd(M, full_matrices=False)
    return U, S, Vh


def best_rank(M: Tensor, r: int) -> Tensor:
    """Dense best rank-``r`` approximation ``U_r diag(S_r) Vh_r`` (Eckart–Young)."""
    U, S, Vh = dense_svd(M)
    return (U[..., :r] * S[..., None, :r]) @ Vh[..., :r, :]


def top_singular_values(M: Tensor, r: int) -> Tensor:
    """The top ``r`` singular values of ``M``, zero-padded to length ``r``."""
    S = torch.linalg.svdvals(M)[..., :r]
    missing = r - S.shape[-1]
    return torch.cat([S, S.new_zeros((*S.shape[:-1], missing))], -1) if missing > 0 else S


def truncation_is_unique(M: Tensor, r: int, rel_gap: float = 1e-6) -> bool:
    """Whether the best rank-``r`` approximation of ``M`` is well defined numerically.

    It is unique unless ``σ_r ≈ σ_{r+1} > 0``; with a tiny gap two exact algorithms may pick
    different subspaces, so tests then check the Eckart–Young error instead of the product.
    """
    S = torch.linalg.svdvals(M)
    if r >= S.shape[-1]:
        return True
    scale = S[..., 0].clamp_min(1e-300)
    tail_zero = S[..., r] <= 1e-9 * scale
    gap_ok = (S[..., r - 1] - S[..., r]) > rel_gap * scale
    return bool((tail_zero | gap_ok).all())


def assert_best_rank(
    X: Tensor, M: Tensor, r: int, rtol: float = 1e-9, rel_gap: float = 1e-6
) -> None:
    """``X`` is a best rank-``r`` approximation of ``M``: same top singular values, rank ≤ ``r``
    and the same product as the dense truncation (when that is ill-posed because
    ``σ_r ≈ σ_{r+1}``, the Eckart–Young error ``‖M − X‖_F² = Σ_{i>r} σ_i²`` instead).
    Tolerances are relative to ``‖M‖₂``.
    """
    X = X.to(M.dtype)
    atol = rtol * max(float(torch.linalg.matrix_norm(M, ord=2).max()), 1e-300)
    torch.testing.assert_close(
        top_singular_values(X, r), top_singular_values(M, r), rtol=0, atol=atol
    )
    beyond = torch.linalg.svdvals(X)[..., r:]
    assert beyond.numel() == 0 or float(beyond.max()) <= atol, "X has rank > r"
    if truncation_is_unique(M, r, rel_gap):
        torch.testing.assert_close(X, best_rank(M, r), rtol=0, atol=atol)
    else:
        err = torch.linalg.matrix_norm(M - X) ** 2
        tail = (torch.linalg.svdvals(M)[..., r:] ** 2).sum(-1)
        torch.testing.assert_close(err, tail, rtol=0, atol=atol * atol / rtol)


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network for Hugging Face: the env variables and the constants the libraries read at
    import time (so a test sees the offline errors a user without network sees)."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


SYNTHETIC: dict[str, Any] = {
    "method": "raflora",
    "seed": 3,
    "task": {"name": "synthetic", "options": {"num_train": 400, "num_eval": 200}},
    "fl": {"num_clients": 6, "clients_per_round": 3, "rounds": 2, "rank_levels": [2, 4, 8]},
    "data": {"partition": "dir-a1.0"},
    "train": {"lr": 5e-3, "batch_size": 32},
    "eval": {"every": 1},
    "output": {"plots": False},
}
"""The synthetic task's federation of the engine tests: 6 clients, 3 per round, ranks 2, 4, 8.

A test overrides what it varies: ``config_with(SYNTHETIC, **{"fl.rounds": 3})``.
"""

TINY_SYNTHETIC: dict[str, Any] = {
    "method": "raflora",
    "seed": 3,
    "task": {"name": "synthetic", "options": {"num_train": 200, "num_eval": 100}},
    "fl": {"num_clients": 4, "clients_per_round": 2, "rounds": 2, "rank_levels": [2, 4]},
    "train": {"lr": 5e-3, "batch_size": 32},
    "output": {"plots": False},
}
"""The smallest synthetic federation: 4 clients, 2 per round, 2 rounds, ranks 2 and 4."""


FLOWER_TINY = [
    "task.name=synthetic",
    "task.options={num_train: 400, num_eval: 200}",
    "fl.num_clients=4",
    "fl.clients_per_round=2",
    "fl.rounds=3",
    "fl.rank_levels=[4,8]",
    "output.plots=false",
]
"""The Flower tests' federation, as overrides: 4 synthetic clients, 2 per round, 3 rounds."""


@pytest.fixture
def flower_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's home in a temporary directory, telemetry and update checks off (a module of
    Flower tests uses it for every test: ``pytestmark = pytest.mark.usefixtures("flower_env")``).
    """
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr_home")))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")


def config_with(data: dict[str, Any], **over: Any) -> Any:
    """A validated ``RunConfig`` from ``data`` with dotted overrides (``fl.rounds=3``)."""
    from raflora.config import config_from_dict

    data = copy.deepcopy(data)
    for key, value in over.items():
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_dict(data)


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task identity a Flower ``ServerApp`` process has (``Message`` reads it).

    Flower sets it when it starts a ``ServerApp``; tests that build messages by hand, outside
    one, need it too (they would otherwise pass only after a simulation ran in the process).
    """
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
