"""The method API's client half and generic plumbing, driven by a test method that
uses every hook: extras both ways, per-client state, a gradient correction.

The method ``visits-test`` counts a client's rounds in its per-client state, uploads the count as
an extra that the server keeps in its state, checks the extra the server sent (the round), and
zeroes the gradient of ``A`` (so ``A`` must come back exactly as sent).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from conftest import config_with
from method_cases import SYNTHETIC, first_module
from raflora.engine import build_federation, load_checkpoint, run_local
from raflora.engine.checkpoint import CHECKPOINT_FILE, CheckpointError
from raflora.engine.client_round import train_client
from raflora.engine.client_states import CLIENTS_DIR, ClientStates
from raflora.methods import registry as methods_registry
from raflora.methods.base import ClientMessage, ClientRound, ClientUpload, Factors, GlobalState
from raflora.methods.context import RoundContext
from raflora.methods.flexlora import FlexLoRA
from raflora.methods.validation import ClientUpdate


class VisitsClientRound(ClientRound):
    corrects_gradients = True

    def correct_gradients(self, grads: Mapping[str, tuple[Tensor | None, Tensor | None]]) -> None:
        for _, grad_A in grads.values():
            assert grad_A is not None
            grad_A.zero_()

    def finish(self, trained: Factors) -> ClientUpload:
        sent = self.received.extras["round"]
        assert torch.equal(sent, torch.tensor([float(self.round_index)]))
        visits = (self.state or {}).get("visits", torch.zeros(1)) + 1
        return ClientUpload(trained, extras={"visits": visits.clone()}, state={"visits": visits})


class Visits(FlexLoRA):
    name = "visits-test"
    ClientRoundType = VisitsClientRound

    def client_message(self, ctx: RoundContext, state: GlobalState) -> ClientMessage:
        factors = self.client_factors(ctx, state)
        return ClientMessage(factors, {"round": torch.tensor([float(ctx.round_index)])})

    def upload_extra_shapes(
        self, ctx: RoundContext, state: GlobalState
    ) -> dict[str, tuple[int, ...]]:
        return {"visits": (1,)}

    def client_state_shapes(
        self, ctx: RoundContext, state: GlobalState
    ) -> dict[str, tuple[int, ...]]:
        return {"visits": (1,)}

    def finish_state(
        self,
        ctx: RoundContext,
        previous: GlobalState,
        state: GlobalState,
        accepted: Sequence[ClientUpdate],
    ) -> GlobalState:
        seen = dict(previous.extras.get("visits", {}))
        for update in accepted:
            seen[update.client_id] = int(update.extras["visits"].item())
        state.extras = {**state.extras, "visits": seen}
        return state


@pytest.fixture(autouse=True)
def _visits_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(methods_registry._REGISTRY, Visits.name, Visits)


def visits_config(**over: Any) -> Any:
    return config_with(SYNTHETIC, method="visits-test", **{"train.weight_decay": 0.0, **over})


def participation(metrics: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Client → the rounds it took part in."""
    out: dict[int, list[int]] = {}
    for row in metrics:
        for client in row["clients"]:
            out.setdefault(client, []).append(row["round"])
    return out


def client_files(run_dir: Path) -> dict[int, int]:
    """Client → the round in the name of its one state file."""
    files = sorted((run_dir / CLIENTS_DIR).glob("client-*.pt"))
    out = {}
    for path in files:
        client, round_index = path.name.removeprefix("client-").removesuffix(".pt").split(".r")
        assert int(client) not in out, f"two files for client {client}"
        out[int(client)] = int(round_index)
    return out


def test_per_client_state_is_kept_across_rounds_and_written_only_when_it_changes(
    tmp_path: Path,
) -> None:
    result = run_local(visits_config(), tmp_path, progress=False)
    rounds = participation(result.metrics)
    # one file per client that took part, written in the last round it took part in
    assert client_files(tmp_path) == {k: r[-1] for k, r in rounds.items()}
    store = ClientStates(tmp_path, rounds_done=4)
    for client, taken in rounds.items():
        state = store.get(client)
        assert state is not None and int(state["visits"].item()) == len(taken)
    # the uploaded extras reached the server's state (and its checkpoint)
    extras = load_checkpoint(tmp_path).state.extras
    assert extras["visits"] == {k: len(r) for k, r in rounds.items()}


def test_a_killed_run_resumes_with_the_checkpoints_client_states(tmp_path: Path) -> None:
    full = run_local(visits_config(), tmp_path / "full", progress=False)

    class StopRunError(Exception):
        pass

    def stop_after_two(row: dict[str, Any]) -> None:
        if row["round"] == 2:
            raise StopRunError

    cut = tmp_path / "cut"
    with pytest.raises(StopRunError):
        run_local(visits_config(), cut, progress=False, on_round=stop_after_two)
    # a round-3 file written before a kill that came before round 3's checkpoint
    torch.save({"visits": torch.full((1,), 99.0)}, cut / CLIENTS_DIR / "client-0.r3.pt")
    resumed = run_local(visits_config(), cut, resume=True, progress=False)
    strip = [{k: v for k, v in r.items() if k != "time"} for r in full.metrics]
    assert [{k: v for k, v in r.items() if k != "time"} for r in resumed.metrics] == strip
    assert client_files(cut) == client_files(tmp_path / "full")
    a, b = ClientStates(tmp_path / "full", rounds_done=4), ClientStates(cut, rounds_done=4)
    for client in client_files(cut):
        assert torch.equal(a.get(client)["visits"], b.get(client)["visits"])  # type: ignore[index]
    assert load_checkpoint(cut).state.extras == load_checkpoint(tmp_path / "full").state.extras


