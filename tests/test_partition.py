import json

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
    assert unconstrained_violations > 0  # the constraint actually forced resampling


def test_smaller_alpha_more_skew() -> None:
    labels = balanced_labels(10, 500)
    skewed = classes_per_client(partition("dir-a0.1", labels, 50, seed=0), labels)
    flat = classes_per_client(partition("dir-a100", labels, 50, seed=0), labels)
    assert np.mean(skewed) < 6.0
    assert np.mean(flat) == 10.0
    assert np.mean(skewed) < np.mean(flat)


def test_dir_gives_up_with_clear_message() -> None:
    labels = balanced_labels(2, 10)
    with pytest.raises(ValueError, match=r"increase alpha.*max_attempts"):
        partition("dir-a0.01", labels, 10, seed=0, min_samples=2, max_attempts=3)


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
