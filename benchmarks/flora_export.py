"""FLoRA's export at scale: the SVD of every module's cumulative merged delta (issue: concurrent
clients, "FLoRA's export at scale").

For ``--modules`` modules of ``d × d`` (default 39 of 2048², a ~1B model's attention), times
:func:`raflora.engine.export.delta_svd` on three kinds of delta against the dense float64 SVD
the export used before (timed on ``--dense`` modules and scaled to all of them, since the full
dense run takes many minutes on a small CPU):

* **factored** — a sum of known low-rank factors (FLoRA's stacks over rounds, total rank
  ``rounds × clients × rank``): QR of the stacked factors + SVD of the small core (exact);
* **sketch** — the same delta stored dense in float32 (what ``base_delta`` holds), the whole
  export (``rank=None``): a Gaussian sketch doubled until its residual is negligible (exact to
  rounding);
* **randomized** — a full-rank dense delta (a longer run: total rank above ``d``) exported at
  ``--rank``: randomized SVD with oversampling and subspace iterations (approximate);
* **whole** — the same full-rank delta exported whole (``rank=None``, what a run writes at its
  end): the sketch finds the numerical rank past ``d / 2`` and the delta is carried as it is,
  ``(ΔW, I)``, with no dense SVD (exact bit for bit).

For each it prints the time for all modules, the projected dense time, the relative error of the
retained spectrum (``‖S − S*‖ / ‖S*‖`` over the singular values kept: all of the numerical rank,
or the top ``--rank``) and of the retained part (``‖M_r − M*_r‖_F / ‖M*_r‖_F``) against the
dense SVD on the first ``--dense`` modules, and the excess approximation error
``‖M − M_r‖_F / ‖M − M*_r‖_F − 1`` (0 for the best rank-``r`` approximation; on a flat spectrum
the top-``r`` subspace is barely determined, so the retained part can differ much from the
dense one while approximating ``M`` nearly as well).

    python benchmarks/flora_export.py [--modules 39] [--dim 2048] [--rounds 4] [--clients 10]
        [--client-rank 8] [--rank 64] [--dense 1]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch import Tensor

from raflora.engine.export import DeltaSVD, _delta_factors, _numerical_rank, delta_svd


def low_rank_sum(seed: int, dim: int, total_rank: int, chunk: int) -> tuple[Tensor, Tensor]:
    """Stacked factors of ``Σ_j B_j A_j`` in chunks of ``chunk`` (a client's rank), each
    scaled like a trained LoRA update; float32, as the state keeps them."""
    g = torch.Generator().manual_seed(seed)
    Bs, As = [], []
    for _ in range(0, total_rank, chunk):
        Bs.append(torch.randn(dim, chunk, generator=g) / chunk)
        As.append(torch.randn(chunk, dim, generator=g) / dim**0.5)
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)


def errors(
    out: DeltaSVD | tuple[Tensor, Tensor],
    M: Tensor,
    dense: tuple[Tensor, Tensor, Tensor],
    rank: int | None,
) -> tuple[float, float, float | None]:
    """Relative error of the retained spectrum and of the retained part, and the excess
    approximation error of a truncated export (``None`` for a whole one), against the dense SVD
    ``U, S, Vh`` of ``M``; ``out`` is an SVD or exact factors ``(B, A)`` of the whole delta
    (whose spectrum is then ``M``'s own)."""
    U, S, Vh = dense
    k = _numerical_rank(S) if rank is None else rank
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    if isinstance(out, DeltaSVD):
        spectrum = float((out.S[:k] - S[:k]).norm() / S[:k].norm())
        mine = (out.U[:, :k] * out.S[:k]) @ out.Vh[:k]
    else:
        spectrum = 0.0  # B A is M itself (checked by the caller)
        mine = out[0].double() @ out[1].double()
    if rank is None:  # nothing dropped but rounding: the excess is not defined
        return spectrum, float((mine - best).norm() / best.norm()), None
    M = M.double()
    excess = float((M - mine).norm() / (M - best).norm()) - 1
    return spectrum, float((mine - best).norm() / best.norm()), excess


def run_case(
    name: str,
    modules: int,
    dense_count: int,
    make: Callable[[int], tuple[Tensor | None, tuple[Tensor, Tensor] | None, Tensor]],
    rank: int | None,
    whole: bool = False,
) -> dict[str, object]:
    """Time ``delta_svd`` (``whole``: the adapter export's ``_delta_factors``) on every module
    and the dense SVD on the first ``dense_count``."""
    fast = dense = fast_cpu = dense_cpu = 0.0
    spectrum_err = part_err = 0.0
    excess_err: float | None = None
    exact = True
    for i in range(modules):
        delta, factors, M = make(i)
        t0, c0 = time.perf_counter(), time.process_time()
        out: DeltaSVD | tuple[Tensor, Tensor]
        if whole:
            assert delta is not None
            out = _delta_factors({"module": delta}, None)[0]["module"]
        else:
            out = delta_svd(delta, factors, rank)
        fast += time.perf_counter() - t0
        fast_cpu += time.process_time() - c0
        if isinstance(out, DeltaSVD):
            exact = exact and out.exact
        else:  # carried whole: exact when B A gives the delta back bit for bit
            exact = exact and torch.equal(out[0] @ out[1], M)
        if i < dense_count:
            t0, c0 = time.perf_counter(), time.process_time()
            reference = torch.linalg.svd(M.double(), full_matrices=False)  # the former route
            dense += time.perf_counter() - t0
            dense_cpu += time.process_time() - c0
            s_err, p_err, x_err = errors(out, M, reference, rank)
            spectrum_err, part_err = max(spectrum_err, s_err), max(part_err, p_err)
            if x_err is not None:
                excess_err = max(excess_err or 0.0, x_err)
    row: dict[str, object] = {
        "case": name,
        "rank": "numerical" if rank is None else rank,
        "seconds": round(fast, 2),
        "dense_seconds_projected": round(dense / dense_count * modules, 1),
        "speedup": round(dense / dense_count * modules / fast, 1),
        # CPU seconds of the process (all threads): steadier than wall time on a shared machine
        "cpu_seconds": round(fast_cpu, 2),
        "dense_cpu_seconds_projected": round(dense_cpu / dense_count * modules, 1),
        "exact": exact,
        "spectrum_rel_error": spectrum_err,
        "retained_part_rel_error": part_err,
        "excess_error": excess_err,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", type=int, default=39)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--client-rank", type=int, default=8)
    parser.add_argument("--rank", type=int, default=64, help="rank of the truncated export")
    parser.add_argument("--dense", type=int, default=1, help="modules the dense SVD is timed on")
    args = parser.parse_args()
    dim, chunk = args.dim, args.client_rank
    total = args.rounds * args.clients * chunk
    print(
        f"{args.modules} modules of {dim}x{dim}; low-rank deltas of total rank {total} "
        f"({args.rounds} rounds x {args.clients} clients x rank {chunk}); threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )

    def factored(i: int) -> tuple[None, tuple[Tensor, Tensor], Tensor]:
        B, A = low_rank_sum(i, dim, total, chunk)
        return None, (B, A), B.double() @ A.double()

    def sketch(i: int) -> tuple[Tensor, None, Tensor]:
        B, A = low_rank_sum(i, dim, total, chunk)
        delta = B @ A  # float32, as base_delta holds it
        return delta, None, delta

    def full_rank(i: int) -> tuple[Tensor, None, Tensor]:
        B, A = low_rank_sum(i, dim, 5 * dim // 4, chunk)  # a long run: total rank above d
        delta = B @ A
        return delta, None, delta

    rows = [
        run_case("factored", args.modules, args.dense, factored, None),
        run_case("sketch", args.modules, args.dense, sketch, None),
        run_case("randomized", args.modules, args.dense, full_rank, args.rank),
        run_case("whole", args.modules, args.dense, full_rank, None, whole=True),
    ]
    print()
    print(
        "| delta | exported rank | route time (s) | dense SVD (s, projected) | speed-up | "
        "exact | spectrum rel. error | retained part rel. error | excess error |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        excess = "—" if r["excess_error"] is None else f"{r['excess_error']:.1e}"
        print(
            f"| {r['case']} | {r['rank']} | {r['seconds']} | {r['dense_seconds_projected']} | "
            f"{r['speedup']}x | {r['exact']} | {r['spectrum_rel_error']:.1e} | "
            f"{r['retained_part_rel_error']:.1e} | {excess} |"
        )


if __name__ == "__main__":
    main()