def test_the_gradient_correction_runs_before_the_optimizer_step() -> None:
    fed = build_federation(visits_config())
    state = fed.initial_state()
    message = fed.client_message(state, 0, 1)
    rank = fed.rank_of(state, 0)
    result = train_client(fed, 0, rank, message, state.dense, 1, 1e-2)
    B, A = first_module(result.update.factors)
    B_sent, A_sent = first_module(message.factors)
    assert torch.equal(A, A_sent)  # its gradient was zeroed: AdamW never moved it
    assert not torch.equal(B, B_sent)
    assert result.state is not None and float(result.state["visits"]) == 1.0


@pytest.mark.usefixtures("server_identity")
def test_flower_carries_extras_and_client_state_and_validates_them() -> None:
    pytest.importorskip("flwr")
    from flwr.app import Context, Message, RecordDict

    from raflora.flower import RankStrategy
    from raflora.flower import app as app_module
    from raflora.flower.records import ARRAYS, METRICS, decode_arrays, encode_arrays

    fed = build_federation(visits_config())
    strategy = RankStrategy(fed, fed.initial_state())
    nodes = {k: 100 + k for k in range(6)}

    def serve(message: Message) -> Message:
        """What the ClientApp's train handler answers on the node of ``message``."""
        pid = message.metadata.dst_node_id - 100
        context = Context(0, message.metadata.dst_node_id, {"partition-id": pid}, RecordDict(), {})
        return app_module._train(message, context, {})

    seen: dict[int, int] = {}
    for t in (1, 2, 3):
        messages = strategy.prepare_round(nodes)
        for m in messages:
            received = decode_arrays(m.content[ARRAYS], device="cpu")
            client = m.metadata.dst_node_id - 100
            assert torch.equal(received.extras["round"], torch.tensor([float(t)]))
            if client in seen:  # the server sends back the state the client returned last time
                assert float(received.state["visits"]) == seen[client]
            else:
                assert received.state == {}
        replies = [serve(m) for m in messages]
        for r in replies:
            state = decode_arrays(r.content[ARRAYS], device="cpu").state
            seen[r.metadata.src_node_id - 100] = int(state["visits"].item())
        strategy.aggregate_train(t, replies)
        row = strategy.metrics[-1]
        assert row["accepted"] == 3 and row["transport_bytes"] > 0
    assert strategy.state.extras["visits"] == seen

    # a reply whose per-client state has the wrong shape is left out, not kept
    messages = strategy.prepare_round(nodes)
    good = serve(messages[0])
    arrays = decode_arrays(good.content[ARRAYS], device="cpu")
    bad = encode_arrays(
        arrays.factors, arrays.dense, extras=arrays.extras, state={"visits": torch.zeros(2)}
    )
    forged = Message(
        RecordDict({ARRAYS: bad, METRICS: good.content[METRICS]}), reply_to=messages[0]
    )
    strategy.aggregate_train(4, [forged, *[serve(m) for m in messages[1:]]])
    reasons = strategy.metrics[-1]["rejected_reasons"]
    client = messages[0].metadata.dst_node_id - 100
    assert reasons[str(client)].startswith("invalid client state")
    assert strategy.state.extras["visits"][client] == seen[client]


def test_a_checkpoint_written_by_0_1_is_migrated_and_an_unknown_version_refused(
    tmp_path: Path,
) -> None:
    cfg = config_with(
        SYNTHETIC, method="hetlora", method_options={"self_pruning": True}, **{"fl.rounds": 2}
    )
    run_local(cfg, tmp_path, progress=False)
    path = tmp_path / CHECKPOINT_FILE
    data = torch.load(path, weights_only=True)
    extras = data["state"].pop("extras")
    data["state"]["client_ranks"] = {**extras.get("client_ranks", {}), 3: 1}  # 0.1 kept them here
    data["version"] = 1  # what raflora 0.1 wrote
    torch.save(data, path)
    migrated = load_checkpoint(tmp_path).state
    assert migrated.extras == {"client_ranks": data["state"]["client_ranks"]}
    assert "client_ranks" not in vars(migrated)
    data["version"] = 7
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="version 7"):
        load_checkpoint(tmp_path)
    json.dumps(migrated.extras)  # plain ints: printable, comparable


def test_an_unreadable_client_state_is_a_checkpoint_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / CLIENTS_DIR).mkdir()
    bad = tmp_path / CLIENTS_DIR / "client-3.r2.pt"
    bad.write_bytes(b"not a torch file")
    store = ClientStates(tmp_path, rounds_done=2)
    with pytest.raises(CheckpointError, match=r"client-3\.r2\.pt: cannot read client 3's state"):
        store.get(3)
    assert store.get(4) is None
