"""Seeded client partitioners: ``iid``, ``dir-a{α}`` and ``patho-c{c}a{α}``
(docs/design.md#data-partitions).

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


def _owners_by_shares(n: int, shares: npt.NDArray[np.float64]) -> IntArray:
    """Owner (position in ``shares``) of each of ``n`` consecutive items cut by ``shares``.

    Chunk ``j`` is items ``[cuts[j-1], cuts[j])`` with ``cuts = ⌊cumsum(shares)[:-1]·n⌋``: the
    cut points of ``np.split(items, cuts)``, computed without building one array per owner.
    """
    # cumsum of non-negative shares is non-decreasing, so the cuts are too; clip float spill-over.
    cuts = np.minimum((np.cumsum(shares)[:-1] * n).astype(np.int64), n)
    counts = np.diff(cuts, prepend=0, append=n)
    return np.repeat(np.arange(len(shares), dtype=np.int64), counts)


def _indices_by_class(labels: IntArray) -> list[IntArray]:
    """For each distinct label, in sorted order, the ascending indices of its samples."""
    counts = np.unique(labels, return_counts=True)[1]
    order = np.argsort(labels, kind="stable").astype(np.int64)  # ascending within a class
    return list(np.split(order, np.cumsum(counts)[:-1]))


def _parts_from_owners(owner: IntArray, num_clients: int) -> list[IntArray]:
    """Client ``k``'s sorted indices for every ``k``; owner ``num_clients`` means unassigned."""
    order = np.argsort(owner, kind="stable").astype(np.int64)  # by owner, then by index
    counts = np.bincount(owner, minlength=num_clients + 1)
    return list(np.split(order, np.cumsum(counts)[:-1])[:num_clients])


def _client_sizes(owner: IntArray, num_clients: int) -> IntArray:
    """Samples per client (owner ``num_clients``, unassigned, is not counted)."""
    return np.bincount(owner, minlength=num_clients + 1)[:num_clients].astype(np.int64)


def _check_min_samples(min_samples: int, num_clients: int, num_samples: int) -> int:
    if min_samples < 0 or min_samples * num_clients > num_samples:
        raise ValueError(
            f"min_samples={min_samples} is impossible for {num_clients} clients and "
            f"{num_samples} samples (need 0 <= min_samples * num_clients <= num_samples)"
        )
    return min_samples


