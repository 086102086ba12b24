"""Adapter slots: several clients' LoRA factors and heads on one frozen PEFT model, one pass.

A :class:`SlotGroup` holds up to ``K`` :class:`Slot` s — one per client being trained, not one
per rank: two clients of the same rank train in two slots. Each slot owns leaf parameters of its
own rank in PEFT's layout (``B (d, r_k)``, ``A (r_k, n)``; ``ΔW = s_k · B A`` with the client's
``s_k = α / r_k``, docs/methods.md#notation-and-the-lora-convention) and its own copy of the
trained heads (``modules_to_save``). While :meth:`SlotGroup.attached` is active, PEFT's own
adapters are switched off and a forward hook on every adapted layer adds, for each slot, its LoRA
term over its own rows of the batch; a hook on every head replaces its output by each slot's
head applied to that slot's rows. Rows never meet: a slot's parameters see only its client's
examples, so the gradient of the summed loss with respect to them is the gradient of that
client's own loss.

Mixed ranks (:data:`MODE`): slots that hold the same rank and the same number of rows sit side
by side in the group batch (the engine orders them so) and share one batched product per factor
(``torch.bmm`` over those slots), and a slot of another rank takes its own pair of products over
its own rows (``"buckets"``, the default). Two alternatives were measured against it:
``"segments"`` (one pair of products per slot, never batched) and ``"padded"`` (every slot's
factors zero-padded *at forward time* to the group's largest rank ``r_c`` and its rows to the
widest slot's, stacked, one ``bmm`` for all; the padded block of a stacked factor is a constant
whose gradient is exactly zero — the gradient of ``B``'s padded columns is a product with
``A``'s padded rows and the reverse — so no optimizer ever sees it,
``tests/test_concurrent_clients.py`` checks it). Measured (``benchmarks/concurrent_clients.py
--modes``, this project's 2-core CPU with nothing else running, float32, the client phase of a
round of 10 clients at K = 10, the modes interleaved in one process, the minimum over ≥ 2 s;
seconds, lower wins):

==========================================  ==========  ==========  ==========
torch threads 1 / 2                         buckets     segments    padded
==========================================  ==========  ==========  ==========
quickstart (digits ViT, width 64)           0.054/0.045 0.057/0.050 0.065/0.050
uniform: one rank level, IID sizes          0.049/0.036 0.058/0.050 0.047/0.034
BERT 6×384, batch 16 × 32 tokens            5.17/2.72   5.15/2.69   5.34/2.85
tiny Llama, batch 4                         0.133/0.075 0.137/0.078 0.132/0.071
==========================================  ==========  ==========  ==========

All three are exact: every client's upload comes out bit for bit as the sequential loop's on
this CPU (every method, two rounds of the synthetic federation; raFLoRA and FedRot, three rounds
of the digits ViT at K = 10), since zero rows and zero rank columns only add exact zeros to each
sum. No mode wins everywhere (within ~10% of each other outside the quickstart); ``"buckets"``
is the fastest on the quickstart's mixed ranks and close elsewhere, so it is the default.

Also measured on the quickstart and not kept: (1) the padded factors kept stacked *between*
steps (each slot's parameters views of one zero-padded stack per layer, the products and their
gradients in one autograd node per layer) — forward and backward no faster than ``"buckets"``
(53 against 51 ms a round), because padding every slot to rank 32 doubles the LoRA arithmetic of
a width-64 model; (2) one product per rank with the rows zero-padded to the rank's widest
client — 63 against 58 ms, the padding's copies costing more than the products they save; (3)
every slot's products in one autograd node per layer (the backward written out) — its Python
cost what autograd's own nodes cost; (4) padding ranks within a batch size (one product for the
slots of a row count) — 8-12% slower per layer; (5) the factors stored transposed (``A^T``,
``B^T``: no transposes in the graph) — 7% faster per layer, but not exact: MKL's product with a
contiguous operand and with a transposed view of the same values differ in the last bit for
long inner dimensions (1536), so uploads would drift from the sequential loop's.

Each slot's ``s_k`` multiplies its rows once per layer, in one product of the whole group's
LoRA output with a per-row scale (the same products as a multiplication per slot; in float16 and
bfloat16 computed in float32 and rounded back, as PEFT's multiplication by a Python float is).

The group batch is cut into its pieces with ``torch.split``, whose backward is one ``cat`` of the
pieces' gradients: a slice ``x[lo:hi]`` per piece would zero-fill a gradient as large as the whole
group batch for each piece and add them up (that cost 13% of a BERT group step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import Tensor, nn
from torch.func import functional_call

from raflora.adapters.factors import _canonical, _layer_map, adapter_name
from raflora.methods.base import Factors

__all__ = ["MODE", "Slot", "SlotGroup"]

MODE: Literal["buckets", "padded", "segments"] = "buckets"
"""How mixed ranks share a pass (see the module docstring for the measurement)."""


@dataclass
class Slot:
    """One client's adapter in a :class:`SlotGroup`.

    Attributes
    ----------
    rank : int
        The client's rank ``r_k``.
    scale : float
        Its LoRA scaling ``s_k`` (``α / r_k``, or ``α / sqrt(r_k)`` under rsLoRA).
    lora : dict[str, tuple[nn.Parameter, nn.Parameter]]
        Module → ``(B (d, r_k), A (r_k, n))`` in PEFT's layout, leaf parameters; a factor the
        client's method freezes this round does not require grad.
    heads : dict[str, dict[str, Tensor]]
        Head module → its tensors by parameter/buffer name (parameters trainable).
    """

    rank: int
    scale: float
    lora: dict[str, tuple[nn.Parameter, nn.Parameter]]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable tensor of the slot — factors (``A``, ``B`` per module, in the
        model's order, as PEFT's ``named_parameters`` lists them) then the heads.
        """
        out: list[nn.Parameter] = []
        for B, A in self.lora.values():
            out += [A, B]
        for tensors in self.heads.values():
            out += [t for t in tensors.values() if isinstance(t, nn.Parameter)]
        return out

    def factors(self) -> Factors:
        """Effective factors ``(s · B, A)``, detached float32 clones (as ``get_factors``)."""
        return {
            name: (
                B.detach().to(torch.float32) * self.scale,  # a new tensor: no clone needed
                A.detach().to(torch.float32, copy=True),
            )
            for name, (B, A) in self.lora.items()
        }

    def live_factors(self) -> Factors:
        """Effective factors ``(s · B, A)`` that keep the autograd graph (a method's penalty)."""
        return {name: (B * self.scale, A) for name, (B, A) in self.lora.items()}

    def dense(self) -> dict[str, Tensor]:
        """The head tensors in float32, keyed as :func:`~raflora.adapters.get_dense` keys them."""
        return {
            f"{module}.{key}": value.detach().to(torch.float32).clone()
            for module, tensors in self.heads.items()
            for key, value in tensors.items()
        }


