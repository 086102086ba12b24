"""Client-level differential privacy in the local engine: the glue between a round and the
mechanism (docs/privacy.md).

A private run (``privacy.enabled``) keeps a :class:`PrivacyRun` on its federation
(``fed.privacy``): the noise multiplier ``z`` (configured, or calibrated for ``fl.rounds``
before round 1 from ``privacy.target_epsilon``), the current clip norm ``C``, ``δ`` and the
:class:`~raflora.privacy.PrivacyLedger` of the rounds released, saved in every checkpoint so a
resumed run continues the same accounting. Per round:

1. **Sampling** (:func:`round_clients`): ``fixed`` keeps the run's uniform sample of ``m``
   clients without replacement; ``poisson`` lets each client join independently with
   ``q = clients_per_round / num_clients`` from the run's sampling stream. An empty Poisson
   cohort still releases the noised (zero) sums and is accounted: skipping it would make the
   release depend on the cohort's size, which the subsampled Gaussian analysis keeps secret.
2. **Budget** (:func:`check_budget`): with ``target_epsilon``, a round that would take ε past
   it is not run; :class:`PrivacyBudgetError` stops the run, the finished rounds are kept.
3. **Clients** (:func:`privatize_client`, one client, what a client process calls;
   :func:`privatize_results` for the round): validate the update, build ``U_k`` as the method
   declares it (:meth:`~raflora.methods.Method.private_rule`), clip it whole to ``C``, densify
   it, and under ``noise: client`` add the client's share ``N(0, (z C)² / m)`` (``m`` the
   round's cohort size) from its own seeded stream.
4. **Server** (:func:`aggregate_private`): sum the contributions, add ``N(0, (z C)²)`` from the
   server's seeded stream under ``noise: server``, divide by the data-independent ``q N_j`` and
   apply the method's rule to the noised mean (:mod:`raflora.methods.private`); adaptive
   clipping moves ``C`` (Andrew et al., NeurIPS 2021); the round is recorded in the ledger and
   its ``epsilon`` goes into the metrics row.

What the server logs besides the released state — the sampled clients, their training losses
and step counts, rejections, timings — is outside the guarantee (it is the operator's log).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from raflora.engine import seeds
from raflora.engine.errors import EngineError
from raflora.methods import ClientUpdate, GlobalState, InvalidUpdateError
from raflora.methods.base import ClientMessage
from raflora.methods.context import RoundContext
from raflora.methods.private import (
    PrivateRule,
    aggregate_mean,
    private_mean,
    private_shapes,
    private_update,
    private_weights,
)
from raflora.methods.state import AggregationResult
from raflora.privacy import (
    PrivacyLedger,
    adaptive_clip_update,
    calibrate_noise,
    client_noise_std,
    default_delta,
    epsilon,
    noised_unclipped_fraction,
    split_noise_multiplier,
)
from raflora.privacy.mechanism import (
    Contribution,
    client_contribution,
    noised_sums,
    sum_contributions,
)

if TYPE_CHECKING:
    from raflora.config import RunConfig
    from raflora.engine.client_round import ClientResult
    from raflora.engine.federation import Federation

__all__ = [
    "PrivacyBudgetError",
    "PrivacyRun",
    "aggregate_private",
    "check_budget",
    "privatize_client",
    "privatize_results",
    "round_clients",
    "start_privacy",
]

_FORMAT = 1
"""Version of :meth:`PrivacyRun.to_json`'s layout (in the checkpoint)."""


class PrivacyBudgetError(EngineError):
    """The next round would exceed ``privacy.target_epsilon``: the run stops before it."""


