"""The Flower engine: same results as the local engine, failures left out, deployment."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from conftest import FLOWER_TINY
from raflora.config import RunConfig, load_config
from raflora.engine import build_federation, load_checkpoint, run_local
from raflora.engine.client_states import CLIENTS_DIR
from raflora.flower import RankStrategy, run_flower
from raflora.flower.records import ARRAYS, METRICS, encode_result
from raflora.methods import ClientMessage, available_methods
from raflora.methods.registry import unsupported_reason

ROOT = Path(__file__).resolve().parents[1]
TINY = FLOWER_TINY


pytestmark = pytest.mark.usefixtures("flower_env")


def tiny(method: str, *extra: str) -> RunConfig:
    return load_config(None, [*TINY, f"method={method}", "flower.cpus_per_client=1", *extra])


@pytest.mark.parametrize("method", ["raflora", "flexlora", "flora"])
def test_simulation_matches_local_engine(method: str, tmp_path: Path) -> None:
    config = tiny(method)
    local = run_local(config, tmp_path / "local", progress=False)
    flower = run_flower(config, tmp_path / "flower", progress=False)
    assert [r["clients"] for r in flower.metrics] == [r["clients"] for r in local.metrics]
    assert [r["client_ranks"] for r in flower.metrics] == [r["client_ranks"] for r in local.metrics]
    assert [r["accuracy"] for r in flower.metrics] == pytest.approx(
        [r["accuracy"] for r in local.metrics], abs=1e-6
    )
    assert all(r["accepted"] == 2 and r["rejected"] == 0 for r in flower.metrics)
    assert [set(r) for r in flower.metrics] == [set(r) for r in local.metrics]  # one schema
    ca, cb = load_checkpoint(local.run_dir), load_checkpoint(flower.run_dir)
    a, b = ca.state, cb.state
    # FLoRA merges into the base model: the server sends its base weights to the client processes
    assert ca.base_weights.keys() == cb.base_weights.keys()
    for name, weight in ca.base_weights.items():
        torch.testing.assert_close(cb.base_weights[name], weight, rtol=1e-5, atol=1e-6)
    assert a.factors.keys() == b.factors.keys()
    for name, (B, A) in a.factors.items():
        torch.testing.assert_close(b.factors[name][0], B, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.factors[name][1], A, rtol=1e-5, atol=1e-6)
    for name, head in a.dense.items():
        torch.testing.assert_close(b.dense[name], head, rtol=1e-5, atol=1e-6)
    # the same run directory as the local engine
    for path in ("config.yaml", "partition.json", "metrics.jsonl", "summary.json", "adapter"):
        assert (flower.run_dir / path).exists(), path
    assert flower.summary["adapter"] == local.summary["adapter"]


@pytest.mark.parametrize(
    "method", [m for m in available_methods() if unsupported_reason(m, [4, 8]) is None]
)
def test_one_thread_everywhere_gives_bit_identical_engines(method: str, tmp_path: Path) -> None:
    """Every method (client halves included) gives the local engine's numbers bit for bit."""
    threads = torch.get_num_threads()
    try:
        config = tiny(method, "threads=1")
        local = run_local(config, tmp_path / "local", progress=False)
        flower = run_flower(config, tmp_path / "flower", progress=False)
    finally:
        torch.set_num_threads(threads)
    # one row schema: the same keys in the same order whatever the engine (report.ROW_KEYS)
    assert [list(r) for r in flower.metrics] == [list(r) for r in local.metrics]
    # the Flower rows also record what the transport moved (beyond the algorithmic traffic);
    # the local engine serialises nothing
    assert all(r["transport_bytes"] > r["upload_bytes"] for r in flower.metrics)
    assert all(r["transport_bytes"] is None for r in local.metrics)
    skip = {"time", "transport_bytes"}
    strip = [{k: v for k, v in r.items() if k not in skip} for r in local.metrics]
    assert [{k: v for k, v in r.items() if k not in skip} for r in flower.metrics] == strip
    ca, cb = load_checkpoint(local.run_dir), load_checkpoint(flower.run_dir)
    a, b = ca.state, cb.state
    for name, (B, A) in a.factors.items():
        assert torch.equal(b.factors[name][0], B) and torch.equal(b.factors[name][1], A)
    assert all(torch.equal(w, cb.base_weights[k]) for k, w in ca.base_weights.items())
    assert_same_client_states(local.run_dir, flower.run_dir)


def assert_same_client_states(a: Path, b: Path) -> None:
    """The per-client state files of two runs (ILoRA's c_k): same names, same tensors."""
    files = sorted(p.name for p in (a / CLIENTS_DIR).glob("*.pt"))
    assert files == sorted(p.name for p in (b / CLIENTS_DIR).glob("*.pt"))
    for name in files:
        x = torch.load(a / CLIENTS_DIR / name, weights_only=True)
        y = torch.load(b / CLIENTS_DIR / name, weights_only=True)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