def _base_weight(layer: LoraLayer) -> Tensor:
    """The frozen weight of an adapted layer: its device (a 4/8-bit weight is stored packed,
    so its shape is not the layer's, :func:`_base_shape`).
    """
    weight = layer.get_base_layer().weight
    assert isinstance(weight, Tensor)
    return weight


def _base_shape(layer: LoraLayer) -> tuple[int, int]:
    """``(d, n)`` of an adapted layer — output and input features, as PEFT records them (for a
    quantised base too, whose packed weight has another shape).
    """
    d, n = layer.out_features, layer.in_features
    if d is None or n is None:
        raise ValueError(f"{type(layer).__name__}: PEFT recorded no in/out features")
    return int(d), int(n)


def _scaled(delta: Tensor, scales: Callable[[torch.dtype], Tensor]) -> Tensor:
    """``delta · s`` as PEFT's ``lora_B(lora_A(x)) * scaling`` computes it with a Python float
    ``s``: in float32 and float64 the product in ``delta``'s dtype, in a lower precision the
    product in float32 rounded back. ``scales(dtype)``: the ``s`` of each row (broadcast over
    ``delta``) in ``dtype``.
    """
    if delta.dtype in (torch.float32, torch.float64):
        return delta * scales(delta.dtype)
    return (delta.float() * scales(torch.float32)).to(delta.dtype)


