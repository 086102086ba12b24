"""Seeded client partitioners: ``iid``, ``dir-a{α}`` and ``patho-c{c}a{α}`` (SPEC §6).

Every partitioner is a pure function of its constructor arguments: :meth:`Partitioner.split`
builds a fresh ``np.random.default_rng(seed)`` on each call and never touches global RNG state,
so the same seed always gives the same split. Each client's part is a sorted ``int64`` array of
sample indices, and the parts are pairwise disjoint.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "PARTITION_FORMS",
    "DirichletPartitioner",
    "IIDPartitioner",
    "PartitionSpec",
    "Partitioner",
    "PathologicalPartitioner",
    "parse_partition",
    "partition",
    "summarize_partition",
]

IntArray = npt.NDArray[np.int64]
Labels = Sequence[int] | npt.NDArray[np.integer[Any]]

PARTITION_FORMS = (
    "'iid', 'dir-a<alpha>' (e.g. 'dir-a0.5'), 'patho-c<c>a<alpha>' (e.g. 'patho-c20a1')"
)
_FLOAT = r"(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
_DIR_RE = re.compile(rf"dir-a{_FLOAT}")
_PATHO_RE = re.compile(rf"patho-c(\d+)a{_FLOAT}")


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition string.

    Attributes
    ----------
    kind : str
        One of ``"iid"``, ``"dir"``, ``"patho"``.
    alpha : float or None
        Dirichlet concentration (``dir`` and ``patho`` only), always > 0.
    classes_per_client : int or None
        Number of distinct classes per client (``patho`` only), always >= 1.
    """

    kind: str
    alpha: float | None = None
    classes_per_client: int | None = None


def parse_partition(spec: str) -> PartitionSpec:
    """Parse ``iid``, ``dir-a<float>`` or ``patho-c<int>a<float>``; anything else is an error.

    Raises
    ------
    ValueError
        If ``spec`` is not one of the accepted forms, ``alpha <= 0`` or ``c < 1``.
    """
    if spec == "iid":
        return PartitionSpec("iid")
    if m := _DIR_RE.fullmatch(spec):
        return PartitionSpec("dir", alpha=_check_alpha(float(m.group(1)), spec))
    if m := _PATHO_RE.fullmatch(spec):
        c = int(m.group(1))
        if c < 1:
            raise ValueError(f"partition {spec!r}: classes per client c must be >= 1, got {c}")
        return PartitionSpec(
            "patho", alpha=_check_alpha(float(m.group(2)), spec), classes_per_client=c
        )
    raise ValueError(f"unknown partition {spec!r}; accepted forms: {PARTITION_FORMS}")


def _check_alpha(alpha: float, spec: str) -> float:
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"partition {spec!r}: alpha must be a finite number > 0, got {alpha}")
    return alpha


def _as_labels(labels: Labels) -> IntArray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise ValueError(
            f"labels must be a non-empty 1-D sequence of ints, got shape {arr.shape}, "
            f"dtype {arr.dtype}"
        )
    return arr.astype(np.int64)


def _split_by_shares(idx: IntArray, shares: npt.NDArray[np.float64]) -> list[IntArray]:
    """Cut ``idx`` into ``len(shares)`` consecutive chunks of sizes ~ ``shares * len(idx)``."""
    cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
    return list(np.split(idx, cuts))


class Partitioner(ABC):
    """Base class: validates ``num_clients``/``num_samples`` and owns the seeded generator.

    Parameters
    ----------
    num_samples : int
        Dataset size N; indices ``0..N-1`` are partitioned.
    num_clients : int
        Number of clients K, with ``1 <= K <= N``.
    seed : int
        Seed of the partitioner's own ``np.random.default_rng``.
    """

    def __init__(self, num_samples: int, num_clients: int, seed: int) -> None:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if num_clients > num_samples:
            raise ValueError(
                f"num_clients ({num_clients}) must be <= num_samples ({num_samples}); "
                "use fewer clients or more data"
            )
        self.num_samples = num_samples
        self.num_clients = num_clients
        self.seed = seed

    def split(self) -> list[IntArray]:
        """Return one sorted int64 index array per client (same seed -> same split)."""
        parts = self._split(np.random.default_rng(self.seed))
        return [np.sort(p).astype(np.int64) for p in parts]

    @abstractmethod
    def _split(self, rng: np.random.Generator) -> list[IntArray]: ...


