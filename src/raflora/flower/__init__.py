"""The Flower engine: raflora's rounds across processes and machines.

See docs/flower.md and docs/design.md#layers.

- :class:`~raflora.flower.strategy.RankStrategy` — a Flower ``Strategy`` wrapping any raflora
  aggregator (each node gets its own rank's factors; heterogeneous replies are validated and
  aggregated by the local engine's :func:`~raflora.engine.server_round.complete_round`);
- :mod:`raflora.flower.app` — ``server_app`` and ``client_app`` (``flwr run`` entry points);
- :func:`~raflora.flower.simulation.run_flower` — the simulation engine (``raflora run CONFIG
  engine=flower``).

Importing this package imports ``flwr`` (the ``flower`` extra).
"""

from raflora.flower.simulation import num_supernodes, run_flower
from raflora.flower.strategy import RankStrategy

__all__ = ["RankStrategy", "num_supernodes", "run_flower"]