class _Layout:
    """Which rows of the current group batch belong to which slot (contiguous, in order)."""

    def __init__(self, slots: Sequence[Slot], rows: Sequence[int], device: torch.device) -> None:
        self.slots = list(slots)
        self.bounds: list[tuple[int, int]] = []
        lo = 0
        for count in rows:
            self.bounds.append((lo, lo + int(count)))
            lo += int(count)
        self.total = lo
        self.rank = max(s.rank for s in self.slots)
        self.scales = torch.tensor(
            [s.scale for s in self.slots], device=device, dtype=torch.float64
        ).view(-1, 1, 1)
        width = max(rows)
        self.width = width
        # runs of consecutive slots with the same rank and row count: one batched product each
        self.buckets: list[tuple[int, int, list[Slot]]] = []
        for slot, (a, b) in zip(self.slots, self.bounds, strict=True):
            last = self.buckets[-1] if self.buckets else None
            if (
                last is not None
                and last[2][0].rank == slot.rank
                and b - a == (last[1] - last[0]) // len(last[2])
            ):
                self.buckets[-1] = (last[0], b, [*last[2], slot])
            else:
                self.buckets.append((a, b, [slot]))
        # row counts for ``torch.split`` (not slices: see the module docstring)
        self.slot_rows = [b - a for a, b in self.bounds]
        self.bucket_rows = [hi - lo for lo, hi, _ in self.buckets]
        self.uniform = all(int(c) == width for c in rows)
        self._device = device
        self._row_scales: dict[tuple[int, torch.dtype], Tensor] = {}

    def row_scales(self, per_row: int, dtype: torch.dtype) -> Tensor:
        """``(total · per_row, 1)``: each row's ``s_k`` (its slot's), repeated over the
        ``per_row`` tokens of a row, in ``dtype``.
        """
        key = (per_row, dtype)
        if key not in self._row_scales:
            counts = torch.tensor([c * per_row for c in self.slot_rows])
            values = torch.tensor([s.scale for s in self.slots], dtype=torch.float64)
            self._row_scales[key] = (
                values.repeat_interleave(counts).view(-1, 1).to(device=self._device, dtype=dtype)
            )
        return self._row_scales[key]

    def padded_index(self) -> tuple[Tensor, Tensor]:
        """``(gather, scatter)`` for ``"padded"``: padded position ``(slot, i)`` ← row
        ``lo + i``, or the zero row appended at index ``total``; each row's padded position.
        """
        gather = torch.full((len(self.slots), self.width), self.total, dtype=torch.long)
        scatter = torch.empty(self.total, dtype=torch.long)
        for s, (a, b) in enumerate(self.bounds):
            gather[s, : b - a] = torch.arange(a, b)
            scatter[a:b] = torch.arange(s * self.width, s * self.width + b - a)
        return gather.flatten().to(self._device), scatter.to(self._device)


