"""raflora.privacy.clipping: factored norms equal dense ones; clipping is a bound."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import randn
from raflora.privacy.clipping import (
    ClientUpdate,
    ProductDelta,
    clip_scale,
    clip_update,
    padded_difference,
    product_sq_norm,
    product_sq_norms,
)


def _delta(seed: int, d: int, n: int, r: int, r0: int) -> ProductDelta:
    return ProductDelta(
        randn(seed, d, r), randn(seed + 1, r, n), randn(seed + 2, d, r0), randn(seed + 3, r0, n)
    )


@given(
    d=st.integers(1, 12),
    n=st.integers(1, 12),
    r=st.integers(0, 6),
    r0=st.integers(0, 6),
    seed=st.integers(0, 10_000),
)
def test_factored_norm_equals_dense(d: int, n: int, r: int, r0: int, seed: int) -> None:
    delta = _delta(seed, d, n, r, r0)
    B, A, B0, A0 = delta
    dense = B @ A - B0 @ A0
    expected = float((dense * dense).sum())
    assert float(product_sq_norm(delta)) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_identical_start_and_end_has_zero_norm() -> None:
    B, A = randn(0, 7, 3), randn(1, 3, 5)
    assert float(product_sq_norm(ProductDelta(B, A, B, A))) == pytest.approx(0.0, abs=1e-12)


def test_batched_norms_equal_one_by_one() -> None:
    deltas = {
        "q": _delta(0, 6, 5, 2, 2),
        "k": _delta(10, 6, 5, 2, 2),  # same shapes as q: one batched call
        "v": _delta(20, 4, 9, 3, 1),
        "o": ProductDelta.from_zero(randn(30, 4, 2), randn(31, 2, 3)),
    }
    batched = product_sq_norms(deltas)
    assert batched.keys() == deltas.keys()
    for name, delta in deltas.items():
        dense = delta.dense()
        assert float(batched[name]) == pytest.approx(float((dense * dense).sum()), rel=1e-12)


def test_padded_difference() -> None:
    new, old = randn(0, 5, 2), randn(1, 5, 1)
    diff = padded_difference(new, old, 4, dim=-1)
    assert diff.shape == (5, 4)
    torch.testing.assert_close(diff[:, :1], new[:, :1] - old)
    torch.testing.assert_close(diff[:, 1:2], new[:, 1:2])
    assert not diff[:, 2:].any()
    with pytest.raises(ValueError, match="cannot pad"):
        padded_difference(new, old, 1, dim=-1)


def _update(scale: float) -> ClientUpdate:
    """A client update in every space: two product modules, a padded factor pair, a head."""
    return ClientUpdate(
        product={"m1": _delta(0, 8, 6, 2, 4), "m2": _delta(10, 5, 7, 4, 4)},
        factors={"f.B": padded_difference(randn(20, 6, 2), randn(21, 6, 2), 4, -1)},
        dense={"head.weight": randn(30, 3, 6), "head.bias": randn(31, 3)},
    ).scaled(scale)


def _dense_vector(update: ClientUpdate) -> torch.Tensor:
    """The update as one flat vector, products formed densely (the reference)."""
    parts = [d.dense().flatten() for _, d in sorted(update.product.items())]
    parts += [t.double().flatten() for _, t in sorted(update.factors.items())]
    parts += [t.double().flatten() for _, t in sorted(update.dense.items())]
    return torch.cat(parts)


def test_whole_update_norm_equals_dense() -> None:
    update = _update(1.0)
    assert update.norm() == pytest.approx(float(_dense_vector(update).norm()), rel=1e-12)


@pytest.mark.parametrize("clip", [0.1, 1.0, 25.0])
def test_a_client_scaled_by_1000_contributes_at_most_clip(clip: float) -> None:
    big = _update(1000.0)
    result = clip_update(big, clip)
    assert result.clipped
    assert result.norm == pytest.approx(float(_dense_vector(big).norm()), rel=1e-12)
    contribution = float(_dense_vector(result.update).norm())  # measured densely
    assert contribution <= clip * (1 + 1e-6)
    assert contribution == pytest.approx(clip, rel=1e-6)  # and it is not clipped more than needed
    # Clipping scales, it does not change direction.
    torch.testing.assert_close(
        _dense_vector(result.update), _dense_vector(big) * result.scale, rtol=1e-10, atol=1e-10
    )
    # The product pieces stay factored: s B A - s B0 A0.
    d = result.update.product["m1"]
    assert d.B.shape == big.product["m1"].B.shape and d.B0.shape == big.product["m1"].B0.shape


def test_small_update_passes_unchanged() -> None:
    small = _update(1e-3)
    result = clip_update(small, 1e3)
    assert not result.clipped and result.scale == 1.0
    assert result.update is small


def test_clip_scale() -> None:
    assert clip_scale(0.0, 1.0) == 1.0
    assert clip_scale(4.0, 2.0) == 0.5
    with pytest.raises(ValueError, match="clip"):
        clip_scale(1.0, 0.0)
    with pytest.raises(ValueError, match="diverged"):
        clip_scale(math.nan, 1.0)
