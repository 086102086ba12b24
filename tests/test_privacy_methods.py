"""Every method's private update: clipping is a bound, the noise is what it says, refusals.

For every registered method that declares a private update (``Method.private_rule``; the ones
that refuse are skipped with their reason, and HetLoRA and ILoRA also run with the options
under which they can be private), a client whose update is scaled ×1000 moves the noise-free sum
by at most ``C`` (measured on the dense sums), and the noise of the released mean has standard
deviation ``z C / m`` in each space (dense product, padded factors, heads).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from scipy.stats import chi2

from raflora.config import ConfigError, load_config
from raflora.methods import ClientUpdate, Method, RoundContext, available_methods, get_aggregator
from raflora.methods.flexlora import FlexLoRA
from raflora.methods.private import (
    PrivateRule,
    private_mean,
    private_shapes,
    private_update,
    private_weights,
)
from raflora.methods.registry import method_options_classes
from raflora.privacy import client_noise_std
from raflora.privacy.mechanism import client_contribution, noised_sums, sum_contributions

LEVELS = [2, 4, 8]
SHAPES = {"a.q": (10, 9), "a.v": (10, 9), "b.fc": (8, 12)}
HEAD = (3, 4)
CLIENT_RANKS = [2, 4, 8, 8, 2, 4]  # the federation: N = 6, public ranks
M = 3  # clients per round (q = 1/2)

PRIVATE_CASES: list[tuple[str, dict[str, Any]]] = [(m, {}) for m in available_methods()] + [
    ("hetlora", {"weighting": "samples"}),
    ("ilora", {"control_variates": False}),
]


def _method(name: str, options: dict[str, Any]) -> Method:
    levels = [4] if name == "fedit" else LEVELS
    return get_aggregator(name, levels, method_options_classes()[name](**options))


def _private_or_skip(name: str, options: dict[str, Any]) -> Method:
    method = _method(name, options)
    reason = method.privacy_refusal()
    if reason is not None:
        pytest.skip(f"{name} {options or ''} refuses privacy: {reason}")
    return method


def _state_and_updates(method: Method, round_index: int, big: int | None, seed: int = 0) -> Any:
    """A round-0 state, and trained updates of clients 0…2 (client ``big`` ×1000)."""
    g = torch.Generator().manual_seed(seed)
    ranks = [r if r <= method.r_max else method.r_max for r in CLIENT_RANKS]
    ctx = RoundContext(
        round_index=0, client_ranks=tuple(ranks), generator=torch.Generator().manual_seed(7)
    )
    if method.capabilities.reads_base_weights:
        base = {k: torch.randn(d, n, generator=g) for k, (d, n) in SHAPES.items()}
        ctx = RoundContext(
            round_index=0,
            client_ranks=tuple(ranks),
            generator=torch.Generator().manual_seed(7),
            base_weights=lambda: base,
        )
    state = method.init_state(ctx, SHAPES, {"head": torch.randn(*HEAD, generator=g)})
    # a non-zero B_g, so product deltas have both terms
    state.factors = {
        k: (B + 0.1 * torch.randn(B.shape, generator=g), A) for k, (B, A) in state.factors.items()
    }
    round_ctx = RoundContext(round_index=round_index, client_ranks=tuple(ranks))
    sent, updates = {}, []
    for k in range(M):
        rank = ranks[k] if method.capabilities.single_rank_level is False else method.r_max
        client_ctx = round_ctx.for_client(k, rank, generator=torch.Generator().manual_seed(100 + k))
        message = method.client_message(client_ctx, state)
        scale = 1000.0 if k == big else 1.0
        factors = {
            m: (
                B0 + scale * torch.randn(B0.shape, generator=g),
                A0 + scale * torch.randn(A0.shape, generator=g),
            )
            for m, (B0, A0) in message.factors.items()
        }
        head = state.dense["head"] + scale * torch.randn(*HEAD, generator=g)
        sent[k] = message.factors
        updates.append(ClientUpdate(k, rank, 10 + k, factors, {"head": head}))
    return round_ctx, state, sent, updates


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors.values()))


@pytest.mark.parametrize(("name", "options"), PRIVATE_CASES)
@pytest.mark.parametrize("round_index", [1, 2])
def test_a_client_scaled_1000x_moves_the_sum_by_at_most_the_clip(
    name: str, options: dict[str, Any], round_index: int
) -> None:
    method = _private_or_skip(name, options)
    clip = 0.7
    ctx, state, sent, updates = _state_and_updates(method, round_index, big=1)
    rule = method.private_rule(ctx)
    assert rule is not None
    shapes = private_shapes(rule, state, method.r_max)
    contributions = [
        client_contribution(
            private_update(rule, sent[u.client_id], u, state, method.r_max), clip, shapes
        )
        for u in updates
    ]
    with_big = sum_contributions(contributions, shapes)
    without = sum_contributions([c for k, c in enumerate(contributions) if k != 1], shapes)
    moved = _norm({k: with_big[k] - without[k] for k in shapes})
    assert contributions[1].clipped and contributions[1].norm > 100 * clip
    assert moved <= clip * (1 + 1e-6), (moved, clip)
    assert moved >= clip * (1 - 1e-6)  # clipped to the bound, not below it
    # the dense reference of the ×1000 client's whole update, measured without the mechanism
    u = updates[1]
    pieces: list[torch.Tensor] = []
    for m, (B, A) in u.factors.items():
        B0, A0 = sent[1][m]
        if rule.space == "product" and rule.partitions:
            prev = 0
            for h in rule.partitions:
                if h <= B.shape[-1]:
                    pieces.append(B[:, prev:h].double() @ A[prev:h].double())
                    pieces.append(-(B0[:, prev:h].double() @ A0[prev:h].double()))
                prev = h
        elif rule.space == "product":
            pieces.append(B.double() @ A.double() - B0.double() @ A0.double())
        else:
            if "B" in rule.factors:
                pieces.append(B.double() - B0.double())
            if "A" in rule.factors:
                pieces.append(A.double() - A0.double())
    pieces.append(u.dense["head"].double() - state.dense["head"].double())
    if not (rule.space == "product" and rule.partitions):
        dense_norm = math.sqrt(sum(float((p**2).sum()) for p in pieces))
        assert contributions[1].norm == pytest.approx(dense_norm, rel=1e-9)


def _noise_samples(
    method: Method, draws: int, *, client_noise: bool
) -> dict[str, list[torch.Tensor]]:
    """``draws`` releases of the same round with fresh noise, minus the noise-free release:
    per space, the noise of the released mean.
    """
    z, clip = 1.3, 0.5
    ctx, state, sent, updates = _state_and_updates(method, 1, big=None)
    rule = method.private_rule(ctx)
    assert rule is not None
    shapes = private_shapes(rule, state, method.r_max)
    # fixed sampling of M of N: q = M / N, every weight 1 / (q N) = 1 / M
    weights = private_weights(rule, shapes, CLIENT_RANKS, M / len(CLIENT_RANKS))
    privates = [private_update(rule, sent[u.client_id], u, state, method.r_max) for u in updates]
    clean = sum_contributions([client_contribution(p, clip, shapes) for p in privates], shapes)
    base, base_heads = private_mean(rule, state, clean, weights)
    out: dict[str, list[torch.Tensor]] = {"product": [], "factor": [], "head": []}
    for draw in range(draws):
        if client_noise:
            std = client_noise_std(z, clip, M)
            gens = [torch.Generator().manual_seed(10_000 * draw + k) for k in range(M)]
            sums = sum_contributions(
                [
                    client_contribution(p, clip, shapes, noise_std=std, generator=gen)
                    for p, gen in zip(privates, gens, strict=True)
                ],
                shapes,
            )
        else:
            sums = noised_sums(clean, z * clip, torch.Generator().manual_seed(draw))
        mean, heads = private_mean(rule, state, sums, weights)
        for m in SHAPES:
            if rule.space == "product":
                diff = mean[m][0].double() @ mean[m][1].double()
                diff = diff - base[m][0].double() @ base[m][1].double()
                out["product"].append(diff.flatten())
            else:
                for i, f in enumerate("BA"):
                    if f in rule.factors:
                        out["factor"].append((mean[m][i].double() - base[m][i].double()).flatten())
        out["head"].append((heads["head"].double() - base_heads["head"].double()).flatten())
    return {k: v for k, v in out.items() if v}


ALPHA = 1e-6
"""False-alarm rate of each variance test (two-sided chi-square on the pooled sample variance:
the tests below fail by chance with probability 1e-6 each; every draw is seeded, so a pass is
reproducible)."""


def _assert_std(samples: list[torch.Tensor], expected: float) -> None:
    x = torch.cat(samples)
    n = x.numel()
    # the noise has mean zero by construction: the statistic Σ x² / σ² is χ²(n) exactly
    stat = float((x**2).sum()) / expected**2
    lo, hi = chi2.ppf(ALPHA / 2, n), chi2.ppf(1 - ALPHA / 2, n)
    assert lo <= stat <= hi, (math.sqrt(float((x**2).mean())), expected, n)


@pytest.mark.parametrize(
    ("name", "options", "space"),
    [
        ("flexlora", {}, "product"),  # dense d × n per module
        ("hetlora", {"weighting": "samples"}, "factor"),  # padded factors
        ("ffa", {}, "factor"),  # B only
    ],
)
@pytest.mark.parametrize("client_noise", [False, True])
def test_the_noise_of_the_mean_has_std_z_c_over_m_in_every_space(
    name: str, options: dict[str, Any], space: str, client_noise: bool
) -> None:
    method = _private_or_skip(name, options)
    samples = _noise_samples(method, 40, client_noise=client_noise)
    expected = 1.3 * 0.5 / M
    _assert_std(samples[space], expected)
    _assert_std(samples["head"], expected)


def test_raflora_s_partitions_add_their_noise_over_their_own_denominators() -> None:
    """Every partition's sum is a dense ``d × n`` matrix noised with ``z C`` and divided by
    ``q N_h``; they add up in the product, so its noise std is ``z C √(Σ_h (q N_h)⁻²)`` — the
    few clients of the high partitions weigh most (docs/privacy.md, the known tension).
    """
    samples = _noise_samples(_method("raflora", {}), 40, client_noise=False)
    q = M / len(CLIENT_RANKS)
    covering = [sum(1 for r in CLIENT_RANKS if r >= h) for h in LEVELS]  # 6, 4, 2
    expected = 1.3 * 0.5 * math.sqrt(sum((q * n) ** -2 for n in covering))
    _assert_std(samples["product"], expected)
    _assert_std(samples["head"], 1.3 * 0.5 / M)


def test_a_wrong_noise_std_is_detected() -> None:
    """The variance test has power: noise 10% off is refused."""
    samples = _noise_samples(FlexLoRA(LEVELS), 40, client_noise=False)
    with pytest.raises(AssertionError):
        _assert_std(samples["product"], 1.1 * 1.3 * 0.5 / M)


def test_per_index_and_partition_weights_count_the_federation_s_clients() -> None:
    """``1 / (q N_j)``: raFLoRA's partition h over the clients of rank ≥ h, RBLA's index j over
    those of rank > j, everything else over all N; a piece nobody can reach weighs 0.
    """
    q = 0.5
    rule = PrivateRule.product(partitions=[2, 4, 8, 16])
    shapes = {"P2:m": (3, 3), "P4:m": (3, 3), "P8:m": (3, 3), "P16:m": (3, 3), "H:h": (2,)}
    w = private_weights(rule, shapes, CLIENT_RANKS, q)
    assert float(w["P2:m"]) == pytest.approx(1 / (q * 6))
    assert float(w["P4:m"]) == pytest.approx(1 / (q * 4))
    assert float(w["P8:m"]) == pytest.approx(1 / (q * 2))
    assert float(w["P16:m"]) == 0.0
    assert float(w["H:h"]) == pytest.approx(1 / (q * 6))
    rbla = PrivateRule.factor("BA", per_index=True)
    w = private_weights(rbla, {"B:m": (5, 8), "A:m": (8, 5)}, CLIENT_RANKS, q)
    expected = [1 / (q * c) for c in (6, 6, 4, 4, 2, 2, 2, 2)]
    assert w["B:m"].tolist() == pytest.approx(expected)
    assert w["A:m"].tolist() == pytest.approx(expected)


def test_a_method_that_declares_nothing_is_refused_with_a_clear_line() -> None:
    class Silent(FlexLoRA):
        name = "silent"

        def private_rule(self, ctx: RoundContext) -> PrivateRule | None:
            return None

    reason = Silent(LEVELS).privacy_refusal()
    assert reason == (
        "method 'silent' does not declare a private update (Method.private_rule; docs/privacy.md)"
    )


@pytest.mark.parametrize(
    ("method", "options", "words"),
    [
        ("fedex", {}, "fedex's residual"),
        ("lora-fair", {}, "lora-fair refines"),
        ("hetlora", {}, "sparsity weights"),
        ("hetlora", {"weighting": "samples", "self_pruning": True}, "self-pruning"),
        ("ilora", {}, "control variates"),
        ("raflora", {"empty_partition": "drop"}, "'drop' depends on which clients"),
    ],
)
def test_a_refused_method_stops_the_config_with_its_reason(
    method: str, options: dict[str, Any], words: str
) -> None:
    overrides = [
        f"method={method}",
        "privacy.enabled=true",
        "privacy.noise_multiplier=1.0",
        "fl.rank_levels=[2, 4, 8]",
    ]
    overrides += [f"method_options.{method}.{k}={v}" for k, v in options.items()]
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    lines = [p for p in info.value.problems if p.startswith("privacy:")]
    assert len(lines) == 1 and words in lines[0], info.value.problems
    assert "\n" not in lines[0]