class IIDPartitioner(Partitioner):
    """Uniform random split: a random permutation cut into K parts whose sizes differ by <= 1."""

    def _split(self, rng: np.random.Generator) -> list[IntArray]:
        perm = rng.permutation(self.num_samples).astype(np.int64)
        return list(np.array_split(perm, self.num_clients))


class DirichletPartitioner(Partitioner):
    """Label-Dirichlet split ``dir-a{α}``: per class, client shares ~ Dir(α·1_K).

    Each class's shuffled samples are cut by its shares. Filling in for the paper: the whole
    draw is repeated until every client has at least ``min_samples`` samples, and we give up with
    a ``ValueError`` after ``max_attempts`` draws.
    """

    def __init__(
        self,
        labels: Labels,
        num_clients: int,
        alpha: float,
        seed: int,
        *,
        min_samples: int = 2,
        max_attempts: int = 1000,
    ) -> None:
        self.labels = _as_labels(labels)
        super().__init__(len(self.labels), num_clients, seed)
        self.alpha = _check_alpha(alpha, f"dir-a{alpha}")
        if min_samples < 0 or min_samples * num_clients > self.num_samples:
            raise ValueError(
                f"min_samples={min_samples} is impossible for {num_clients} clients and "
                f"{self.num_samples} samples (need 0 <= min_samples * num_clients <= num_samples)"
            )
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.min_samples = min_samples
        self.max_attempts = max_attempts

    def _split(self, rng: np.random.Generator) -> list[IntArray]:
        K = self.num_clients
        by_class = [np.flatnonzero(self.labels == c) for c in np.unique(self.labels)]
        for _ in range(self.max_attempts):
            chunks: list[list[IntArray]] = [[] for _ in range(K)]
            for idx in by_class:
                shares = rng.dirichlet(np.full(K, self.alpha))
                for k, chunk in enumerate(_split_by_shares(rng.permutation(idx), shares)):
                    chunks[k].append(chunk)
            parts = [np.concatenate(c) for c in chunks]
            if min(len(p) for p in parts) >= self.min_samples:
                return parts
        raise ValueError(
            f"dir-a{self.alpha:g}: no draw gave every one of {K} clients >= {self.min_samples} "
            f"samples in {self.max_attempts} attempts; increase alpha, lower min_samples or "
            "num_clients, or raise max_attempts"
        )


