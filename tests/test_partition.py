import hashlib
import json
import re

import numpy as np
import pytest

from raflora.data import (
    PARTITION_FORMS,
    DirichletPartitioner,
    IIDPartitioner,
    PartitionSpec,
    PathologicalPartitioner,
    parse_partition,
    partition,
    summarize_partition,
)


def balanced_labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each part must be sorted and duplicate-free"
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


def classes_per_client(parts: list[np.ndarray], labels: np.ndarray) -> list[int]:
    return [len(np.unique(labels[p])) for p in parts]


def digest(parts: list[np.ndarray]) -> str:
    """A short hash of a split: every client's size and indices, in client order."""
    h = hashlib.sha256()
    for p in parts:
        h.update(np.int64(len(p)).tobytes())
        h.update(np.ascontiguousarray(p, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def same_split(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


SPECS = ["iid", "dir-a0.5", "dir-a1", "patho-c3a1", "patho-c10a0.5"]


# ---------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iid", PartitionSpec("iid")),
        ("dir-a0.5", PartitionSpec("dir", alpha=0.5)),
        ("dir-a1", PartitionSpec("dir", alpha=1.0)),
        ("dir-a100", PartitionSpec("dir", alpha=100.0)),
        ("dir-a1e-2", PartitionSpec("dir", alpha=0.01)),
        ("dir-a.3", PartitionSpec("dir", alpha=0.3)),
        ("patho-c20a1", PartitionSpec("patho", alpha=1.0, classes_per_client=20)),
        ("patho-c5a0.1", PartitionSpec("patho", alpha=0.1, classes_per_client=5)),
    ],
)
def test_parse_accepts(spec: str, expected: PartitionSpec) -> None:
    assert parse_partition(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "IID",
        " iid",
        "iid ",
        "dir",
        "dir-a",
        "dir-a-1",
        "dir-0.5",
        "dir-ainf",
        "dir-anan",
        "dir-a0.5x",
        "patho-c5",
        "patho-c2.5a1",
        "patho-a1",
        "patho-c5a",
        "dirichlet-a0.5",
        "noniid",
    ],
)
def test_parse_rejects_unknown_forms_with_listing(spec: str) -> None:
    with pytest.raises(ValueError, match="accepted forms") as info:
        parse_partition(spec)
    for form in ("iid", "dir-a<alpha>", "patho-c<c>a<alpha>"):
        assert form in str(info.value)
    assert PARTITION_FORMS in str(info.value)


@pytest.mark.parametrize("spec", ["dir-a0", "dir-a0.0", "patho-c3a0", "dir-a0e5"])
def test_parse_rejects_nonpositive_alpha(spec: str) -> None:
    with pytest.raises(ValueError, match="alpha must be"):
        parse_partition(spec)


def test_parse_rejects_zero_classes() -> None:
    with pytest.raises(ValueError, match="c must be >= 1"):
        parse_partition("patho-c0a1")


def test_partition_rejects_bad_spec_without_fallback() -> None:
    with pytest.raises(ValueError, match="accepted forms"):
        partition("dir0.5", balanced_labels(4, 10), 2, seed=0)


# ---------------------------------------------------------------- coverage / determinism


@pytest.mark.parametrize("spec", SPECS)
def test_disjoint_and_complete(spec: str) -> None:
    labels = balanced_labels(10, 60)
    parts = partition(spec, labels, 12, seed=3)
    assert len(parts) == 12
    assert_disjoint_cover(parts, len(labels))


