"""Flower transport: decoding onto a named device, the server's sample counts rule."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Message, RecordDict

from raflora.config import load_config
from raflora.engine import build_federation, train_client
from raflora.engine.client_round import ClientResult
from raflora.engine.federation import Federation
from raflora.flower import RankStrategy
from raflora.flower.records import (
    ARRAYS,
    METRICS,
    MalformedReplyError,
    SampleCountMismatchError,
    decode_arrays,
    decode_result,
    encode_arrays,
    encode_result,
)
from raflora.methods import ClientMessage

TINY = [
    "task.name=synthetic",
    "task.options={num_train: 400, num_eval: 200}",
    "fl.num_clients=4",
    "fl.clients_per_round=2",
    "fl.rounds=2",
    "fl.rank_levels=[4,8]",
    "output.plots=false",
    "method=raflora",
]


pytestmark = pytest.mark.usefixtures("server_identity")


@pytest.fixture(scope="module")
def fed() -> Federation:
    return build_federation(load_config(None, TINY))


def _train_reply(fed: Federation, message: Message) -> ClientResult:
    """What a client does with ``message``: decode it and train for real."""
    config = message.content["config"]
    received = decode_arrays(message.content[ARRAYS], device=fed.device)
    return train_client(
        fed,
        int(config["client-id"]),
        int(config["rank"]),
        ClientMessage(received.factors, received.extras),
        received.dense,
        int(config["round"]),
        float(config["lr"]),
    )


def _reply(message: Message, result: ClientResult) -> Message:
    arrays, metrics = encode_result(result)
    return Message(RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=message)


def test_decode_arrays_puts_every_tensor_on_the_given_device() -> None:
    B, A = torch.randn(6, 2), torch.randn(2, 5)
    head, base = torch.randn(3, 6), torch.randn(6, 5)
    record = encode_arrays({"m": (B, A)}, {"head": head}, {"m": base})
    on_meta = decode_arrays(record, device="meta")
    tensors = [*on_meta.factors["m"], on_meta.dense["head"], on_meta.base["m"]]
    assert [t.device.type for t in tensors] == ["meta"] * 4
    assert [tuple(t.shape) for t in tensors] == [(6, 2), (2, 5), (3, 6), (6, 5)]
    on_cpu = decode_arrays(record, device=torch.device("cpu"))
    assert torch.equal(on_cpu.factors["m"][0], B) and torch.equal(on_cpu.base["m"], base)


def test_decode_result_rejects_a_count_other_than_the_assigned_one(fed: Federation) -> None:
    strategy = RankStrategy(fed, fed.initial_state())
    message = strategy.prepare_round({k: 100 + k for k in range(4)})[0]
    client_id = int(message.content["config"]["client-id"])
    rank = int(message.content["config"]["rank"])
    result = _train_reply(fed, message)
    assigned = fed.num_samples(client_id)
    inflated = replace(result, update=replace(result.update, num_samples=10 * assigned))
    arrays, metrics = encode_result(inflated)
    with pytest.raises(SampleCountMismatchError, match=f"reports {10 * assigned} samples") as err:
        decode_result(
            arrays, metrics, client_id=client_id, rank=rank, num_samples=assigned, device="cpu"
        )
    assert isinstance(err.value, MalformedReplyError)  # every reply check is one family
    arrays, metrics = encode_result(result)
    decoded = decode_result(
        arrays, metrics, client_id=client_id, rank=rank, num_samples=assigned, device="meta"
    )
    assert decoded.update.num_samples == assigned
    assert all(B.device.type == "meta" for B, _ in decoded.update.factors.values())


def test_server_rejects_an_inflated_sample_count_and_counts_it(fed: Federation) -> None:
    strategy = RankStrategy(fed, fed.initial_state())
    messages = strategy.prepare_round({k: 100 + k for k in range(4)})
    honest, cheat = (_train_reply(fed, m) for m in messages)
    cheat_id = cheat.update.client_id
    inflated = replace(cheat, update=replace(cheat.update, num_samples=10**6))
    replies = [_reply(messages[0], honest), _reply(messages[1], inflated)]
    strategy.aggregate_train(1, replies)
    row = strategy.metrics[-1]
    assert row["accepted"] == 1 and row["rejected"] == 1
    reason = row["rejected_reasons"][str(cheat_id)]
    assert reason.startswith("sample count mismatch: reply reports 1000000 samples")
    assert str(fed.num_samples(cheat_id)) in reason


def test_server_decodes_replies_onto_its_own_device(fed: Federation) -> None:
    """A server on the ``meta`` device gets every reply tensor there (CPU stands in for CUDA)."""
    server = replace(fed, device=torch.device("meta"))
    strategy = RankStrategy(server, fed.initial_state())
    messages = strategy.prepare_round({k: 100 + k for k in range(4)})
    replies = [_reply(m, _train_reply(fed, m)) for m in messages]
    results, failures = strategy.collect(replies)
    assert not failures and len(results) == 2
    for result in results:
        update = result.update
        assert update.num_samples == fed.num_samples(update.client_id)
        tensors = [t for pair in update.factors.values() for t in pair]
        assert tensors and {t.device.type for t in tensors} == {"meta"}
