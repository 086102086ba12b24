"""Every random stream of a run, derived from the run's seed.

Why and how: docs/design.md#local-training-and-rounds.

Streams are *stateless*: each one is built from ``(seed, stream, round, client)`` through numpy's
``SeedSequence``, so nothing has to be carried between rounds. A resumed run, a run of another
method (``raflora compare``) and the Flower engine therefore see the same client ranks, the same
client sampling, the same data shuffling and the same initialisations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "client_init_generator",
    "client_noise_generator",
    "client_ranks",
    "count_noise_generator",
    "init_generator",
    "noise_generator",
    "numpy_stream",
    "partition_seed",
    "poisson_clients",
    "sample_clients",
    "shuffle_stream",
    "torch_seed",
    "torch_stream",
    "training_torch_seed",
]

# Stream identifiers: fixed forever (changing one changes every run's numbers).
_RANKS = 1
_SAMPLING = 2
_PARTITION = 3
_INIT = 4
_CLIENT_INIT = 5
_SHUFFLE = 6
_TORCH = 7
_NOISE = 8
_CLIENT_NOISE = 9
_COUNT_NOISE = 10


def _words(seed: int, *keys: int) -> list[int]:
    return [int(seed), *(int(k) for k in keys)]


def numpy_stream(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator for the stream named by ``keys`` under ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(_words(seed, *keys)))


def torch_seed(seed: int, *keys: int) -> int:
    """A 63-bit integer seed for the stream named by ``keys`` under ``seed``."""
    state = np.random.SeedSequence(_words(seed, *keys)).generate_state(1, dtype=np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def torch_stream(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for the stream named by ``keys`` under ``seed``."""
    generator = torch.Generator()
    generator.manual_seed(torch_seed(seed, *keys))
    return generator


def partition_seed(seed: int) -> int:
    """Seed handed to the data partitioner."""
    return torch_seed(seed, _PARTITION)


def init_generator(seed: int) -> torch.Generator:
    """Generator of the initial global state (``A_g`` at ``r_max``)."""
    return torch_stream(seed, _INIT)


def client_init_generator(seed: int, round_index: int, client_id: int) -> torch.Generator:
    """Generator of a client's fresh initialisation in a round (FLoRA)."""
    return torch_stream(seed, _CLIENT_INIT, round_index, client_id)


def shuffle_stream(seed: int, round_index: int, client_id: int) -> np.random.Generator:
    """Order of a client's local batches in a round."""
    return numpy_stream(seed, _SHUFFLE, round_index, client_id)


def training_torch_seed(seed: int, round_index: int, client_id: int) -> int:
    """Seed of torch's global RNG during a client's local training (dropout)."""
    return torch_seed(seed, _TORCH, round_index, client_id)


def client_ranks(
    seed: int, num_clients: int, levels: Sequence[int], probs: Sequence[float] | None
) -> list[int]:
    """Each client's fixed LoRA rank, drawn once from the rank levels
    (docs/methods.md#notation-and-the-lora-convention).

    Parameters
    ----------
    seed : int
        Run seed.
    num_clients : int
        ``K``.
    levels : Sequence[int]
        Rank levels.
    probs : Sequence[float] | None
        Probability of each level; ``None`` for uniform.
    """
    rng = numpy_stream(seed, _RANKS)
    p = None if probs is None else np.asarray(probs, dtype=np.float64) / float(sum(probs))
    drawn = rng.choice(np.asarray(levels, dtype=np.int64), size=num_clients, p=p)
    return [int(r) for r in drawn]


def sample_clients(seed: int, round_index: int, num_clients: int, per_round: int) -> list[int]:
    """The ``M`` clients of round ``round_index`` (uniform without replacement, sorted)."""
    rng = numpy_stream(seed, _SAMPLING, round_index)
    return sorted(int(k) for k in rng.choice(num_clients, size=per_round, replace=False))


def poisson_clients(seed: int, round_index: int, num_clients: int, rate: float) -> list[int]:
    """Round ``round_index``'s cohort under Poisson sampling (``privacy.sampling: poisson``):
    each client joins independently with probability ``rate`` (one uniform draw per client
    from the run's sampling stream); sorted, possibly empty.
    """
    rng = numpy_stream(seed, _SAMPLING, round_index)
    draws = rng.random(num_clients)
    return [int(k) for k in np.flatnonzero(draws < rate)]


def noise_generator(seed: int, round_index: int) -> torch.Generator:
    """The server's privacy noise of round ``round_index`` (``privacy.noise: server``,
    docs/privacy.md): a rerun adds the same noise.
    """
    return torch_stream(seed, _NOISE, round_index)


def client_noise_generator(seed: int, round_index: int, client_id: int) -> torch.Generator:
    """Client ``client_id``'s share of the privacy noise in round ``round_index``
    (``privacy.noise: client``).
    """
    return torch_stream(seed, _CLIENT_NOISE, round_index, client_id)


def count_noise_generator(seed: int, round_index: int) -> torch.Generator:
    """The noise on round ``round_index``'s unclipped count (adaptive clipping)."""
    return torch_stream(seed, _COUNT_NOISE, round_index)