@pytest.mark.parametrize("spec", SPECS)
def test_same_seed_same_split_different_seed_differs(spec: str) -> None:
    labels = balanced_labels(10, 60)
    a = partition(spec, labels, 12, seed=7)
    b = partition(spec, labels, 12, seed=7)
    c = partition(spec, labels, 12, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("spec", SPECS)
def test_global_rng_untouched(spec: str) -> None:
    labels = balanced_labels(10, 60)
    np.random.seed(123)
    state = np.random.get_state()
    partition(spec, labels, 12, seed=0)
    after = np.random.get_state()
    assert state[0] == after[0]
    np.testing.assert_array_equal(state[1], after[1])
    assert state[2:] == after[2:]


def test_split_is_repeatable_on_one_instance() -> None:
    p = DirichletPartitioner(balanced_labels(5, 40), 6, alpha=0.5, seed=1)
    first, second = p.split(), p.split()
    assert all(np.array_equal(x, y) for x, y in zip(first, second, strict=True))


# ---------------------------------------------------------------- iid


def test_iid_sizes_balanced_and_label_free() -> None:
    parts = partition("iid", None, 7, seed=0, num_samples=100)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 100
    assert max(sizes) - min(sizes) <= 1
    assert_disjoint_cover(parts, 100)
    # random assignment, not contiguous blocks
    assert not all(np.array_equal(p, np.arange(p[0], p[0] + len(p))) for p in parts)


def test_iid_with_labels_matches_label_free() -> None:
    labels = balanced_labels(3, 20)
    with_labels = partition("iid", labels, 4, seed=5)
    without = partition("iid", None, 4, seed=5, num_samples=60)
    assert all(np.array_equal(x, y) for x, y in zip(with_labels, without, strict=True))


# ---------------------------------------------------------------- dirichlet


def test_dir_min_samples_respected() -> None:
    labels = balanced_labels(10, 100)
    unconstrained_violations = 0
    for seed in range(5):
        free = partition("dir-a0.2", labels, 30, seed=seed, min_samples=0)
        unconstrained_violations += min(len(p) for p in free) < 10
        parts = partition("dir-a0.2", labels, 30, seed=seed, min_samples=10)
        assert min(len(p) for p in parts) >= 10
        assert_disjoint_cover(parts, len(labels))
    assert unconstrained_violations > 0  # the minimum was actually enforced


def test_smaller_alpha_more_skew() -> None:
    labels = balanced_labels(10, 500)
    skewed = classes_per_client(partition("dir-a0.1", labels, 50, seed=0), labels)
    flat = classes_per_client(partition("dir-a100", labels, 50, seed=0), labels)
    assert np.mean(skewed) < 6.0
    assert np.mean(flat) == 10.0
    assert np.mean(skewed) < np.mean(flat)


def test_dir_meets_the_minimum_by_construction_when_the_draw_does_not() -> None:
    # N=2000, K=500, alpha=0.1: the first draw leaves clients empty, and resampling did not
    # reach the minimum in 1000 draws (ValueError before the construction existed).
    labels = balanced_labels(10, 200)
    assert min(len(p) for p in partition("dir-a0.1", labels, 500, seed=0, min_samples=0)) < 2
    parts = partition("dir-a0.1", labels, 500, seed=0, min_samples=2)
    assert min(len(p) for p in parts) >= 2
    assert_disjoint_cover(parts, len(labels))
    assert same_split(parts, partition("dir-a0.1", labels, 500, seed=0, min_samples=2))
    assert not same_split(parts, partition("dir-a0.1", labels, 500, seed=1, min_samples=2))


def test_dir_construction_keeps_the_draws_label_skew() -> None:
    # Beyond the dealt minimum, each class is cut by the draw's shares: with alpha=0.1 most of
    # a client's samples come from one class, unlike an iid split of the same sizes.
    labels = balanced_labels(10, 600)
    parts = partition("dir-a0.1", labels, 1000, seed=3, min_samples=4)
    assert min(len(p) for p in parts) >= 4
    top_share = np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])
    iid = partition("iid", labels, 1000, seed=3)
    iid_share = np.mean([np.bincount(labels[p]).max() / len(p) for p in iid])
    assert top_share > iid_share + 0.2


def test_dir_minimum_fills_the_data_exactly() -> None:
    # min_samples * K == N: every client gets exactly min_samples (old code gave up).
    parts = partition("dir-a0.01", balanced_labels(2, 10), 10, seed=0, min_samples=2)
    assert [len(p) for p in parts] == [2] * 10
    assert_disjoint_cover(parts, 20)