class SlotGroup:
    """Up to ``capacity`` client adapters on one PEFT model (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The ``PeftModel`` (its adapters' layers and heads are found through the adapter
        ``reference``, which every adapted layer carries).
    reference : str
        An existing adapter's name (the bank's ``r_max`` adapter).
    dropout : float
        LoRA dropout probability (applied to each slot's rows before ``A``, as PEFT does).
    """

    def __init__(self, model: nn.Module, reference: str, dropout: float = 0.0) -> None:
        self.model = model
        self.layers: dict[str, LoraLayer] = dict(_layer_map(model, reference))
        self.heads: dict[str, ModulesToSaveWrapper] = {
            _canonical(name): module
            for name, module in model.named_modules()
            if isinstance(module, ModulesToSaveWrapper) and reference in module.modules_to_save
        }
        self.dropout = float(dropout)
        self._layout: _Layout | None = None
        # what a slot's tensors are, looked up once: per layer (device, d, n, LoRA dtype), per
        # head tensor (device, dtype, whether it is a trained parameter)
        self._lora_specs = {
            name: (_base_weight(layer).device, *_base_shape(layer), self._lora_dtype(layer))
            for name, layer in self.layers.items()
        }
        self._head_specs: dict[str, dict[str, tuple[torch.device, torch.dtype, bool]]] = {}
        for module, wrapper in self.heads.items():
            own = dict(wrapper.original_module.named_parameters())
            self._head_specs[module] = {
                key: (ref.device, ref.dtype, key in own)
                for key, ref in wrapper.original_module.state_dict().items()
            }

    @classmethod
    def for_bank(cls, bank: Any) -> SlotGroup:
        """The group of an :class:`~raflora.adapters.AdapterBank`."""
        return cls(bank.model, adapter_name(bank.max_rank), bank.lora_dropout)

    def slot(
        self,
        rank: int,
        scale: float,
        factors: Mapping[str, tuple[Tensor, Tensor]],
        dense: Mapping[str, Tensor],
        trains: frozenset[str] = frozenset({"B", "A"}),
    ) -> Slot:
        """A new slot loaded with effective ``factors`` (``B ← B_eff / s`` as ``set_factors``
        does) and the heads ``dense`` (keys as ``get_dense``'s), in the model's dtype and device.
        """
        lora: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        for name, (device, d, n, dtype) in self._lora_specs.items():
            B_eff, A = factors[name]
            if tuple(B_eff.shape) != (d, rank) or tuple(A.shape) != (rank, n):
                raise ValueError(
                    f"slot of rank {rank}, module {name!r}: got B {tuple(B_eff.shape)} and "
                    f"A {tuple(A.shape)}"
                )
            B = (B_eff.to(device=device, dtype=torch.float32) / scale).to(dtype)
            # own copies (B / s is one): the optimizer updates them in place, and what was
            # received must stay as sent (a method reads it in finish: FedRot)
            A_own = A.to(device=device, dtype=dtype, copy=True)
            lora[name] = (
                nn.Parameter(B, requires_grad="B" in trains),
                nn.Parameter(A_own, requires_grad="A" in trains),
            )
        heads: dict[str, dict[str, Tensor]] = {}
        for module, specs in self._head_specs.items():
            tensors: dict[str, Tensor] = {}
            for key, (device, dtype, trained) in specs.items():
                value = dense[f"{module}.{key}"].to(device=device, dtype=dtype).clone()
                tensors[key] = nn.Parameter(value) if trained else value
            heads[module] = tensors
        return Slot(int(rank), float(scale), lora, heads)

    @staticmethod
    def _lora_dtype(layer: LoraLayer) -> torch.dtype:
        """The dtype of the layer's LoRA weights (those of its first adapter)."""
        first = next(iter(layer.lora_A.values()))
        assert isinstance(first, nn.Linear)
        return first.weight.dtype

    # ---------------------------------------------------------------- the grouped pass
    @contextmanager
    def attached(self) -> Iterator[None]:
        """PEFT's adapters off and the slot hooks on, for the duration of the block."""
        handles = []
        flags: list[tuple[Any, bool]] = []
        try:
            for name, layer in self.layers.items():
                flags.append((layer, bool(layer._disable_adapters)))
                layer._disable_adapters = True
                module = layer
                assert isinstance(module, nn.Module)
                handles.append(module.register_forward_hook(self._lora_hook(name)))
            for name, wrapper in self.heads.items():
                flags.append((wrapper, bool(wrapper._disable_adapters)))
                wrapper._disable_adapters = True
                handles.append(
                    wrapper.register_forward_hook(self._head_hook(name), with_kwargs=True)
                )
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, flag in flags:
                module._disable_adapters = flag
            self._layout = None

    @contextmanager
    def routing(self, slots: Sequence[Slot], rows: Sequence[int]) -> Iterator[None]:
        """The next forward passes see a batch of ``sum(rows)`` rows: ``rows[i]`` of them, in
        order, belong to ``slots[i]``.
        """
        device = _base_weight(next(iter(self.layers.values()))).device
        self._layout = _Layout(slots, rows, device)
        try:
            yield
        finally:
            self._layout = None

    def _current(self, x: Tensor) -> _Layout:
        layout = self._layout
        if layout is None:
            raise RuntimeError("a slot group's forward pass needs routing(): which rows are whose")
        if x.shape[0] != layout.total:
            raise RuntimeError(
                f"the batch has {x.shape[0]} rows, the slots' layout {layout.total}: a layer "
                "of this model does not keep the batch dimension first"
            )
        return layout

    def _lora_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            x = args[0]
            layout = self._current(x)
            if MODE == "padded":
                delta = self._padded(name, x, layout)
            elif MODE == "buckets":
                delta = self._buckets(name, x, layout)
            else:
                delta = self._segments(name, x, layout)
            return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))

        return hook

    def _dropped(self, x: Tensor) -> Tensor:
        # one draw over the whole group: every element is dropped independently with the same
        # probability, as a client's own dropout does (same distribution, not the same masks)
        return F.dropout(x, self.dropout, training=True) if self.dropout > 0 else x

    def _segments(self, name: str, x: Tensor, layout: _Layout) -> Tensor:
        x = self._dropped(x)
        parts = []
        for slot, rows in zip(layout.slots, torch.split(x, layout.slot_rows), strict=True):
            B, A = slot.lora[name]
            parts.append(F.linear(F.linear(rows.to(A.dtype), A), B) * slot.scale)
        return torch.cat(parts)

    def _buckets(self, name: str, x: Tensor, layout: _Layout) -> Tensor:
        x = self._dropped(x)
        # 2-D rows (tokens flattened), so each product is one ``mm``: ``F.linear`` on a 3-D
        # input adds a reshape and a view around the same ``mm`` (two more autograd nodes)
        inner, n = x.shape[1:-1], x.shape[-1]
        per_row = math.prod(inner)
        flat = x.reshape(-1, n)
        parts = []
        for (_, _, group), rows in zip(
            layout.buckets,
            torch.split(flat, [c * per_row for c in layout.bucket_rows]),
            strict=True,
        ):
            B, A = group[0].lora[name]
            if rows.dtype != A.dtype:
                rows = rows.to(A.dtype)
            if len(group) == 1:
                parts.append(F.linear(F.linear(rows, A), B))
                continue
            A_all = torch.stack([slot.lora[name][1] for slot in group])  # (S_b, r, n)
            B_all = torch.stack([slot.lora[name][0] for slot in group])  # (S_b, d, r)
            xs = rows.view(len(group), -1, n)  # (S_b, rows·tokens, n)
            out = torch.bmm(torch.bmm(xs, A_all.transpose(1, 2)), B_all.transpose(1, 2))
            parts.append(out.view(-1, out.shape[-1]))
        delta = torch.cat(parts) if len(parts) > 1 else parts[0]
        delta = _scaled(delta, lambda dtype: layout.row_scales(per_row, dtype))
        return delta.view(layout.total, *inner, delta.shape[-1])

    def _padded(self, name: str, x: Tensor, layout: _Layout) -> Tensor:
        r_c = layout.rank
        As, Bs = [], []
        for slot in layout.slots:
            B, A = slot.lora[name]
            pad = r_c - slot.rank
            As.append(F.pad(A, (0, 0, 0, pad)) if pad else A)  # (r_c, n): rows ≥ r_k are 0
            Bs.append(F.pad(B, (0, pad)) if pad else B)  # (d, r_c): columns ≥ r_k are 0
        A_all = torch.stack(As)  # (S, r_c, n)
        B_all = torch.stack(Bs)  # (S, d, r_c)
        x = self._dropped(x).to(A_all.dtype)
        inner = x.shape[1:-1]
        n, S = x.shape[-1], len(layout.slots)
        gather, scatter = layout.padded_index() if not layout.uniform else (None, None)
        if gather is None:
            xs = x.reshape(S, -1, n)
        else:
            extended = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
            xs = extended.index_select(0, gather).reshape(S, -1, n)
        out = torch.bmm(torch.bmm(xs, A_all.transpose(1, 2)), B_all.transpose(1, 2))
        out = _scaled(out, layout.scales.to)  # (S, rows·tokens, d), s_k per slot
        d = out.shape[-1]
        if scatter is None:
            return out.reshape(layout.total, *inner, d)
        return out.reshape(S * layout.width, *inner, d).index_select(0, scatter)

    def _head_hook(self, name: str) -> Any:
        def hook(
            module: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            output: Any,
        ) -> Tensor:
            x = args[0]
            layout = self._current(x)
            head = self.heads[name].original_module
            # an nn.Linear head is its own forward (F.linear), without functional_call's swap
            # of the module's tensors for each slot
            linear = type(head) is nn.Linear and len(args) == 1 and not kwargs
            parts = []
            for slot, rows in zip(layout.slots, torch.split(x, layout.slot_rows), strict=True):
                tensors = slot.heads[name]
                out = (
                    F.linear(rows, tensors["weight"], tensors.get("bias"))
                    if linear
                    else functional_call(head, tensors, (rows, *args[1:]), kwargs)
                )
                if not isinstance(out, Tensor):
                    raise TypeError(
                        f"head {name!r}: only modules that return one tensor can be trained "
                        f"per slot, got {type(out).__name__}"
                    )
                parts.append(out)
            return torch.cat(parts)

        return hook
