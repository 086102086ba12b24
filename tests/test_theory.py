"""Theorem 4.4 calculator: closed form by hand, Monte Carlo against closed form, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raflora.cli import main
from raflora.theory import (
    TheorySetup,
    add_simulation,
    assign_client_ranks,
    coverage,
    predict,
    simulate,
)

PAPER = TheorySetup((8, 16, 32, 48, 64), num_clients=100, per_round=10)


def test_closed_form_matches_hand_computed_values() -> None:
    result = predict(PAPER, rounds=3)
    tau = 90 / (10 * 99)
    h = {p: p * p + tau * p * (1 - p) for p in (1.0, 0.8, 0.6, 0.4, 0.2)}
    # coverage per partition: 100, 80, 60, 40, 20 of 100 clients
    assert result.p[7] == 1.0 and result.p[8] == 0.8 and result.p[16] == 0.6
    assert result.p[47] == 0.4 and result.p[48] == 0.2 and result.p[63] == 0.2
    assert result.q[8] == pytest.approx(h[0.8], rel=1e-12)
    assert result.q[8] == pytest.approx(0.6545454545, rel=1e-9)
    assert result.gamma == pytest.approx(h[0.8] / h[1.0], rel=1e-12)
    assert pytest.approx(56 / 8) == result.C
    # t = 1: tail energy 8 q(0.8) + 16 q(0.6) + 16 q(0.4) + 16 q(0.2) over 8 + that
    tail = 8 * h[0.8] + 16 * h[0.6] + 16 * h[0.4] + 16 * h[0.2]
    assert result.rounds[1]["predicted_flexlora"] == pytest.approx(tail / (8 + tail), rel=1e-12)
    assert result.rounds[0]["predicted_flexlora"] == pytest.approx(7 / 8)
    assert result.rounds[2]["bound"] == pytest.approx(7 * (h[0.8]) ** 2, rel=1e-12)
    for row in result.rounds:
        assert row["predicted_flexlora"] <= row["bound"] + 1e-12
        assert row["predicted_raflora"] == pytest.approx(7 / 8)  # beta = 1, carry: constant


def test_decay_init_and_beta() -> None:
    setup = TheorySetup((2, 4), num_clients=10, per_round=5, beta=0.5, init="decay")
    result = predict(setup, rounds=1)
    assert pytest.approx((1 / 3 + 1 / 4) / (1 + 1 / 2)) == result.C
    tau = 5 / (5 * 9)
    assert result.q[0] == pytest.approx(0.25 * 1.0)
    assert result.q[2] == pytest.approx(0.25 * (0.25 + tau * 0.25))
    # raFLoRA, carry: P(no sampled client has rank 4) = C(5, 5) / C(10, 5)
    p0 = 1 / math.comb(10, 5)
    assert result.q_raflora[3] == pytest.approx(0.25 * (1 - p0) + p0)


def test_rank_assignment_is_largest_remainder() -> None:
    assert assign_client_ranks([8, 16], [0.5, 0.5], 4) == [8, 8, 16, 16]
    ranks = assign_client_ranks([1, 2, 3], [0.34, 0.33, 0.33], 10)
    assert sorted(ranks) == [1, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert coverage([1, 2, 2, 4], 4).tolist() == [1.0, 0.75, 0.25, 0.25]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank_levels": (16, 8)}, "strictly increasing"),
        ({"rank_levels": (8, 8, 16)}, "strictly increasing"),
        ({"per_round": 200}, "cannot exceed"),
        ({"probs": (0.5, 0.4, 0.0, 0.0, 0.0)}, "sum to 1"),
        ({"probs": (0.5, 0.5)}, "2 probabilities"),
        ({"beta": 0.0}, "beta"),
    ],
)
def test_invalid_setups(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "rank_levels": (8, 16, 32, 48, 64),
        "num_clients": 100,
        "per_round": 10,
    }
    with pytest.raises(ValueError, match=message):
        TheorySetup(**{**base, **kwargs})  # type: ignore[arg-type]


SMALL = TheorySetup((2, 4, 6), num_clients=12, per_round=4)


def test_monte_carlo_flexlora_follows_closed_form() -> None:
    rounds, sims = 4, 400
    energies = simulate(SMALL, rounds, sims, method="flexlora", seed=1)
    result = predict(SMALL, rounds)
    e0 = SMALL.initial_energy()
    for t in range(1, rounds + 1):
        mean = energies[:, t].mean(axis=0)
        se = energies[:, t].std(axis=0, ddof=1) / math.sqrt(sims)
        expected = e0 * result.q**t
        # every direction's expected energy within 4 standard errors (+ float noise)
        assert np.all(np.abs(mean - expected) <= 4 * se + 1e-9), (t, mean, expected, se)
    # higher-rank energy decays (collapse) in the simulation too
    tail = energies[:, :, 2:].sum(-1).mean(0) / energies.sum(-1).mean(0)
    assert tail[-1] < 0.5 * tail[0]


def test_monte_carlo_raflora_keeps_every_energy_constant() -> None:
    energies = simulate(SMALL, 5, 20, method="raflora", seed=2)
    assert np.allclose(energies, energies[:, :1, :], atol=1e-9)


def test_monte_carlo_raflora_drop_follows_its_closed_form() -> None:
    setup = TheorySetup((2, 4, 6), num_clients=12, per_round=2, empty_partition="drop")
    rounds, sims = 2, 400
    energies = simulate(setup, rounds, sims, method="raflora", seed=3)
    q_ra = predict(setup, rounds).q_raflora
    for t in (1, 2):
        mean = energies[:, t].mean(axis=0)
        se = energies[:, t].std(axis=0, ddof=1) / math.sqrt(sims)
        assert np.all(np.abs(mean - q_ra**t) <= 4 * se + 1e-9)


def test_add_simulation_columns_and_determinism() -> None:
    a = add_simulation(predict(SMALL, 2), 5, seed=7).to_dict()
    b = add_simulation(predict(SMALL, 2), 5, seed=7).to_dict()
    assert a == b
    assert set(a["rounds"][0]) == {
        "round",
        "bound",
        "predicted_flexlora",
        "predicted_raflora",
        "simulated_flexlora",
        "simulated_raflora",
    }


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "theory",
            "--ranks",
            "2,4,6",
            "--clients",
            "12",
            "--per-round",
            "4",
            "--rounds",
            "3",
            "--simulate",
            "3",
            "--json",
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert {"p", "q", "gamma", "C", "rounds"} <= set(data)
    assert len(data["p"]) == 6 and len(data["rounds"]) == 4
    assert data["rounds"][0]["round"] == 0 and "simulated_raflora" in data["rounds"][3]


def test_cli_table_and_plot(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    png = tmp_path / "theory.png"
    assert main(["theory", "--rounds", "5", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "gamma = q_9 / q_8 = 0.6545" in out and "C = 7.0000" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ranks", "16,8"], "strictly increasing"),
        (["--ranks", "8,8"], "strictly increasing"),
        (["--ranks", "8,x"], "comma-separated integers"),
        (["--clients", "5", "--per-round", "6"], "cannot exceed"),
        (["--probs", "0.1,0.1,0.1,0.1,0.1"], "sum to 1"),
        (["--rounds", "-1"], "rounds"),
    ],
)
def test_cli_invalid_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["theory", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