def test_dir_ten_thousand_clients_with_six_samples_each() -> None:
    # The scale of benchmarks/partition.py: 60,000 samples, 10,000 clients, min 2. The
    # first draw misses the minimum; resampling gave up after 1000 draws (~100 s).
    labels = balanced_labels(10, 6000)
    parts = partition("dir-a0.5", labels, 10_000, seed=0, min_samples=2)
    assert min(len(p) for p in parts) >= 2
    assert_disjoint_cover(parts, len(labels))


def test_dir_impossible_min_samples() -> None:
    with pytest.raises(ValueError, match="min_samples=5 is impossible"):
        DirichletPartitioner(balanced_labels(2, 10), 5, alpha=1.0, seed=0, min_samples=5)


# ---------------------------------------------------------------- pathological


@pytest.mark.parametrize(
    ("num_clients", "num_classes", "c", "per_class"),
    [(100, 100, 20, 30), (100, 20, 5, 60), (7, 5, 3, 20), (9, 4, 4, 20), (13, 6, 5, 30)],
)
def test_patho_exactly_c_classes_each_class_held(
    num_clients: int, num_classes: int, c: int, per_class: int
) -> None:
    labels = balanced_labels(num_classes, per_class)
    parts = partition(f"patho-c{c}a1", labels, num_clients, seed=2)
    assert classes_per_client(parts, labels) == [c] * num_clients
    assert_disjoint_cover(parts, len(labels))  # K*c >= #classes -> every class held


@pytest.mark.parametrize(
    ("num_clients", "num_classes", "c"),
    [(100, 100, 20), (100, 20, 5), (7, 5, 3), (13, 6, 5), (50, 10, 7), (30, 7, 6)],
)
def test_patho_dealing_is_balanced_and_distinct(num_clients: int, num_classes: int, c: int) -> None:
    for seed in range(5):
        p = PathologicalPartitioner(
            balanced_labels(num_classes, 5), num_clients, c, alpha=1.0, seed=seed
        )
        held = p.deal_classes(np.random.default_rng(seed))
        assert all(len(set(h)) == c for h in held)
        counts = np.bincount(np.concatenate(held), minlength=num_classes)
        assert counts.min() >= 1
        # cyclic dealing with skipped classes put back spreads holders evenly
        assert counts.max() - counts.min() <= 2


def test_patho_min_per_holder() -> None:
    labels = balanced_labels(20, 50)
    part = PathologicalPartitioner(labels, 40, 5, alpha=0.05, seed=4, min_per_holder=3)
    held = part.deal_classes(np.random.default_rng(4))
    parts = part.split()
    for k, classes in enumerate(held):
        counts = np.bincount(labels[parts[k]], minlength=20)
        assert all(counts[c] >= 3 for c in classes)


def test_patho_unheld_classes_left_unassigned() -> None:
    labels = balanced_labels(10, 20)
    parts = partition("patho-c2a1", labels, 3, seed=0)  # 3*2 < 10 classes
    assert classes_per_client(parts, labels) == [2, 2, 2]
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)
    assert len(np.unique(labels[allidx])) == 6
    assert len(allidx) == 6 * 20


def test_patho_meets_min_samples_by_construction() -> None:
    # c=1, alpha=0.1: each class's 40 samples go to its 8 holders, 1 each first and the rest by
    # skewed shares, so the draw leaves clients with 1 sample. Feasible: 40 >= 8 holders * 4.
    labels = balanced_labels(5, 40)
    part = PathologicalPartitioner(labels, 40, 1, alpha=0.1, seed=0, min_samples=0)
    assert min(len(p) for p in part.split()) < 4
    parts = partition("patho-c1a0.1", labels, 40, seed=0, min_samples=4)
    assert min(len(p) for p in parts) >= 4
    held = part.deal_classes(np.random.default_rng(0))
    assert [np.unique(labels[p]).tolist() for p in parts] == held  # own class only
    assert_disjoint_cover(parts, len(labels))
    assert same_split(parts, partition("patho-c1a0.1", labels, 40, seed=0, min_samples=4))