class Partitioner(ABC):
    """Base class: validates ``num_clients``/``num_samples`` and owns the seeded generator.

    Subclasses decide, for every sample, which client owns it (:meth:`_owners`); the parts are
    read off that one array, so building a split costs O(N log N + K) and keeps nothing per
    client but its index array.

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
        owner = self._owners(np.random.default_rng(self.seed))
        return _parts_from_owners(owner, self.num_clients)

    @abstractmethod
    def _owners(self, rng: np.random.Generator) -> IntArray:
        """``(N,)`` owning client of every sample; ``num_clients`` marks an unassigned one."""


class IIDPartitioner(Partitioner):
    """Uniform random split: a random permutation cut into K parts whose sizes differ by <= 1."""

    def _owners(self, rng: np.random.Generator) -> IntArray:
        N, K = self.num_samples, self.num_clients
        perm = rng.permutation(N)
        # np.array_split's sizes: the first N mod K parts get one more sample.
        sizes = np.full(K, N // K, dtype=np.int64)
        sizes[: N % K] += 1
        owner = np.empty(N, dtype=np.int64)
        owner[perm] = np.repeat(np.arange(K, dtype=np.int64), sizes)
        return owner


class DirichletPartitioner(Partitioner):
    """Label-Dirichlet split ``dir-a{α}``: per class, client shares ~ Dir(α·1_K).

    Each class's shuffled samples are cut by its shares. A draw that gives every client at
    least ``min_samples`` samples is kept as it is. Otherwise we depart from the paper (which is
    silent on small clients): instead of redrawing until the minimum is met — ever more draws
    as ``N/K`` shrinks — the draw is topped up. Every client keeps ``min_samples`` of its
    samples (chosen at random); the samples beyond those are the surplus. Each client short of
    the minimum takes what it lacks from the surplus, class by class in the order of its
    expected count under the draw (its share of the class times the class size), random
    samples within a class. So only the missing samples move (a few percent of the data at
    ``N/K = 6``), the short clients get the classes the draw favours them for, no other client
    drops below the minimum, and the top-up succeeds whenever ``min_samples·K <= N``.
    """

    def __init__(
        self,
        labels: Labels,
        num_clients: int,
        alpha: float,
        seed: int,
        *,
        min_samples: int = 2,
    ) -> None:
        self.labels = _as_labels(labels)
        super().__init__(len(self.labels), num_clients, seed)
        self.alpha = _check_alpha(alpha, f"dir-a{alpha}")
        self.min_samples = _check_min_samples(min_samples, num_clients, self.num_samples)

    def _owners(self, rng: np.random.Generator) -> IntArray:
        K = self.num_clients
        owner = np.empty(self.num_samples, dtype=np.int64)
        expected = []  # per class, (K,) expected samples of each client under the draw
        for idx in _indices_by_class(self.labels):
            shares = rng.dirichlet(np.full(K, self.alpha))  # (K,)
            perm = rng.permutation(idx)
            owner[perm] = _owners_by_shares(len(perm), shares)
            expected.append(shares * len(idx))
        if _client_sizes(owner, K).min() >= self.min_samples:
            return owner
        return self._top_up(rng, owner, np.stack(expected, axis=1))

    def _top_up(
        self, rng: np.random.Generator, owner: IntArray, expected: npt.NDArray[np.float64]
    ) -> IntArray:
        """Move surplus samples to the clients short of ``min_samples`` (``expected``: K x C)."""
        K, m = self.num_clients, self.min_samples
        sizes = _client_sizes(owner, K)
        # Rank of each sample within its client in a seeded order: ranks >= m are surplus.
        order = rng.permutation(self.num_samples)
        order = order[np.argsort(owner[order], kind="stable")]  # by client, random within
        starts = np.cumsum(sizes) - sizes
        rank = np.empty(self.num_samples, dtype=np.int64)
        rank[order] = np.arange(self.num_samples) - np.repeat(starts, sizes)
        surplus = order[rank[order] >= m]  # in the seeded order
        classes = np.searchsorted(np.unique(self.labels), self.labels[surplus])
        pools = np.split(
            surplus[np.argsort(classes, kind="stable")],
            np.cumsum(np.bincount(classes, minlength=expected.shape[1]))[:-1],
        )
        taken = np.zeros(len(pools), dtype=np.int64)
        owner = owner.copy()
        for k in np.flatnonzero(sizes < m):  # Σ deficits <= Σ surplus because m·K <= N
            need = m - int(sizes[k])
            for c in np.argsort(-expected[k], kind="stable"):
                n = min(need, len(pools[c]) - int(taken[c]))
                owner[pools[c][taken[c] : taken[c] + n]] = k
                taken[c] += n
                need -= n
                if need == 0:
                    break
        return owner


@dataclass(frozen=True)
class _ClassDraw:
    """One held class of a ``patho`` draw.

    Attributes
    ----------
    position : int
        The class's position in ``PathologicalPartitioner.classes``.
    holders : ndarray
        ``(h,)`` ascending ids of the clients holding the class.
    perm : ndarray
        The class's sample indices in their drawn order.
    base : int
        Samples of the class dealt to each holder before the shares (``min_per_holder``,
        reduced when the class is too small).
    shares : ndarray
        ``(h,)`` Dir(α) shares of the rest among the holders.
    """

    position: int
    holders: IntArray
    perm: IntArray
    base: int
    shares: npt.NDArray[np.float64]


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

    Departure from the paper (which is silent on small clients): when this draw leaves a client
    with fewer than ``min_samples`` samples, each such client is given, from its own classes and
    right after the ``min_per_holder`` shares, the samples it lacks — how many from which class
    is a maximum flow from the short clients to their classes' remaining samples — and then
    every class's rest is cut by the same draw's shares, in the same shuffled order. Clients
    keep exactly their ``c`` classes. This succeeds whenever some split gives every holder its
    ``min_per_holder`` share and every client ``min_samples`` samples of its own classes;
    otherwise a ``ValueError`` names a group of clients whose classes are too small for them. A
    first draw that meets the minimum is kept as it is. ``min_samples`` defaults to 0 here (no
    minimum); :func:`partition` passes its own (the run's ``data.min_samples``).
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
        min_samples: int = 0,
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
        self.min_samples = _check_min_samples(min_samples, num_clients, self.num_samples)

    @property
    def spec(self) -> str:
        """The partition string, for messages."""
        return f"patho-c{self.classes_per_client}a{self.alpha:g}"

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

    def _owners(self, rng: np.random.Generator) -> IntArray:
        held = np.asarray(self.deal_classes(rng), dtype=np.int64)  # (K, c) class positions
        draw = self._draw_classes(rng, held)
        owner = self._assign(draw, {})
        if _client_sizes(owner, self.num_clients).min() >= self.min_samples:
            return owner
        return self._assign(draw, self._top_ups(draw, held))

    def _draw_classes(self, rng: np.random.Generator, held: IntArray) -> list[_ClassDraw]:
        """Shuffle each held class and draw its holders' shares (class by class, in order)."""
        flat = held.ravel()
        # Clients sorted by class, ascending within a class: O(K·c log(K·c)), no K x C scan.
        clients = np.repeat(np.arange(self.num_clients, dtype=np.int64), held.shape[1])
        holders_of = np.split(
            clients[np.argsort(flat, kind="stable")],
            np.cumsum(np.bincount(flat, minlength=len(self.classes)))[:-1],
        )
        sample_idx = _indices_by_class(self.labels)
        draw: list[_ClassDraw] = []
        for ci, holders in enumerate(holders_of):
            if len(holders) == 0:
                continue
            perm = rng.permutation(sample_idx[ci])
            base = min(self.min_per_holder, len(perm) // len(holders))
            shares = rng.dirichlet(np.full(len(holders), self.alpha))
            draw.append(_ClassDraw(ci, holders, perm, base, shares))
        return draw

    def _assign(
        self, draw: list[_ClassDraw], top_ups: dict[int, tuple[IntArray, IntArray]]
    ) -> IntArray:
        """Owners from ``draw``: per class the base, then ``top_ups``, then the shares.

        ``top_ups`` maps a class position to ``(clients, counts)``: extra samples of that class
        dealt to those clients before the rest is cut by the shares.
        """
        K = self.num_clients
        owner = np.full(self.num_samples, K, dtype=np.int64)
        for d in draw:
            start = d.base * len(d.holders)
            owner[d.perm[:start]] = np.repeat(d.holders, d.base)
            if d.position in top_ups:
                clients, counts = top_ups[d.position]
                end = start + int(counts.sum())
                owner[d.perm[start:end]] = np.repeat(clients, counts)
                start = end
            rest = d.perm[start:]
            owner[rest] = d.holders[_owners_by_shares(len(rest), d.shares)]
        return owner

    def _top_ups(
        self, draw: list[_ClassDraw], held: IntArray
    ) -> dict[int, tuple[IntArray, IntArray]]:
        """Per class, which short clients get how many extra samples (a maximum flow).

        Client ``k`` lacks ``d_k = max(0, min_samples - Σ base)`` samples after its
        ``min_per_holder`` shares; class ``i`` has ``left_i`` samples after all of them. The
        flow source → short client (capacity ``d_k``) → its classes → sink (capacity
        ``left_i``) saturates exactly when some split meets every client's minimum.

        Raises
        ------
        ValueError
            If no split gives every client ``min_samples`` on top of the ``min_per_holder``
            shares; the message names a group of clients whose classes hold too few samples.
        """
        from scipy.sparse.csgraph import maximum_flow

        C = len(self.classes)
        base = np.zeros(C, dtype=np.int64)  # per holder, per class position
        left = np.zeros(C, dtype=np.int64)
        for d in draw:
            base[d.position] = d.base
            left[d.position] = len(d.perm) - d.base * len(d.holders)
        deficit = np.maximum(self.min_samples - base[held].sum(axis=1), 0)  # (K,)
        short = np.flatnonzero(deficit)
        graph = _deficit_graph(deficit[short], held[short], left)
        result = maximum_flow(graph, 0, graph.shape[0] - 1, method="dinic")
        if int(result.flow_value) < int(deficit.sum()):
            raise ValueError(self._infeasible_message(graph - result.flow, short, held, draw))
        S = len(short)
        flow = result.flow[1 : S + 1, S + 1 : S + 1 + C].tocoo()  # short client x class
        keep = np.asarray(flow.data) > 0
        clients = short[np.asarray(flow.row)[keep]]
        classes = np.asarray(flow.col, dtype=np.int64)[keep]
        counts = np.asarray(flow.data, dtype=np.int64)[keep]
        order = np.lexsort((clients, classes))  # by class, then client
        clients, classes, counts = clients[order], classes[order], counts[order]
        cuts = np.flatnonzero(np.diff(classes)) + 1
        return {
            int(cls[0]): (cl, ct)
            for cls, cl, ct in zip(
                np.split(classes, cuts),
                np.split(clients, cuts),
                np.split(counts, cuts),
                strict=True,
            )
            if len(cls)
        }

    def _infeasible_message(
        self, residual: Any, short: IntArray, held: IntArray, draw: list[_ClassDraw]
    ) -> str:
        """Name the clients cut off by the minimum cut of a deficient flow (Hall's condition).

        The short clients reachable from the source in the residual graph, ``X``, hold only the
        reachable classes ``N(X)``, and ``min_samples·|X|`` exceeds what ``N(X)`` holds once the
        classes' other holders have their ``min_per_holder`` shares.
        """
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import breadth_first_order

        graph = csr_matrix(residual)
        graph.data = (np.asarray(graph.data) > 0).astype(np.int32)
        graph.eliminate_zeros()
        reached = np.asarray(
            breadth_first_order(graph, 0, directed=True, return_predecessors=False), np.int64
        )
        S = len(short)
        group = short[reached[(reached >= 1) & (reached <= S)] - 1]
        group.sort()
        classes = np.sort(reached[(reached > S) & (reached <= S + len(self.classes))] - S - 1)
        inside = np.bincount(held[group].ravel(), minlength=len(self.classes))
        by_position = {d.position: d for d in draw}
        total = sum(len(by_position[ci].perm) for ci in classes)
        others = sum(
            by_position[ci].base * (len(by_position[ci].holders) - int(inside[ci]))
            for ci in classes
        )
        m, p = self.min_samples, self.min_per_holder
        after = f" (after min_per_holder={p} for the classes' other holders)" if others else ""
        who = f"client {group[0]} holds" if len(group) == 1 else f"clients {_preview(group)} hold"
        return (
            f"{self.spec}: cannot give every client min_samples={m}: {who} only classes "
            f"[{_preview(self.classes[classes])}], which leave them {total - others} samples"
            f"{after}; they need {m * len(group)}; lower min_samples or num_clients, or raise c"
        )


def _deficit_graph(deficit: IntArray, held: IntArray, left: IntArray) -> Any:
    """Flow network: source → short client → its classes → sink, as a CSR matrix.

    Nodes are ``0`` (source), ``1..S`` (the ``S`` short clients, ``deficit`` and ``held`` rows
    in the same order), ``S+1..S+C`` (class positions) and ``S+C+1`` (sink).
    """
    from scipy.sparse import csr_matrix

    S, c = held.shape
    C = len(left)
    clients = 1 + np.arange(S)
    # A cut through a middle edge costs the whole deficit, more than any deficient flow: the
    # minimum cut of an infeasible problem then separates whole clients with all their classes.
    total = int(deficit.sum())
    rows = np.concatenate([np.zeros(S, np.int64), np.repeat(clients, c), 1 + S + np.arange(C)])
    cols = np.concatenate([clients, 1 + S + held.ravel(), np.full(C, 1 + S + C)])
    caps = np.concatenate([deficit, np.full(S * c, total), left]).astype(np.int32)
    graph = csr_matrix((caps, (rows, cols)), shape=(S + C + 2, S + C + 2))
    graph.eliminate_zeros()
    return graph


def _preview(values: npt.NDArray[np.integer[Any]], limit: int = 8) -> str:
    """``"3, 5, 9"`` or ``"1, 2, …, 8, … (40 in all)"`` for a message."""
    shown = ", ".join(str(int(v)) for v in values[:limit])
    more = f", … ({len(values)} in all)" if len(values) > limit else ""
    return shown + more


def partition(
    spec: str,
    labels: Labels | None,
    num_clients: int,
    seed: int,
    *,
    num_samples: int | None = None,
    min_samples: int = 2,
    min_per_holder: int = 1,
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
        ``dir`` and ``patho``: minimum samples per client, met by construction when the first
        draw misses it (see :class:`DirichletPartitioner`, :class:`PathologicalPartitioner`).
    min_per_holder : int
        ``patho`` only: minimum samples of a class given to each of its holders.

    Returns
    -------
    list of ndarray
        For each client, a sorted int64 array of sample indices; parts are disjoint and cover
        every sample (``patho`` leaves out the samples of classes with no holder).

    Raises
    ------
    ValueError
        Unknown ``spec``, inconsistent sizes, ``min_samples·num_clients > N``, or a ``patho``
        deal whose clients' classes cannot give each of them ``min_samples``.
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
            labels, num_clients, ps.alpha, seed, min_samples=min_samples
        ).split()
    assert ps.classes_per_client is not None
    return PathologicalPartitioner(
        labels,
        num_clients,
        ps.classes_per_client,
        ps.alpha,
        seed,
        min_per_holder=min_per_holder,
        min_samples=min_samples,
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
        hist = _class_histograms(parts, np.searchsorted(classes, lab), len(classes))  # (K, C)
        for entry, row, n in zip(
            clients, hist.tolist(), np.count_nonzero(hist, axis=1).tolist(), strict=True
        ):
            entry["num_classes"] = n
            entry["class_histogram"] = row
    out["clients"] = clients
    return out


def _class_histograms(parts: Sequence[IntArray], class_of: IntArray, C: int) -> IntArray:
    """``(K, C)`` samples of each class position per client, in one ``bincount``."""
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    client = np.repeat(np.arange(len(parts), dtype=np.int64), sizes)
    every = np.concatenate(parts) if len(parts) else np.empty(0, np.int64)
    flat = np.bincount(client * C + class_of[every], minlength=len(parts) * C)
    return flat.reshape(len(parts), C).astype(np.int64)
