"""``raflora privacy``: epsilon for a noise multiplier, the multiplier for a target epsilon."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from raflora.cli import main
from raflora.privacy.accountant import default_delta, epsilon

pytest.importorskip("dp_accounting")


def test_epsilon_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["privacy", "--noise-multiplier", "1.5", "--sample-rate", "0.04", "--rounds", "2250"]
    assert main([*argv, "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("epsilon = 7.329") and out.count("\n") == 1


def test_json_with_clients_and_default_delta(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["privacy", "--noise-multiplier", "1.0", "--clients-per-round", "10"]
    assert main([*argv, "--num-clients", "100", "--rounds", "20", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["delta"] == default_delta(100)
    assert data["sample_rate"] == 0.1
    assert data["epsilon"] == epsilon(1.0, 0.1, 20, default_delta(100))
    assert data["library"].startswith("dp-accounting ")


def test_json_without_noise_is_strict(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["privacy", "--noise-multiplier", "0", "--sample-rate", "0.1", "--rounds", "3"]
    assert main([*argv, "--delta", "1e-5", "--json"]) == 0
    out = capsys.readouterr().out
    assert "Infinity" not in out and json.loads(out)["epsilon"] is None  # no privacy: null


def test_target_epsilon_prints_the_calibrated_multiplier(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["privacy", "--target-epsilon", "4", "--clients-per-round", "10", "--num-clients", "100"]
    assert main([*argv, "--rounds", "30", "--sampling", "fixed", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    z, delta = data["noise_multiplier"], default_delta(100)
    assert data["epsilon"] <= 4.0
    assert data["epsilon"] == epsilon(z, 0.1, 30, delta, sampling="fixed", num_clients=100)
    assert epsilon(z * 0.999, 0.1, 30, delta, sampling="fixed", num_clients=100) > 4.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--noise-multiplier", "1", "--rounds", "5", "--delta", "1e-5"], "--sample-rate"),
        (["--noise-multiplier", "1", "--sample-rate", "0.1", "--rounds", "5"], "--delta is needed"),
        (
            ["--noise-multiplier", "1", "--sample-rate", "1.5", "--rounds", "5", "--delta", "1e-5"],
            "sample rate",
        ),
        (
            [
                "--noise-multiplier",
                "-1",
                "--sample-rate",
                "0.1",
                "--rounds",
                "5",
                "--delta",
                "1e-5",
            ],
            "--noise-multiplier",
        ),
        (
            ["--noise-multiplier", "1", "--sample-rate", "0.1", "--rounds", "0", "--delta", "1e-5"],
            "--rounds",
        ),
        (
            ["--noise-multiplier", "1", "--clients-per-round", "10", "--rounds", "5"],
            "needs --num-clients",
        ),
        (
            [
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.1",
                "--rounds",
                "5",
                "--delta",
                "1e-5",
                "--sampling",
                "fixed",
            ],
            "--sampling fixed needs --num-clients",
        ),
        (
            [
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.15",
                "--num-clients",
                "10",
                "--rounds",
                "5",
                "--sampling",
                "fixed",
            ],
            "whole number",
        ),
        (
            [
                "--noise-multiplier",
                "1",
                "--clients-per-round",
                "5",
                "--num-clients",
                "50",
                "--rounds",
                "5",
                "--sampling",
                "fixed",
                "--accountant",
                "pld",
            ],
            "poisson sampling only",
        ),
        (
            ["--target-epsilon", "0", "--sample-rate", "0.1", "--rounds", "5", "--delta", "1e-5"],
            "--target-epsilon",
        ),
        (
            ["--noise-multiplier", "1", "--sample-rate", "0.1", "--rounds", "5", "--delta", "2"],
            "--delta",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["privacy", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("raflora privacy: error: ") and captured.err.count("\n") == 1
    assert message in captured.err


def test_console_script_exit_code() -> None:
    # Both or neither of the noise options: argparse's own usage error, also exit 2.
    proc = subprocess.run(
        [sys.executable, "-m", "raflora.cli", "privacy", "--rounds", "5", "--sample-rate", "0.1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "--noise-multiplier" in proc.stderr