def test_patho_construction_keeps_min_per_holder_and_c_classes() -> None:
    labels = balanced_labels(20, 10)
    kwargs = {"alpha": 0.05, "seed": 1, "min_per_holder": 1}
    free = PathologicalPartitioner(labels, 60, 2, min_samples=0, **kwargs)  # type: ignore[arg-type]
    assert min(len(p) for p in free.split()) < 3
    part = PathologicalPartitioner(labels, 60, 2, min_samples=3, **kwargs)  # type: ignore[arg-type]
    parts = part.split()
    assert min(len(p) for p in parts) >= 3
    assert classes_per_client(parts, labels) == [2] * 60
    for p, classes in zip(parts, part.deal_classes(np.random.default_rng(1)), strict=True):
        assert np.bincount(labels[p], minlength=20)[classes].min() >= 1
    assert_disjoint_cover(parts, len(labels))


def test_patho_infeasible_minimum_names_the_clients_and_numbers() -> None:
    # Class 0 has 3 samples for its 2 holders (c=1): they cannot both get 2.
    labels = np.array([0] * 3 + [1] * 100)
    message = (
        r"patho-c1a1: cannot give every client min_samples=2: clients 0, 2 hold only classes "
        r"\[0\], which leave them 3 samples; they need 4; lower min_samples"
    )
    with pytest.raises(ValueError, match=message):
        partition("patho-c1a1", labels, 4, seed=0, min_samples=2)


def test_patho_impossible_min_samples() -> None:
    with pytest.raises(ValueError, match="min_samples=3 is impossible for 5 clients and 10"):
        partition("patho-c1a1", balanced_labels(2, 5), 5, seed=0, min_samples=3)


def _certificate(message: str) -> tuple[list[int], list[int], int]:
    """Clients, classes and total need named by an infeasibility message."""
    clients = re.search(r"clients? ([\d, ]+) holds? only", message)
    classes = re.search(r"classes \[([\d, ]+)\]", message)
    need = re.search(r"they need (\d+)", message)
    assert clients and classes and need, message
    as_ints = [[int(x) for x in m.group(1).split(", ")] for m in (clients, classes)]
    return as_ints[0], as_ints[1], int(need.group(1))


