"""What a method's hooks are told besides their data, and what a method declares about itself.

Every hook of :class:`~raflora.methods.Method` and :class:`~raflora.methods.ClientRound` that
depends on *who* or *when* takes one :class:`RoundContext` as its first argument: a new piece of
information is one field here, not a signature change in every override. A context is frozen;
the engines derive the one for a client from the round's with :func:`dataclasses.replace`
(:meth:`RoundContext.for_client`).

A method declares what it needs from the engines and what they must enforce in one class
attribute, ``capabilities``, a :class:`Capabilities` (see ``examples/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

__all__ = ["Capabilities", "RoundContext"]


@dataclass(frozen=True)
class RoundContext:
    """Where in the federation a hook is called: the round, the client, and what the run offers.

    The method's options are not here: they are fixed for the run and typed per method, so a
    hook reads them from ``self.options`` (an ``ILoRAOptions`` for ILoRA …), which a field of
    one common type here could not give without a cast in every method.

    Attributes
    ----------
    round_index : int
        The 1-based round being run (Algorithm 1's ``t``); 0 before the first round
        (:meth:`~raflora.methods.Method.init_state`). In an evaluation, the round just aggregated.
    client_id : int or None
        The client the call is about; ``None`` in a server-wide call (aggregation, evaluation).
    rank : int
        The client's rank this round (``r_k``), or the rank level asked about (per-level
        evaluation, :meth:`~raflora.methods.Method.level_factors`); 0 in a call about no rank.
    client_ranks : tuple[int, ...]
        The declared rank of every client of the federation, indexed by client id (ILoRA's
        control variates count the clients holding each rank index); empty outside a federation.
    generator : torch.Generator or None
        The seeded generator of the call's random draws: the run's init stream in
        :meth:`~raflora.methods.Method.init_state`, the client's own stream in
        :meth:`~raflora.methods.Method.client_message` (FLoRA's fresh init); ``None`` where
        nothing may be drawn. Draw from it on the CPU so every device gets the same numbers.
    dtype : torch.dtype
        The dtype of the server state (float32 in every run).
    device : torch.device or str
        Where the server state lives (the run's device).
    base_weights : Callable[[], Mapping[str, Tensor]] or None
        Reads the current base weights, module → ``W (d, n)`` in ``dtype`` on ``device``
        (FLoRA's and FedEx-LoRA's merged residuals included). Present only when the method
        declares :attr:`Capabilities.reads_base_weights`: reading them copies every adapted
        weight, so no other method pays for it.
    """

    round_index: int = 0
    client_id: int | None = None
    rank: int = 0
    client_ranks: tuple[int, ...] = ()
    generator: torch.Generator | None = None
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    base_weights: Callable[[], Mapping[str, Tensor]] | None = None

    def for_client(
        self, client_id: int, rank: int, *, generator: torch.Generator | None = None
    ) -> RoundContext:
        """The context for client ``client_id`` training at ``rank`` (with its own
        ``generator``, if any), the rest as here.
        """
        return replace(self, client_id=client_id, rank=rank, generator=generator)

    def at_rank(self, rank: int) -> RoundContext:
        """The context asking about rank ``rank`` (no client: per-level evaluation, traffic)."""
        return replace(self, rank=rank)


@dataclass(frozen=True)
class Capabilities:
    """What a method declares about itself, in one place (``Method.capabilities``).

    The engines, the registry and the public API read these fields — never a method's name —
    to decide what to check and what to pass. The client half's switches (which factors train,
    a loss term, a gradient correction) are not here: they may change with the round or the
    options, so they live on the method's :class:`~raflora.methods.ClientRound`.

    Attributes
    ----------
    ranks_must_be_levels : bool
        Every client's rank must be one of the configured rank levels (raFLoRA's partitions
        come from the levels, Algorithm 1 lines 10–14); an update at another rank is rejected.
    single_rank_level : bool
        Every client must have the same rank (one rank level): FedIT's factor averaging is
        undefined otherwise. A run with several levels is refused before it starts.
    reads_base_weights : bool
        The method reads the base weights ``W_0`` (ILoRA's QR initialisation): the engines then
        put :attr:`RoundContext.base_weights` in every context they build.
    reports_residual_energy : bool
        Metrics rows also report the energy of the round's merged residual
        (``residual_higher_rank_energy``): FedEx-LoRA, whose global factors are not the residual.
    quantized_base : str
        What becomes of the method's merges into the base weights (FLoRA's, FedEx-LoRA's,
        ILoRA's base shift) over a quantised base (``task.quantization``, docs/quantization.md),
        which cannot take an exact merge: ``"residual"`` — each merge is kept as a float32
        residual beside the quantised layer, applied in its forward (exact, never re-quantised);
        ``"refuse"`` — a quantised run is refused before it starts. Moot for a method that never
        merges.
    """

    ranks_must_be_levels: bool = False
    single_rank_level: bool = False
    reads_base_weights: bool = False
    reports_residual_energy: bool = False
    quantized_base: Literal["residual", "refuse"] = "residual"
