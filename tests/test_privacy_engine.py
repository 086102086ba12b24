"""Client-level DP in the local engine end to end (docs/privacy.md): privacy off changes nothing,
ε in every row is the accountant's, reruns and resumes are identical, the budget stops a run,
Poisson cohorts, client noise, adaptive clipping, config errors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import TINY_SYNTHETIC, config_with
from raflora.cli import main
from raflora.config import ConfigError, load_config
from raflora.engine import load_checkpoint, run_local, seeds
from raflora.engine.checkpoint import save_checkpoint
from raflora.engine.private_round import PrivacyBudgetError
from raflora.privacy import calibrate_noise, default_delta, epsilon
from raflora.report import progress_postfix, read_metrics, write_comparison
from raflora.report.metrics import PRIVACY_KEYS, ROW_KEYS
from raflora.report.tensorboard import round_scalars

BASE: dict[str, Any] = {
    **TINY_SYNTHETIC,
    "method": "flexlora",
    "fl": {"num_clients": 6, "clients_per_round": 3, "rounds": 2, "rank_levels": [2, 4]},
}
PRIVATE = {"privacy.enabled": True, "privacy.noise_multiplier": 0.8, "privacy.clip": 0.5}


def cfg(**over: Any) -> Any:
    return config_with(BASE, **over)


def without_time(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a).state, load_checkpoint(b).state
    assert sa.factors.keys() == sb.factors.keys()
    for name, (B, A) in sa.factors.items():
        assert torch.equal(B, sb.factors[name][0]) and torch.equal(A, sb.factors[name][1])
    assert all(torch.equal(v, sb.dense[k]) for k, v in sa.dense.items())


def test_privacy_disabled_is_byte_identical_to_a_run_without_the_section(tmp_path: Path) -> None:
    plain = run_local(cfg(), tmp_path / "plain", progress=False)
    off = run_local(
        cfg(**{"privacy.enabled": False, "privacy.noise_multiplier": 3.0, "privacy.clip": 1e-3}),
        tmp_path / "off",
        progress=False,
    )
    assert without_time(off.metrics) == without_time(plain.metrics)
    assert not set(PRIVACY_KEYS) & set(off.metrics[-1])
    assert "final_epsilon" not in off.summary and "privacy" not in off.summary
    assert_same_state(tmp_path / "plain", tmp_path / "off")
    assert "privacy" not in torch.load(
        tmp_path / "off" / "checkpoint" / "state.pt", weights_only=True
    )
    from safetensors.torch import load_file

    fa = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    fb = load_file(str(tmp_path / "off" / "adapter" / "adapter_model.safetensors"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_epsilon_in_every_row_is_the_accountant_s(tmp_path: Path) -> None:
    result = run_local(cfg(**{**PRIVATE, "privacy.sampling": "fixed"}), tmp_path, progress=False)
    delta = default_delta(6)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    for t, row in enumerate(rows, start=1):
        assert list(row)[-5:] == [*PRIVACY_KEYS, "transport_bytes"]
        assert set(ROW_KEYS) <= row.keys()
        assert row["delta"] == delta and row["noise_multiplier"] == 0.8 and row["clip"] == 0.5
        expected = epsilon(0.8, 0.5, t, delta, sampling="fixed", num_clients=6)
        assert row["epsilon"] == pytest.approx(expected, rel=1e-12)
    # the library called directly: 2 rounds of 3 of 6 without replacement, replace-one
    import dp_accounting as dpa

    acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    acc.compose(dpa.SampledWithoutReplacementDpEvent(6, 3, dpa.GaussianDpEvent(0.4)), 2)
    assert rows[-1]["epsilon"] == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    assert result.summary["final_epsilon"] == rows[-1]["epsilon"]
    assert result.summary["privacy"]["epsilon"] == rows[-1]["epsilon"]
    assert result.summary["privacy"]["sampling"] == "fixed"
    assert round_scalars(rows[-1])["privacy/epsilon"] == rows[-1]["epsilon"]
    assert progress_postfix(rows[-1])["ε"] == f"{rows[-1]['epsilon']:.3g}"


def test_a_private_run_is_reproducible_and_noised(tmp_path: Path) -> None:
    a = run_local(cfg(**PRIVATE), tmp_path / "a", progress=False)
    b = run_local(cfg(**PRIVATE), tmp_path / "b", progress=False)
    assert without_time(a.metrics) == without_time(b.metrics)
    assert_same_state(tmp_path / "a", tmp_path / "b")
    run_local(cfg(**PRIVATE, **{"privacy.noise": "client"}), tmp_path / "c", progress=False)
    sa, sc = load_checkpoint(tmp_path / "a").state, load_checkpoint(tmp_path / "c").state
    name = sorted(sa.factors)[0]
    assert not torch.equal(sa.factors[name][0], sc.factors[name][0])  # other noise streams


def test_a_killed_private_run_resumes_its_ledger(tmp_path: Path) -> None:
    over = {**PRIVATE, "fl.rounds": 3, "method": "raflora"}
    full = run_local(cfg(**over), tmp_path / "full", progress=False)

    class StopRunError(Exception):
        pass

    def stop(row: dict[str, Any]) -> None:
        if row["round"] == 1:
            raise StopRunError

    with pytest.raises(StopRunError):
        run_local(cfg(**over), tmp_path / "cut", progress=False, on_round=stop)
    ledger = load_checkpoint(tmp_path / "cut").privacy
    assert ledger is not None and ledger["ledger"]["rounds"] == [[0.8, 0.5, 1]]
    resumed = run_local(cfg(**over), tmp_path / "cut", resume=True, progress=False)
    assert without_time(resumed.metrics) == without_time(full.metrics)
    assert_same_state(tmp_path / "full", tmp_path / "cut")


def test_target_epsilon_calibrates_z_and_a_resume_past_the_budget_stops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    over = {"privacy.enabled": True, "privacy.target_epsilon": 5.0, "fl.rounds": 3}
    run = tmp_path / "run"

    class StopRunError(Exception):
        pass

    def stop(row: dict[str, Any]) -> None:
        if row["round"] == 2:
            raise StopRunError

    with pytest.raises(StopRunError):
        run_local(cfg(**over), run, progress=False, on_round=stop)
    rows = read_metrics(run / "metrics.jsonl")
    z = calibrate_noise(5.0, 0.5, 3, default_delta(6), sampling="poisson")
    assert rows[0]["noise_multiplier"] == z and rows[-1]["epsilon"] <= 5.0
    # the budget already spent elsewhere (an earlier extension, say): 3 more rounds recorded
    checkpoint = load_checkpoint(run)
    assert checkpoint.privacy is not None
    checkpoint.privacy["ledger"]["rounds"][0][2] += 3
    save_checkpoint(run, checkpoint)
    with pytest.raises(PrivacyBudgetError, match=r"round 3 would take epsilon to .* past"):
        run_local(cfg(**over), run, resume=True, progress=False)
    assert [r["round"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]  # kept
    assert load_checkpoint(run).round == 2
    # the CLI: one line, exit 2, no traceback
    code = main(["run", "--resume", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "privacy.target_epsilon 5" in err and "Traceback" not in err
    # the unchanged run finishes within its budget
    done = run_local(cfg(**over), tmp_path / "whole", progress=False)
    assert [r["round"] for r in done.metrics] == [1, 2, 3]
    assert done.metrics[-1]["epsilon"] <= 5.0


def test_an_empty_poisson_cohort_still_releases_noise_and_is_accounted(tmp_path: Path) -> None:
    over = {**PRIVATE, "fl.clients_per_round": 1, "fl.rounds": 2}
    seed = next(
        s
        for s in range(100)
        if not seeds.poisson_clients(s, 1, 6, 1 / 6) and seeds.poisson_clients(s, 2, 6, 1 / 6)
    )
    result = run_local(cfg(seed=seed, **over), tmp_path, progress=False)
    first = result.metrics[0]
    assert first["clients"] == [] and first["accepted"] == 0 and first["train_loss"] is None
    assert first["epsilon"] == pytest.approx(
        epsilon(0.8, 1 / 6, 1, default_delta(6), sampling="poisson")
    )
    assert result.metrics[1]["accepted"] == len(seeds.poisson_clients(seed, 2, 6, 1 / 6))


def test_adaptive_clipping_moves_the_clip_towards_the_quantile(tmp_path: Path) -> None:
    over = {
        **PRIVATE,
        "privacy.noise_multiplier": 0.3,
        "privacy.clip": 1e-4,  # every update is clipped: the clip must grow
        "privacy.adaptive_clip": True,
        "privacy.clip_count_noise_std": 0.2,
        "fl.rounds": 3,
    }
    result = run_local(cfg(**over), tmp_path, progress=False)
    clips = [row["clip"] for row in result.metrics]
    assert clips[0] == 1e-4 and clips[0] < clips[1] < clips[2]
    assert result.summary["privacy"]["final_clip"] > clips[2]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["privacy.enabled=true"], "set exactly one of privacy.noise_multiplier"),
        (
            ["privacy.enabled=true", "privacy.noise_multiplier=1", "privacy.target_epsilon=2"],
            "got both",
        ),
        (
            [
                "privacy.enabled=true",
                "privacy.noise_multiplier=1",
                "privacy.accountant=pld",
                "privacy.sampling=fixed",
            ],
            "'pld' accounts poisson sampling only",
        ),
        (
            [
                "privacy.enabled=true",
                "privacy.noise_multiplier=1",
                "privacy.noise=client",
                "privacy.adaptive_clip=true",
            ],
            "privacy.adaptive_clip: the unclipped count is noised by the server",
        ),
        (["privacy.clip=0"], "privacy.clip: must be a finite number > 0, got 0.0"),
        (["privacy.delta=1.5"], "privacy.delta: must be a finite number in (0, 1)"),
    ],
)
def test_a_bad_privacy_config_is_one_line(overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["method=flexlora", *overrides])
    matching = [p for p in info.value.problems if words in p]
    assert len(matching) == 1 and "\n" not in matching[0], info.value.problems


def test_adaptive_clipping_that_leaves_no_noise_for_the_update_stops_before_round_1(
    tmp_path: Path,
) -> None:
    from raflora.engine import EngineError

    over = {**PRIVATE, "privacy.noise_multiplier": 2.0, "privacy.adaptive_clip": True}
    with pytest.raises(EngineError, match=r"privacy\.adaptive_clip: count_noise_std"):
        run_local(cfg(**over), tmp_path, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists() or not read_metrics(tmp_path / "metrics.jsonl")


def test_comparison_has_an_epsilon_column_only_when_a_run_is_private(tmp_path: Path) -> None:
    private = ({"final_accuracy": 0.5, "final_epsilon": 3.21}, [])
    plain = ({"final_accuracy": 0.6}, [])
    text = write_comparison(tmp_path / "p", {"dp": private, "plain": plain}).read_text()
    assert "| Wall (s) | ε |" in text
    assert "| 3.21 |" in text and "| ∞ |" in text
    text = write_comparison(tmp_path / "n", {"plain": plain}).read_text()
    assert "ε" not in text


def test_the_cli_plans_what_the_engine_spends(tmp_path: Path) -> None:
    """``raflora privacy`` (planning) and a run's last row agree."""
    config = tmp_path / "run.yaml"
    data = {**BASE, "privacy": {"enabled": True, "noise_multiplier": 0.8}}
    config.write_text(yaml.safe_dump(data))
    assert main(["run", str(config), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    last = read_metrics(tmp_path / "r" / "metrics.jsonl")[-1]
    planned = epsilon(0.8, 0.5, 2, default_delta(6), sampling="poisson")
    assert math.isclose(last["epsilon"], planned, rel_tol=1e-12)


def test_the_seed_comparison_reports_epsilon_when_a_run_is_private(tmp_path: Path) -> None:
    from raflora.experiments.report import default_metrics, write_seed_comparison

    def summary(acc: float, eps: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {"final_accuracy": acc, "total_upload_bytes": 1, "wall_seconds": 1}
        return out if eps is None else {**out, "final_epsilon": eps}

    runs = {
        "flexlora": {0: (summary(0.5, 4.0), []), 1: (summary(0.6, 4.0), [])},
        "raflora": {0: (summary(0.7, 4.0), []), 1: (summary(0.8, 4.0), [])},
    }
    summaries = [s for seeds_ in runs.values() for s, _ in seeds_.values()]
    metrics = default_metrics(summaries)
    assert metrics[-1] == "final_epsilon"
    assert "final_epsilon" not in default_metrics([summary(0.5, None)])
    text = write_seed_comparison(
        tmp_path, runs, seeds=[0, 1], metrics=metrics, baseline="flexlora"
    ).read_text()
    assert "| Traffic | ε |" in text