@pytest.mark.parametrize("seed", range(12))
def test_patho_splits_whenever_feasible(seed: int) -> None:
    # Small skewed problems: either every client gets min_samples (and every holder its
    # min_per_holder), or the error names clients whose classes provably cannot serve them.
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 25, 5)
    labels = np.repeat(np.arange(5), sizes)
    K, c, mph = int(rng.integers(4, 12)), int(rng.integers(1, 3)), 1
    m = min(int(rng.integers(2, 6)), len(labels) // K)
    part = PathologicalPartitioner(labels, K, c, 0.3, seed, min_samples=m, min_per_holder=mph)
    held = part.deal_classes(np.random.default_rng(seed))
    try:
        parts = part.split()
    except ValueError as err:
        group, classes, need = _certificate(str(err))
        assert need == m * len(group)
        assert all(set(held[k]) <= set(classes) for k in group)
        holders = np.bincount(np.concatenate(held), minlength=5)
        inside = np.bincount(np.concatenate([held[k] for k in group]), minlength=5)
        # Every other holder keeps min(mph, n // holders) of each class: what is left for the
        # group is less than it needs, so no split can meet the minimum.
        room = sum(
            sizes[ci] - min(mph, sizes[ci] // holders[ci]) * (holders[ci] - inside[ci])
            for ci in classes
        )
        assert room < need
        return
    assert min(len(p) for p in parts) >= m
    for p, own in zip(parts, held, strict=True):
        assert np.bincount(labels[p], minlength=5)[own].min() >= min(
            mph, *(sizes[ci] // np.bincount(np.concatenate(held))[ci] for ci in own)
        )


# Splits of today's code (before the construction) whose first draw met min_samples=2: they
# must stay bit-identical. (num_classes, per_class, K, spec, seed) -> digest.
PINNED = [
    ((10, 100, 20, "dir-a0.5", 1), "76b19c2de4122bd8"),
    ((10, 60, 12, "dir-a1", 7), "15c3635d8a2eb7df"),
    ((5, 200, 10, "dir-a0.1", 3), "1e6088a5df731afc"),
    ((10, 500, 50, "dir-a0.3", 11), "536b5399b9ba1951"),
    ((10, 100, 20, "patho-c2a1", 0), "cf59515e493668ba"),
    ((20, 50, 50, "patho-c3a0.5", 5), "9ef8aec01528a1d5"),
    ((5, 40, 10, "patho-c1a1", 2), "e8c19fdb919bfb3a"),
    ((10, 60, 12, "patho-c10a0.5", 3), "b9421039ac0cd209"),
    ((10, 60, 12, "iid", 4), "05b8793988d79c7c"),
]


@pytest.mark.parametrize(("setting", "expected"), PINNED)
def test_splits_that_met_the_minimum_are_unchanged(
    setting: tuple[int, int, int, str, int], expected: str
) -> None:
    num_classes, per_class, k, spec, seed = setting
    parts = partition(spec, balanced_labels(num_classes, per_class), k, seed, min_samples=2)
    assert digest(parts) == expected


def test_quickstart_split_unchanged() -> None:
    # configs/quickstart.yaml: digits, 50 clients, dir-a0.5, min_samples 2, seed 0.
    from raflora.engine import seeds
    from raflora.tasks.digits import digits_splits

    labels = digits_splits()["train"][1].numpy()
    parts = partition("dir-a0.5", labels, 50, seeds.partition_seed(0), min_samples=2)
    assert min(len(p) for p in parts) == 2  # the first draw just meets the minimum
    assert digest(parts) == "aad5e65decc0ca93"


def test_patho_c_too_large() -> None:
    with pytest.raises(ValueError, match=r"classes_per_client must be in \[1, 4\]"):
        partition("patho-c5a1", balanced_labels(4, 10), 2, seed=0)


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize("spec", ["dir-a0.5", "patho-c2a1"])
def test_label_based_spec_requires_labels(spec: str) -> None:
    with pytest.raises(ValueError, match=f"partition '{spec}' is label-based"):
        partition(spec, None, 2, seed=0, num_samples=10)


def test_iid_requires_size() -> None:
    with pytest.raises(ValueError, match="needs labels or num_samples"):
        partition("iid", None, 2, seed=0)


def test_num_samples_mismatch() -> None:
    with pytest.raises(ValueError, match="len\\(labels\\)=10"):
        partition("iid", [0] * 10, 2, seed=0, num_samples=11)


@pytest.mark.parametrize("k", [0, -3])
def test_num_clients_at_least_one(k: int) -> None:
    with pytest.raises(ValueError, match="num_clients must be >= 1"):
        IIDPartitioner(10, k, seed=0)


def test_num_clients_at_most_num_samples() -> None:
    with pytest.raises(ValueError, match=r"num_clients \(11\) must be <= num_samples \(10\)"):
        partition("dir-a1", balanced_labels(2, 5), 11, seed=0)


@pytest.mark.parametrize("bad", [[0.5, 1.0], [[0, 1], [1, 0]], []])
def test_bad_labels(bad: list[object]) -> None:
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D sequence of ints"):
        partition("dir-a1", bad, 1, seed=0)  # type: ignore[arg-type]


# ---------------------------------------------------------------- summary


def test_summary_is_json_and_consistent() -> None:
    labels = balanced_labels(5, 30)
    parts = partition("patho-c2a1", labels, 4, seed=0)
    s = summarize_partition(parts, labels)
    assert json.loads(json.dumps(s)) == s
    assert s["num_clients"] == 4
    assert s["classes"] == [0, 1, 2, 3, 4]
    assert s["num_assigned"] + s["num_unassigned"] == s["num_samples"] == 150
    for entry, p in zip(s["clients"], parts, strict=True):
        assert entry["num_samples"] == len(p)
        assert entry["class_histogram"] == np.bincount(labels[p], minlength=5).tolist()
        assert entry["num_classes"] == 2
        assert all(type(x) is int for x in entry["class_histogram"])


def test_summary_without_labels() -> None:
    parts = partition("iid", None, 3, seed=0, num_samples=10)
    s = summarize_partition(parts)
    assert s == {
        "num_clients": 3,
        "num_assigned": 10,
        "clients": [{"num_samples": len(p)} for p in parts],
    }
    assert sorted(c["num_samples"] for c in s["clients"]) == [3, 3, 4]