@dataclass
class PrivacyRun:
    """A private run's state across rounds (module docstring).

    Attributes
    ----------
    noise_multiplier : float
        ``z``: what the accountant sees every round.
    clip : float
        The clip norm ``C`` of the next round (moves under adaptive clipping).
    delta : float
        ``δ``.
    sample_rate : float
        ``q = clients_per_round / num_clients``.
    target_epsilon : float or None
        The budget, if any.
    ledger : PrivacyLedger
        The rounds released so far.
    """

    noise_multiplier: float
    clip: float
    delta: float
    sample_rate: float
    target_epsilon: float | None
    ledger: PrivacyLedger = field(default_factory=PrivacyLedger)

    def epsilon(self) -> float:
        """ε of the rounds released so far."""
        return self.ledger.epsilon(self.delta)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data for the checkpoint."""
        return {
            "format": _FORMAT,
            "noise_multiplier": self.noise_multiplier,
            "clip": self.clip,
            "delta": self.delta,
            "sample_rate": self.sample_rate,
            "target_epsilon": self.target_epsilon,
            "ledger": self.ledger.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PrivacyRun:
        """The run :meth:`to_json` saved."""
        if data.get("format") != _FORMAT:
            raise EngineError(f"unknown privacy state format {data.get('format')!r}")
        target = data["target_epsilon"]
        return cls(
            noise_multiplier=float(data["noise_multiplier"]),
            clip=float(data["clip"]),
            delta=float(data["delta"]),
            sample_rate=float(data["sample_rate"]),
            target_epsilon=None if target is None else float(target),
            ledger=PrivacyLedger.from_json(dict(data["ledger"])),
        )


def _count_noise_std(config: RunConfig) -> float:
    """``σ_b`` of adaptive clipping (default: the expected cohort size / 20, Andrew et al.)."""
    std = config.privacy.clip_count_noise_std
    return float(std) if std is not None else config.fl.clients_per_round / 20.0


def update_noise_multiplier(config: RunConfig, run: PrivacyRun) -> float:
    """The noise multiplier of the update sums: ``z``, or ``z_Δ`` when adaptive clipping spends
    part of it on the unclipped count (:func:`~raflora.privacy.split_noise_multiplier`).
    """
    if not config.privacy.adaptive_clip:
        return run.noise_multiplier
    return split_noise_multiplier(run.noise_multiplier, _count_noise_std(config))


def start_privacy(config: RunConfig, saved: Mapping[str, Any] | None = None) -> PrivacyRun | None:
    """The run's :class:`PrivacyRun`: ``None`` without ``privacy.enabled``, the one ``saved`` in
    the checkpoint on resume, else a new one (``z`` calibrated for ``fl.rounds`` when
    ``target_epsilon`` is set — before round 1).

    Raises
    ------
    EngineError
        ``saved`` is missing on a private resume, or adaptive clipping cannot split ``z``.
    """
    pv = config.privacy
    if not pv.enabled:
        return None
    if saved is not None:
        return PrivacyRun.from_json(saved)
    fl = config.fl
    q = fl.clients_per_round / fl.num_clients
    delta = pv.delta if pv.delta is not None else default_delta(fl.num_clients)
    if pv.noise_multiplier is not None:
        z = float(pv.noise_multiplier)
    else:
        assert pv.target_epsilon is not None  # one of the two: checked with the config
        try:
            z = calibrate_noise(
                pv.target_epsilon,
                q,
                fl.rounds,
                delta,
                sampling=pv.sampling,
                num_clients=fl.num_clients,
                accountant=pv.accountant,
            )
        except ValueError as err:
            raise EngineError(f"privacy.target_epsilon: {err}") from None
    ledger = PrivacyLedger(
        sampling=pv.sampling, accountant=pv.accountant, num_clients=fl.num_clients
    )
    run = PrivacyRun(z, float(pv.clip), delta, q, pv.target_epsilon, ledger)
    try:
        update_noise_multiplier(config, run)
    except ValueError as err:
        raise EngineError(f"privacy.adaptive_clip: {err}") from None
    return run


def round_clients(fed: Federation, round_index: int) -> list[int]:
    """The round's cohort: the run's uniform sample of ``m`` (the non-private and ``fixed``
    runs: :func:`~raflora.engine.seeds.sample_clients`, unchanged), or Poisson sampling.
    """
    cfg = fed.config
    if fed.privacy is None or cfg.privacy.sampling == "fixed":
        return seeds.sample_clients(
            fed.seed, round_index, cfg.fl.num_clients, cfg.fl.clients_per_round
        )
    return seeds.poisson_clients(fed.seed, round_index, cfg.fl.num_clients, fed.privacy.sample_rate)


def check_budget(fed: Federation, round_index: int) -> None:
    """Refuse to run round ``round_index`` when it would take ε past ``target_epsilon``.

    Raises
    ------
    PrivacyBudgetError
        With the ε it would reach; the rounds already finished stay in the run directory.
    """
    run = fed.privacy
    if run is None or run.target_epsilon is None:
        return
    rounds = run.ledger.rounds
    if all(r[0] == run.noise_multiplier and r[1] == run.sample_rate for r in rounds):
        # one (z, q) so far: the library composes the next round in one evaluation, where a
        # peek would rebuild the ledger first (each costs seconds under fixed sampling)
        ahead = epsilon(
            run.noise_multiplier,
            run.sample_rate,
            run.ledger.steps + 1,
            run.delta,
            sampling=run.ledger.sampling,
            num_clients=run.ledger.num_clients,
            accountant=run.ledger.accountant,
        )
    else:
        ahead = run.ledger.peek(run.noise_multiplier, run.sample_rate, run.delta)
    if ahead > run.target_epsilon * (1 + 1e-9):
        raise PrivacyBudgetError(
            f"privacy: round {round_index} would take epsilon to {ahead:.4g}, past "
            f"privacy.target_epsilon {run.target_epsilon:g} (delta {run.delta:.3g}); the run "
            f"stops with its {round_index - 1} finished round(s) kept"
        )


def _rule(fed: Federation, ctx: RoundContext) -> PrivateRule:
    rule = fed.aggregator.private_rule(ctx)
    if rule is None:  # refused with the config; a method changed under a running config
        raise EngineError(f"privacy: {fed.aggregator.privacy_refusal()}")
    return rule


def privatize_client(
    fed: Federation,
    state: GlobalState,
    round_index: int,
    update: ClientUpdate,
    sent: ClientMessage,
    cohort: int,
) -> Contribution:
    """Client ``update.client_id``'s contribution to round ``round_index``'s sums: its ``U_k``
    (from the factors it was ``sent``) clipped whole to ``C`` and densified, plus its noise
    share under ``noise: client`` (``cohort``: the round's number of sampled clients, ``m``).

    The one function a client process calls (the Flower client, later); the update must have
    passed :meth:`~raflora.methods.Method.validate`.
    """
    run = fed.privacy
    if run is None:
        raise EngineError("privatize_client: the run is not private")
    ctx = fed.context(round_index)
    rule = _rule(fed, ctx)
    r_max = fed.aggregator.r_max
    shapes = private_shapes(rule, state, r_max)
    upcast = replace(
        update,
        factors={k: (B.to(state.dtype), A.to(state.dtype)) for k, (B, A) in update.factors.items()},
        dense={k: v.to(state.dtype) for k, v in update.dense.items()},
    )
    u = private_update(rule, sent.factors, upcast, state, r_max)
    if fed.config.privacy.noise == "client":
        z = update_noise_multiplier(fed.config, run)
        std = client_noise_std(z, run.clip, max(cohort, 1))
        generator = seeds.client_noise_generator(fed.seed, round_index, update.client_id)
        return client_contribution(u, run.clip, shapes, noise_std=std, generator=generator)
    return client_contribution(u, run.clip, shapes)


def privatize_results(
    fed: Federation,
    state: GlobalState,
    round_index: int,
    results: Sequence[ClientResult],
) -> dict[int, Contribution | str] | None:
    """Every client result of the round made private (:func:`privatize_client`), client id →
    its contribution, or the reason its update was rejected; ``None`` for a run without privacy.
    """
    if fed.privacy is None:
        return None
    ctx = fed.context(round_index)
    out: dict[int, Contribution | str] = {}
    for result in results:
        update = result.update
        try:
            fed.aggregator.validate(state, update, ctx=ctx, wire_dtypes=fed.wire_dtypes)
        except InvalidUpdateError as err:
            out[update.client_id] = err.reason
            continue
        # what the client was sent (deterministic: FLoRA's fresh init is drawn from the
        # client's own stream, started afresh on every call)
        sent = fed.client_message(state, update.client_id, round_index)
        out[update.client_id] = privatize_client(
            fed, state, round_index, update, sent, len(results)
        )
    return out


def aggregate_private(
    fed: Federation,
    state: GlobalState,
    round_index: int,
    contributions: Mapping[int, Contribution | str],
    ctx: RoundContext,
) -> tuple[AggregationResult, dict[str, Any]]:
    """The round's release: the next state from the noised sums, and the metrics row's privacy
    entries (``epsilon`` after this round, ``delta``, ``noise_multiplier``, ``clip`` used).
    """
    run = fed.privacy
    if run is None:
        raise EngineError("aggregate_private: the run is not private")
    cfg = fed.config
    rule = _rule(fed, ctx)
    shapes = private_shapes(rule, state, fed.aggregator.r_max)
    accepted = {k: c for k, c in sorted(contributions.items()) if isinstance(c, Contribution)}
    rejected = {k: c for k, c in sorted(contributions.items()) if isinstance(c, str)}
    sums = sum_contributions(accepted.values(), shapes, state.device)
    z = update_noise_multiplier(cfg, run)
    if cfg.privacy.noise == "server":
        sums = noised_sums(sums, z * run.clip, seeds.noise_generator(fed.seed, round_index))
    weights = private_weights(rule, shapes, fed.client_ranks, run.sample_rate)
    mean, dense = private_mean(rule, state, sums, weights)
    outcome = aggregate_mean(fed.aggregator, ctx, state, mean, dense, tuple(accepted))
    outcome = replace(outcome, rejected=rejected)
    clip_used = run.clip
    if cfg.privacy.adaptive_clip:
        unclipped = sum(1 for c in accepted.values() if not c.clipped)
        fraction = noised_unclipped_fraction(
            unclipped,
            len(accepted),
            run.sample_rate * cfg.fl.num_clients,
            _count_noise_std(cfg),
            seeds.count_noise_generator(fed.seed, round_index),
        )
        run.clip = adaptive_clip_update(
            run.clip, fraction, cfg.privacy.clip_quantile, cfg.privacy.clip_learning_rate
        )
    run.ledger.record(run.noise_multiplier, run.sample_rate)
    eps = run.epsilon()
    row = {
        "epsilon": eps if math.isfinite(eps) else None,
        "delta": run.delta,
        "noise_multiplier": run.noise_multiplier,
        "clip": clip_used,
    }
    return outcome, row
