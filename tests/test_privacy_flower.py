"""Client-level DP on the Flower engine (docs/privacy.md): the simulation equals the local engine
bit for bit (server noise, Poisson sampling, the ledger, epsilon in the rows), and under
``privacy.noise: client`` each ClientApp clips and noises its own update and the server only sums.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("dp_accounting")

from flwr.app import Array, ArrayRecord

from conftest import FLOWER_TINY
from raflora.config import RunConfig, load_config
from raflora.engine import load_checkpoint, run_local
from raflora.flower import run_flower
from raflora.flower.records import MalformedReplyError, decode_contribution, encode_contribution

TINY = [
    *FLOWER_TINY,
    "flower.cpus_per_client=1",
    "threads=1",
    "privacy.enabled=true",
    "privacy.noise_multiplier=0.8",
    "privacy.clip=0.5",
]
SKIP = {"time", "transport_bytes"}


pytestmark = pytest.mark.usefixtures("flower_env")


def tiny(method: str, *extra: str) -> RunConfig:
    return load_config(None, [*TINY, f"method={method}", *extra])


def both_engines(config: RunConfig, tmp_path: Path, **flower: object) -> tuple:
    threads = torch.get_num_threads()
    try:
        local = run_local(config, tmp_path / "local", progress=False)
        other = run_flower(config, tmp_path / "flower", progress=False, **flower)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)
    return local, other


def assert_same_release(local_dir: Path, flower_dir: Path) -> None:
    """The released global state and the privacy ledger, bit for bit."""
    ca, cb = load_checkpoint(local_dir), load_checkpoint(flower_dir)
    for name, (B, A) in ca.state.factors.items():
        assert torch.equal(cb.state.factors[name][0], B)
        assert torch.equal(cb.state.factors[name][1], A)
    for name, head in ca.state.dense.items():
        assert torch.equal(cb.state.dense[name], head)
    assert ca.privacy is not None and ca.privacy == cb.privacy  # z, C, δ, q and the ledger


@pytest.mark.parametrize(("method", "sampling"), [("raflora", "poisson"), ("ffa", "fixed")])
def test_server_noise_simulation_equals_local_engine(
    method: str, sampling: str, tmp_path: Path
) -> None:
    """Server noise from the server's stream, the same Poisson cohorts, ε in every row."""
    config = tiny(method, f"privacy.sampling={sampling}", "fl.rounds=4")
    local, flower = both_engines(config, tmp_path)
    strip = [{k: v for k, v in r.items() if k not in SKIP} for r in local.metrics]
    assert [{k: v for k, v in r.items() if k not in SKIP} for r in flower.metrics] == strip
    eps = [r["epsilon"] for r in flower.metrics]
    assert all(e is not None and e > 0 for e in eps) and eps == sorted(eps)  # it grows
    if sampling == "poisson":  # a cohort's size varies with Poisson sampling
        assert all(r["clients"] == sorted(r["clients"]) for r in flower.metrics)
    else:
        assert all(len(r["clients"]) == 2 for r in flower.metrics)
    assert flower.summary["privacy"] == local.summary["privacy"]
    assert_same_release(local.run_dir, flower.run_dir)


def test_client_noise_runs_in_the_clients_and_the_server_only_sums(tmp_path: Path) -> None:
    """``noise: client``: each ClientApp sends its clipped, noised pieces (no factors); the sums
    and so the release equal the local engine's, where the same function runs in-process.
    """
    config = tiny("raflora", "privacy.noise=client", "privacy.sampling=fixed")
    local, flower = both_engines(config, tmp_path)
    skip = SKIP | {"upload_bytes"}  # what travels up is the dense noised pieces, not factors
    strip = [{k: v for k, v in r.items() if k not in skip} for r in local.metrics]
    assert [{k: v for k, v in r.items() if k not in skip} for r in flower.metrics] == strip
    assert all(r["accepted"] == 2 for r in flower.metrics)
    assert_same_release(local.run_dir, flower.run_dir)
    # the upload is the public layout's float64 pieces: two partitions of d × n per module + heads
    state = load_checkpoint(flower.run_dir).state
    per_client = 8 * (
        2 * sum(d * n for d, n in state.module_shapes.values())
        + sum(h.numel() for h in state.dense.values())
    )
    assert all(r["upload_bytes"] == 2 * per_client for r in flower.metrics)


def loopback(config: RunConfig, run_dir: Path, faults: dict[int, str] | None = None) -> Path:
    """The ServerApp's strategy and the ClientApp in this process, without Ray or a transport:
    every message of a round goes through the ClientApp's handler (:func:`make_client_app`)
    and its reply through :meth:`RankStrategy.aggregate_train`, as in a deployment.
    """
    from flwr.app import Context, Error, Message, RecordDict

    from raflora.engine.run_files import finish_run, open_run
    from raflora.flower import RankStrategy
    from raflora.flower.app import make_client_app

    start = open_run(config, run_dir, resume=False)
    strategy = RankStrategy(start.fed, start.state, metrics=start.metrics, run_dir=run_dir)
    app = make_client_app(faults=faults)
    nodes = {k: 100 + k for k in range(config.fl.num_clients)}
    contexts = {
        node: Context(1, node, {"partition-id": k, "num-partitions": len(nodes)}, RecordDict(), {})
        for k, node in nodes.items()
    }
    for round_index in range(1, config.fl.rounds + 1):
        messages = strategy.prepare_round(nodes)
        replies = []
        for m in messages:
            try:
                replies.append(app(m, contexts[m.metadata.dst_node_id]))
            except Exception as err:  # what Flower does with a ClientApp that raises
                replies.append(Message(Error(code=0, reason=str(err)), reply_to=m))
        strategy.aggregate_train(round_index, replies)
    finish_run(strategy.fed, strategy.state, strategy.metrics, run_dir, 0.0)
    return run_dir


