"""The device checks of ``scripts/gpu_check.sh`` (:mod:`raflora.experiments.gpu_check`).

Tests marked ``gpu`` run the script's checks on CUDA and are skipped without it; the others run
its pieces on the CPU so the check cannot rot on machines without a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raflora.config import config_from_dict
from raflora.engine import build_federation
from raflora.experiments.gpu_check import (
    DTYPES,
    MODELS,
    Assets,
    _max_rel_diff,
    build_assets,
    check_export,
    check_resume,
    check_run,
    main,
    run_config,
    state_problems,
)
from raflora.methods import GlobalState, available_methods

pytestmark = pytest.mark.usefixtures("hf_offline")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    models = MODELS if torch.cuda.is_available() else ("vit",)
    return build_assets(tmp_path_factory.mktemp("gpu-check"), models)


def _state(**tensors: torch.Tensor) -> GlobalState:
    B, A = tensors.get("B", torch.zeros(4, 2)), tensors.get("A", torch.zeros(2, 3))
    return GlobalState(
        factors={"layer.q": (B, A)},
        module_shapes={"layer.q": (4, 3)},
        dense={"head": tensors.get("head", torch.zeros(3))},
        base_delta={"layer.q": tensors["delta"]} if "delta" in tensors else {},
    )


def test_state_check_names_tensors_off_the_device() -> None:
    # Today's round-0 state is built on the CPU: on a CUDA run the check must say so.
    problems = state_problems(_state(), torch.device("cuda"), "round 0: ")
    assert problems == ["round 0: factors[layer.q].B on cpu, not cuda"]
    assert state_problems(_state(), torch.device("cpu")) == []
    meta = _state(delta=torch.zeros(4, 3, device="meta"))
    assert state_problems(meta, torch.device("cpu")) == ["base_delta[layer.q] on meta, not cpu"]
    extras = _state()
    extras.extras = {"c": {"layer.q": (torch.zeros(4, 2), torch.zeros(2, 3, device="meta"))}}
    assert state_problems(extras, torch.device("cpu")) == ["extras on meta, not cpu"]


@pytest.mark.parametrize("where", ["B", "head", "delta"])
def test_state_check_names_tensors_not_in_float32(where: str) -> None:
    shapes = {"B": (4, 2), "head": (3,), "delta": (4, 3)}
    state = _state(**{where: torch.zeros(shapes[where], dtype=torch.bfloat16)})
    [problem] = state_problems(state, None)
    assert problem.endswith("is torch.bfloat16, not float32")


def test_one_run_and_export_check_on_the_cpu(assets: Assets, tmp_path: Path) -> None:
    ran, exported = check_run(assets, "vit", "flexlora", "float32", "cpu", tmp_path)
    assert ran.ok, ran
    assert str(ran).startswith("PASS run vit/flexlora/float32 (3 rounds")
    assert exported.ok, exported
    # An adapter that lost its update (B = 0) no longer reproduces the engine's evaluation.
    run_dir = tmp_path / "vit-flexlora-float32"
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * 0 if "lora_B" in k else v for k, v in tensors.items()}, str(weights))
    fed = build_federation(
        config_from_dict(run_config(assets, "vit", "flexlora", "float32", "cpu"))
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    lost = check_export(fed, run_dir, summary, "vit/flexlora/float32")
    assert not lost.ok and "PEFT misses over 10% of the adapter's effect" in str(lost)


def test_a_broken_run_is_a_fail_line(assets: Assets, tmp_path: Path) -> None:
    ran, exported = check_run(assets, "vit", "no-such-method", "float32", "cpu", tmp_path)
    assert str(ran).startswith("FAIL run vit/no-such-method/float32 (")
    assert str(exported) == "FAIL export vit/no-such-method/float32 (no finished run)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_a_device_fails_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device", "cuda"]) == 1
    assert capsys.readouterr().out == (
        "FAIL cuda (no CUDA device is available; --device cpu rehearses)\n"
    )


def test_unknown_selection_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--methods", "raflora,fedavg"])
    assert exit_info.value.code == 2
    assert "--methods: unknown 'fedavg'" in capsys.readouterr().err


def test_resume_comparison_of_metrics_rows() -> None:
    rows = [{"round": 1, "eval_loss": 2.0, "energy_per_level": {"2": 0.5}, "clients": [0, 3]}]
    assert _max_rel_diff(rows, [dict(rows[0])]) == 0.0
    other = [{**rows[0], "energy_per_level": {"2": 0.25}}]
    assert _max_rel_diff(rows, other) == pytest.approx(0.5)
    assert _max_rel_diff(rows, [{**rows[0], "clients": [0, 2]}]) == pytest.approx(1 / 3)
    assert _max_rel_diff(rows, rows + rows) == float("inf")  # a missing row
    assert _max_rel_diff(rows, [{"round": 1}]) == float("inf")  # a missing key


@pytest.mark.slow
def test_resume_check_on_the_cpu(assets: Assets, tmp_path: Path) -> None:
    result = check_resume(assets, "cpu", tmp_path, model="vit", method="raflora")
    assert result.ok, result
    assert "bit-identical" in str(result)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", available_methods())
@pytest.mark.parametrize("model", MODELS)
def test_run_and_export_on_cuda(
    assets: Assets, tmp_path: Path, model: str, method: str, dtype: str
) -> None:
    for result in check_run(assets, model, method, dtype, "cuda", tmp_path):
        assert result.ok, result


@pytest.mark.gpu
@needs_cuda
def test_sigkill_and_resume_on_cuda(
    assets: Assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    result = check_resume(assets, "cuda", tmp_path)
    assert result.ok, result
