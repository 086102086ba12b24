"""A complete method written outside raflora, registered under its own name, and a tiny run.

``prox-warmup`` is zero-padded FedAvg with two client-side changes:

* **server half** (:class:`ProxWarmup`): ``B_g = Σ_k p_k pad(B_k)``, ``A_g = Σ_k p_k pad(A_k)``
  with ``p_k = n_k / Σ_j n_j`` (HetLoRA's padding with sample weights), and the traffic it
  implies: during the warm-up a client uploads ``B`` only;
* **client half** (:class:`ProxWarmupRound`): for the first ``warmup_rounds`` rounds the clients
  train only ``B`` (``A`` stays at what they received, as in FFA-LoRA), and every step adds the
  proximal term ``μ/2 (‖B − B_0‖² + ‖A − A_0‖²)`` that keeps the factors near what the client was
  sent (FedProx on the factors).

It imports only raflora's public API. Run it::

    python examples/custom_method.py             # 2 rounds on the synthetic task
    python examples/custom_method.py --out DIR   # keep the run directory

The hooks it overrides, and every other one, are listed in ``examples/README.md``.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from raflora.config import config_from_dict
from raflora.engine import RunResult, run_local
from raflora.methods import (
    ClientRound,
    ClientUpdate,
    Method,
    MethodOptions,
    ModuleUpdates,
    RoundContext,
    option,
    register,
    sample_weights,
    tensor_bytes,
)

NAME = "prox-warmup"


@dataclass(frozen=True)
class ProxWarmupOptions(MethodOptions):
    """The method's options (``method_options`` of a run): typed, checked, listed by
    ``raflora config``.
    """

    warmup_rounds: int = option(1, "Rounds in which clients train only B.", ge=0)
    prox_mu: float = option(0.01, "Weight μ of the proximal term μ/2 ‖θ − θ_0‖².", ge=0)


def padded(t: Tensor, rank: int, dim: int) -> Tensor:
    """``t`` in float64, zero-padded to length ``rank`` along ``dim`` (-1: ``B``, -2: ``A``)."""
    missing = rank - t.shape[dim]
    pad = (0, missing) if dim == -1 else (0, 0, 0, missing)
    return F.pad(t.double(), pad)


def warming_up(method: ProxWarmup, round_index: int) -> bool:
    """Whether round ``round_index`` (1-based) is a warm-up round."""
    return round_index <= method.options.warmup_rounds


class ProxWarmupRound(ClientRound):
    """The client half: ``B`` only during the warm-up, and the proximal term every step."""

    method: ProxWarmup

    @property
    def trains(self) -> frozenset[str]:  # type: ignore[override]
        """``{"B"}`` during the warm-up, both factors after it."""
        return (
            frozenset({"B"}) if warming_up(self.method, self.round_index) else frozenset({"B", "A"})
        )

    @property
    def uses_penalty(self) -> bool:  # type: ignore[override]
        """Only when ``prox_mu > 0`` (the engine then calls :meth:`penalty` every step)."""
        return self.method.options.prox_mu > 0

    def penalty(self, live: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor | None:
        """``μ/2 Σ_modules (‖B − B_0‖² + ‖A − A_0‖²)`` on the live factors."""
        total = torch.zeros(())
        for name, (B, A) in live.items():
            B_0, A_0 = self.received.factors[name]
            term = ((B - B_0.to(B.dtype)) ** 2).sum() + ((A - A_0.to(A.dtype)) ** 2).sum()
            total = total.to(term.device) + term
        return 0.5 * self.method.options.prox_mu * total


@register
class ProxWarmup(Method):
    """The server half: zero-padded FedAvg of the factors; ``B``-only uploads in the warm-up."""

    name = NAME
    Options = ProxWarmupOptions
    ClientRoundType = ProxWarmupRound
    options: ProxWarmupOptions

    def aggregate_module(
        self,
        ctx: RoundContext,
        updates: ModuleUpdates,
        previous: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(Σ p_k pad(B_k), Σ p_k pad(A_k))``, ``(…, d, r_max)`` and ``(…, r_max, n)``."""
        p = sample_weights([n for _, _, n in updates], like=updates[0][0]).tolist()
        zero = updates[0][0].new_zeros((), dtype=torch.float64)  # sums in float64
        pairs = list(zip(p, updates, strict=True))
        B = sum((w * padded(B_k, self.r_max, -1) for w, (B_k, _, _) in pairs), zero)
        A = sum((w * padded(A_k, self.r_max, -2) for w, (_, A_k, _) in pairs), zero)
        dtype = updates[0][0].dtype
        return B.to(dtype), A.to(dtype)

    def upload_bytes(self, ctx: RoundContext, update: ClientUpdate) -> int:
        """``B`` only during the warm-up (``A`` comes back as it was sent), both after."""
        if warming_up(self, ctx.round_index):
            return tensor_bytes({name: B for name, (B, _) in update.factors.items()})
        return tensor_bytes(update.factors)


def tiny_config(**method_options: Any) -> Any:
    """Two rounds on the synthetic task: 6 clients of ranks 2, 4 and 8, 3 per round."""
    return config_from_dict(
        {
            "method": NAME,
            "method_options": method_options,
            "seed": 0,
            "task": {"name": "synthetic", "options": {"num_train": 300, "num_eval": 100}},
            "fl": {"num_clients": 6, "clients_per_round": 3, "rounds": 2, "rank_levels": [2, 4, 8]},
            "data": {"partition": "iid"},
            "train": {"lr": 1e-2, "batch_size": 32},
            "output": {"plots": False},
        }
    )


def run(out: Path, **method_options: Any) -> RunResult:
    """Run the tiny configuration into ``out`` (replacing a previous run there)."""
    return run_local(tiny_config(**method_options), out, progress=False, overwrite=True)


def main(argv: list[str] | None = None) -> None:
    """Run the example and print one line per round."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="run directory (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.out or Path(tmp) / NAME)
        for row in result.metrics:
            print(
                f"round {row['round']}: train_loss {row['train_loss']:.4f}, "
                f"accuracy {row.get('accuracy', float('nan')):.3f}, "
                f"upload {row['upload_bytes']} B"
            )


if __name__ == "__main__":
    main()