class StopRunError(Exception):
    pass


def test_flower_resumes_a_run_with_per_client_state_bit_identically(tmp_path: Path) -> None:
    """ILoRA with control variates and plain SGD: stopped after round 2, resumed on Flower (the
    server sends each client its c_k from the run directory), equal to an uninterrupted run."""
    threads = torch.get_num_threads()

    def stop_after_two(row: dict[str, object]) -> None:
        if row["round"] == 2:
            raise StopRunError

    try:
        config = tiny("ilora", "threads=1", "train.optimizer=sgd", "fl.rounds=4")
        full = run_local(config, tmp_path / "full", progress=False)
        with pytest.raises(StopRunError):
            run_local(config, tmp_path / "cut", progress=False, on_round=stop_after_two)
        assert any((tmp_path / "cut" / CLIENTS_DIR).iterdir())
        resumed = run_flower(config, tmp_path / "cut", resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    skip = {"time", "transport_bytes"}
    strip = [{k: v for k, v in r.items() if k not in skip} for r in full.metrics]
    assert [{k: v for k, v in r.items() if k not in skip} for r in resumed.metrics] == strip
    assert_same_client_states(full.run_dir, resumed.run_dir)


def test_failing_nan_and_inflating_clients_are_left_out(tmp_path: Path) -> None:
    config = tiny("raflora")
    faults = {0: "raise", 2: "inflate", 3: "nan"}
    result = run_flower(config, tmp_path / "run", progress=False, faults=faults)
    assert len(result.metrics) == config.fl.rounds
    sampled = {c for row in result.metrics for c in row["clients"]}
    assert set(faults) <= sampled  # every fault is exercised (clients 0, 2, 3 are sampled)
    for row in result.metrics:
        bad = {c for c in row["clients"] if c in faults}
        assert row["rejected"] == len(bad)
        assert row["accepted"] == len(row["clients"]) - len(bad)
        reasons = row["rejected_reasons"]
        assert set(reasons) == {str(c) for c in bad}
        if 0 in bad:
            assert "fault injection: client 0 raises" in reasons["0"]
        if 2 in bad:  # a client's word on its sample count is not taken
            assert reasons["2"].startswith("sample count mismatch: reply reports")
        if 3 in bad:
            assert "non-finite" in reasons["3"]
    state = load_checkpoint(result.run_dir).state
    assert all(
        torch.isfinite(B).all() and torch.isfinite(A).all() for B, A in state.factors.values()
    )
    assert math.isfinite(result.summary["final_accuracy"])


@pytest.mark.usefixtures("server_identity")
def test_aggregate_train_rejects_bad_replies_without_crashing() -> None:
    """Hand-built replies: an error, a malformed one, a missing one; no usable reply → unchanged."""
    from flwr.app import Error

    from raflora.engine import train_client

    config = tiny("raflora", "fl.clients_per_round=4")
    fed = build_federation(config)
    state = fed.initial_state()
    strategy = RankStrategy(fed, state)
    nodes = {k: 100 + k for k in range(4)}
    messages = strategy.prepare_round(nodes)
    assert [m.metadata.dst_node_id for m in messages] == [100, 101, 102, 103]
    by_node = {m.metadata.dst_node_id: m for m in messages}
    # client 0: a good reply, trained for real on the factors the message carries
    from raflora.flower.records import decode_arrays

    msg0 = by_node[100]
    received = decode_arrays(msg0.content[ARRAYS], device="cpu")
    cfg = msg0.content["config"]
    good = train_client(
        fed,
        0,
        int(cfg["rank"]),
        ClientMessage(received.factors),
        received.dense,
        1,
        float(cfg["lr"]),
    )
    arrays, metrics = encode_result(good)
    replies = [
        Message(RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=msg0),
        Message(Error(code=0, reason="boom"), reply_to=by_node[101]),
        # client 2: metrics only, no arrays
        Message(RecordDict({METRICS: MetricRecord({"client-id": 2})}), reply_to=by_node[102]),
        # client 3: never replies
    ]
    _, summary = strategy.aggregate_train(1, replies)
    row = strategy.metrics[-1]
    assert row["accepted"] == 1
    assert row["rejected"] == 3
    reasons = row["rejected_reasons"]
    assert "boom" in reasons["1"]
    assert reasons["2"].startswith("malformed reply")
    assert "no reply" in reasons["3"]
    assert summary is not None and summary["accepted"] == 1

    # round 2: every reply bad (wrong shapes) → the global state does not change
    before = {k: (B.clone(), A.clone()) for k, (B, A) in strategy.state.factors.items()}
    messages = strategy.prepare_round(nodes)
    bad_replies = []
    for m in messages:
        cid = int(m.content["config"]["client-id"])
        rank = int(m.content["config"]["rank"])
        wrong = {
            k: (torch.zeros(B.shape[0], rank + 1), A) for k, (B, A) in good.update.factors.items()
        }
        bad_arrays = ArrayRecord(
            {
                **{f"B/{k}": _arr(B) for k, (B, _) in wrong.items()},
                **{f"A/{k}": _arr(A) for k, (_, A) in wrong.items()},
            }
        )
        bad_metrics = MetricRecord(
            {
                "client-id": cid,
                "rank": rank,
                "num-samples": 10,
                "train-loss": 1.0,
                "steps": 1,
                "compute-seconds": 0.0,
                "seconds": 0.0,
            }
        )
        bad_replies.append(
            Message(RecordDict({ARRAYS: bad_arrays, METRICS: bad_metrics}), reply_to=m)
        )
    strategy.aggregate_train(2, bad_replies)
    assert strategy.metrics[-1]["accepted"] == 0
    assert strategy.metrics[-1]["rejected"] == len(messages)
    for name, (B, A) in before.items():
        torch.testing.assert_close(strategy.state.factors[name][0], B)
        torch.testing.assert_close(strategy.state.factors[name][1], A)


def _arr(t: torch.Tensor):  # type: ignore[no-untyped-def]
    from flwr.app import Array

    return Array.from_torch_tensor(t.contiguous())


@dataclass
class Deployment:
    """One TLS + SuperNode-authentication rehearsal (``scripts/flower_local.sh``) and its traces."""

    returncode: int
    output: str
    run_dir: Path
    workdir: Path
    pids: list[int]
    left_running: list[int]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """2 rounds over TLS with authenticated SuperNodes, after an unregistered SuperNode tried."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "flower-superlink").exists() or shutil.which("bash") is None:
        pytest.skip("flower-superlink is not installed")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    tmp_path = tmp_path_factory.mktemp("deployment")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "method: raflora\ntask:\n  name: synthetic\n  options: {num_train: 200, num_eval: 100}\n"
        "fl: {num_clients: 2, clients_per_round: 2, rounds: 2, rank_levels: [4, 8]}\n"
        "output: {plots: false}\n"
    )
    run_dir, workdir, pid_file = tmp_path / "run", tmp_path / "flower", tmp_path / "pids"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "RAFLORA_FLOWER_PIDS": str(pid_file),
        "RAFLORA_FLOWER_WORKDIR": str(workdir),
        "FLWR_HOME": str(workdir / "flwr-home"),
    }
    script = ROOT / "scripts" / "flower_local.sh"
    proc = subprocess.Popen(
        ["bash", str(script), "--check-unregistered", str(config), "2", str(run_dir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        out += "\n[the deployment run timed out]"
    finally:
        pids = [int(p) for p in pid_file.read_text().split()] if pid_file.exists() else []
        deadline = time.monotonic() + 10
        while (alive := [pid for pid in pids if _running(pid)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
    return Deployment(proc.returncode, out, run_dir, workdir, pids, alive)


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (killed, waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc here: it exists, that is all we know
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_deployment_over_tls_with_authenticated_supernodes(deployment: Deployment) -> None:
    """2 rounds: SuperLink (TLS, --enable-supernode-auth) + 2 registered SuperNodes; cleaned up."""
    assert deployment.returncode == 0, deployment.output[-4000:]
    assert "(TLS, SuperNode authentication)" in deployment.output
    assert deployment.pids and not deployment.left_running, deployment.left_running
    link_log = (deployment.workdir / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in link_log  # TLS, not plain HTTP
    for i in range(2):  # the registered SuperNodes got the work
        assert "Receiving: train message" in (deployment.workdir / f"supernode-{i}.log").read_text()
    rows = (deployment.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    assert all(json.loads(row)["accepted"] == 2 for row in rows)
    assert (deployment.run_dir / "summary.json").is_file()
    assert (deployment.run_dir / "adapter").is_dir()


@pytest.mark.slow
def test_supernode_with_an_unregistered_key_is_refused(deployment: Deployment) -> None:
    """The SuperLink refuses to activate it: it exits at once, before any message reaches it."""
    assert "SuperNode with an unregistered key refused" in deployment.output, deployment.output[
        -4000:
    ]
    node_log = (deployment.workdir / "unregistered.log").read_text()
    assert "Failed to activate SuperNode" in node_log
    assert "Receiving:" not in node_log  # no message (query or train) ever reached it
    link_log = (deployment.workdir / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in link_log