def rows(run_dir: Path, skip: set[str]) -> list[dict[str, object]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in skip} for x in lines]


@pytest.mark.parametrize(
    ("method", "noise", "sampling"),
    [
        ("raflora", "client", "fixed"),  # product space, rank partitions
        ("ffa", "client", "poisson"),  # factor space (B only)
        ("flexlora", "server", "poisson"),
    ],
)
@pytest.mark.usefixtures("server_identity")
def test_strategy_and_client_app_release_what_the_local_engine_does(
    method: str, noise: str, sampling: str, tmp_path: Path
) -> None:
    """The Flower halves (strategy + ClientApp, no Ray): the same cohorts, sums, noise, ledger
    and ε as the local engine; under ``noise: client`` the ClientApp sends only its noised
    pieces (float64, the round's whole public layout) and the server only sums them.
    """
    config = tiny(method, f"privacy.noise={noise}", f"privacy.sampling={sampling}")
    threads = torch.get_num_threads()
    try:
        local = run_local(config, tmp_path / "local", progress=False)
        flower_dir = loopback(config, tmp_path / "flower")
    finally:
        torch.set_num_threads(threads)
    skip = SKIP | ({"upload_bytes"} if noise == "client" else set())
    assert rows(flower_dir, skip) == rows(local.run_dir, skip)
    eps = [r["epsilon"] for r in rows(flower_dir, set())]
    assert all(isinstance(e, float) and e > 0 for e in eps) and eps == sorted(eps)
    assert_same_release(local.run_dir, flower_dir)
    if noise == "client":  # what travelled up: every piece of the layout, dense float64
        state = load_checkpoint(flower_dir).state
        pieces = (2 if method == "raflora" else 1) * sum(
            d * n if method == "raflora" else d * 8 for d, n in state.module_shapes.values()
        )
        per_client = 8 * (pieces + sum(h.numel() for h in state.dense.values()))
        for r in rows(flower_dir, set()):
            assert r["upload_bytes"] == per_client * len(r["clients"])  # type: ignore[arg-type]


@pytest.mark.usefixtures("server_identity")
def test_a_client_noise_reply_that_is_not_finite_is_left_out_loopback(tmp_path: Path) -> None:
    config = tiny("flexlora", "privacy.noise=client", "privacy.sampling=fixed")
    run_dir = loopback(config, tmp_path / "run", faults={0: "nan"})
    found = rows(run_dir, set())
    reasons = [v for r in found for v in r["rejected_reasons"].values()]  # type: ignore[attr-defined]
    sampled = sum(1 for r in found for k in r["clients"] if k == 0)  # type: ignore[attr-defined]
    assert sampled > 0 and len(reasons) == sampled
    # the client refuses to clip a diverged update (it sends nothing the server could sum)
    assert all("update norm is not finite" in v for v in reasons)


def test_decode_contribution_checks_the_layout() -> None:
    shapes = {"P4:m": (3, 2), "H:head": (2,)}
    good = {"P4:m": torch.randn(3, 2, dtype=torch.float64), "H:head": torch.zeros(2).double()}
    pieces = decode_contribution(encode_contribution(good), shapes, client_id=1, device="cpu")
    assert all(torch.equal(pieces[k], v) for k, v in good.items())
    with pytest.raises(MalformedReplyError, match="missing 'H:head'"):
        decode_contribution(
            encode_contribution({"P4:m": good["P4:m"]}), shapes, client_id=1, device="cpu"
        )
    with pytest.raises(MalformedReplyError, match="unexpected 'B:m'"):
        extra = {**good, "B:m": torch.zeros(3, 4).double()}
        decode_contribution(encode_contribution(extra), shapes, client_id=1, device="cpu")
    wrong = ArrayRecord()
    wrong["P4:m"] = Array.from_numpy_ndarray(np.zeros((2, 3)))
    wrong["H:head"] = Array.from_numpy_ndarray(np.zeros(2))
    with pytest.raises(MalformedReplyError, match=r"expected float64 \(3, 2\)"):
        decode_contribution(wrong, shapes, client_id=1, device="cpu")
    bad = {**good, "H:head": torch.tensor([math.inf, 0.0], dtype=torch.float64)}
    with pytest.raises(MalformedReplyError, match="not finite"):
        decode_contribution(encode_contribution(bad), shapes, client_id=1, device="cpu")
    with pytest.raises(MalformedReplyError, match="missing or not an ArrayRecord"):
        decode_contribution(None, shapes, client_id=1, device="cpu")