class PathologicalPartitioner(Partitioner):
    """Fed-HeLLo-style ``patho-c{c}a{α}``: each client holds exactly ``c`` distinct classes.

    Classes are dealt from a stream of independently shuffled permutations of the class list,
    ``c`` per client. Filling in for the paper on wrap-around: a class already held by the
    current client is skipped and put back at the front of the stream for the next client, so
    every client gets ``c`` distinct classes and, when ``K·c >= #classes``, every class gets at
    least one holder. If ``K·c < #classes`` some classes have no holder and their samples are
    left unassigned. Each class's shuffled samples are split among its holders by Dir(α) shares
    after first giving every holder ``min_per_holder`` samples (reduced to ``n_class // holders``
    when the class is too small). Classes are the distinct values present in ``labels``.
    """

    def __init__(
        self,
        labels: Labels,
        num_clients: int,
        classes_per_client: int,
        alpha: float,
        seed: int,
        *,
        min_per_holder: int = 1,
    ) -> None:
        self.labels = _as_labels(labels)
        super().__init__(len(self.labels), num_clients, seed)
        self.classes = np.unique(self.labels)
        c = classes_per_client
        if not 1 <= c <= len(self.classes):
            raise ValueError(
                f"patho-c{c}: classes_per_client must be in [1, {len(self.classes)}] "
                f"(the number of distinct labels), got {c}"
            )
        if min_per_holder < 0:
            raise ValueError(f"min_per_holder must be >= 0, got {min_per_holder}")
        self.classes_per_client = c
        self.alpha = _check_alpha(alpha, f"patho-c{c}a{alpha}")
        self.min_per_holder = min_per_holder

    def deal_classes(self, rng: np.random.Generator) -> list[list[int]]:
        """Return, per client, its ``c`` distinct classes as positions into ``self.classes``."""
        C, stream = len(self.classes), deque[int]()
        held: list[list[int]] = []
        for _ in range(self.num_clients):
            chosen: list[int] = []
            skipped: list[int] = []
            while len(chosen) < self.classes_per_client:
                if not stream:
                    stream.extend(int(x) for x in rng.permutation(C))
                x = stream.popleft()
                (skipped if x in chosen else chosen).append(x)
            stream.extendleft(reversed(skipped))
            held.append(chosen)
        return held

    def _split(self, rng: np.random.Generator) -> list[IntArray]:
        held = self.deal_classes(rng)
        chunks: list[list[IntArray]] = [[] for _ in range(self.num_clients)]
        for ci, c in enumerate(self.classes):
            holders = [k for k, cls in enumerate(held) if ci in cls]
            if not holders:
                continue
            idx = rng.permutation(np.flatnonzero(self.labels == c))
            h = len(holders)
            m = min(self.min_per_holder, len(idx) // h)
            base, rest = idx[: m * h], idx[m * h :]
            extra = _split_by_shares(rest, rng.dirichlet(np.full(h, self.alpha)))
            for j, k in enumerate(holders):
                chunks[k].extend([base[j * m : (j + 1) * m], extra[j]])
        return [np.concatenate(c) if c else np.empty(0, np.int64) for c in chunks]


def partition(
    spec: str,
    labels: Labels | None,
    num_clients: int,
    seed: int,
    *,
    num_samples: int | None = None,
    min_samples: int = 2,
    min_per_holder: int = 1,
    max_attempts: int = 1000,
) -> list[IntArray]:
    """Split a dataset among ``num_clients`` clients according to ``spec``.

    Parameters
    ----------
    spec : str
        ``iid``, ``dir-a<alpha>`` or ``patho-c<c>a<alpha>`` (see :func:`parse_partition`).
    labels : sequence of int or ndarray or None
        Per-sample class labels; ``None`` is allowed only for ``iid`` (then give ``num_samples``).
    num_clients : int
        Number of clients K.
    seed : int
        Seed of the partitioner's own generator (global RNG state is never used).
    num_samples : int, optional
        Dataset size; required when ``labels`` is None, must equal ``len(labels)`` otherwise.
    min_samples : int
        ``dir`` only: minimum samples per client (the draw is repeated until met).
    min_per_holder : int
        ``patho`` only: minimum samples of a class given to each of its holders.
    max_attempts : int
        ``dir`` only: how many draws to try before raising.

    Returns
    -------
    list of ndarray
        For each client, a sorted int64 array of sample indices; parts are disjoint and cover
        every sample (``patho`` leaves out the samples of classes with no holder).
    """
    ps = parse_partition(spec)
    if labels is not None and num_samples is not None and num_samples != len(labels):
        raise ValueError(f"num_samples={num_samples} but len(labels)={len(labels)}")
    if ps.kind == "iid":
        n = len(labels) if labels is not None else num_samples
        if n is None:
            raise ValueError("partition 'iid' needs labels or num_samples")
        return IIDPartitioner(n, num_clients, seed).split()
    if labels is None:
        raise ValueError(f"partition {spec!r} is label-based and needs labels (got None)")
    assert ps.alpha is not None
    if ps.kind == "dir":
        return DirichletPartitioner(
            labels,
            num_clients,
            ps.alpha,
            seed,
            min_samples=min_samples,
            max_attempts=max_attempts,
        ).split()
    assert ps.classes_per_client is not None
    return PathologicalPartitioner(
        labels, num_clients, ps.classes_per_client, ps.alpha, seed, min_per_holder=min_per_holder
    ).split()


def summarize_partition(parts: Sequence[IntArray], labels: Labels | None = None) -> dict[str, Any]:
    """JSON-serialisable summary of a split (plain python ints and lists only).

    Returns
    -------
    dict
        ``num_clients``, ``num_assigned`` and per-client ``clients[i]["num_samples"]``; with
        ``labels`` also ``num_samples``, ``classes`` (sorted distinct labels), ``num_unassigned``
        and per-client ``num_classes`` and ``class_histogram`` (counts aligned with ``classes``).
    """
    out: dict[str, Any] = {
        "num_clients": len(parts),
        "num_assigned": int(sum(len(p) for p in parts)),
    }
    clients: list[dict[str, Any]] = [{"num_samples": len(p)} for p in parts]
    if labels is not None:
        lab = _as_labels(labels)
        classes = np.unique(lab)
        out["num_samples"] = len(lab)
        out["classes"] = [int(c) for c in classes]
        out["num_unassigned"] = len(lab) - out["num_assigned"]
        for entry, p in zip(clients, parts, strict=True):
            hist = np.bincount(np.searchsorted(classes, lab[p]), minlength=len(classes))
            entry["num_classes"] = int(np.count_nonzero(hist))
            entry["class_histogram"] = [int(x) for x in hist]
    out["clients"] = clients
    return out
