"""The PEFT bridge: effective factors in and out of one shared base model.

See docs/methods.md#notation-and-the-lora-convention and docs/methods.md#global-state-and-broadcast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

from raflora.adapters import (
    PEFT_PREFIX,
    AdapterBank,
    get_dense,
    get_factors,
    lora_scaling,
    merge_into_base,
    module_shapes,
    trainable_parameters,
    wrap_model,
)
from raflora.engine.export import export_peft_adapter
from raflora.methods.base import Factors

VIT_TARGETS = ["q_proj", "v_proj", "fc1"]
ROBERTA_TARGETS = ["query", "value"]


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=8,
        patch_size=4,
        num_labels=3,
    )
    return ViTForImageClassification(config).eval()


def tiny_roberta() -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=40,
        num_labels=3,
    )
    return RobertaForSequenceClassification(config).eval()


def vit_input() -> Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def roberta_input() -> dict[str, Tensor]:
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def vit_bank(**kwargs: object) -> AdapterBank:
    return wrap_model(
        tiny_vit(),
        target_modules=VIT_TARGETS,
        max_rank=4,
        modules_to_save=["classifier"],
        **kwargs,  # type: ignore[arg-type]
    )


def random_factors(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> Factors:
    g = torch.Generator().manual_seed(seed)
    return {
        name: (0.3 * torch.randn(d, rank, generator=g), 0.3 * torch.randn(rank, n, generator=g))
        for name, (d, n) in shapes.items()
    }


def logits(model: nn.Module, x: Tensor | dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(pixel_values=x)
    return out.logits


def perturb_dense(bank: AdapterBank, rank: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    dense = {
        k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in bank.get_dense(rank).items()
    }
    bank.set_dense(rank, dense)
    return dense


# --------------------------------------------------------------------------------------------
# names, shapes, round trips


def test_vit_module_names_and_shapes() -> None:
    bank = vit_bank()
    shapes = bank.module_shapes()
    expected = {
        f"vit.layers.{i}.{m}": s
        for i in range(2)
        for m, s in [
            ("attention.q_proj", (32, 32)),
            ("attention.v_proj", (32, 32)),
            ("mlp.fc1", (37, 32)),
        ]
    }
    assert shapes == expected
    # the canonical names are the plain model's own module names
    names = dict(bank.model.get_base_model().named_modules())
    assert all(name in names for name in shapes)
    assert set(bank.get_dense(4)) == {"classifier.weight", "classifier.bias"}


def test_roundtrip_ranks_2_and_4_on_one_base_model() -> None:
    bank = vit_bank()
    shapes = bank.module_shapes()
    f2, f4 = random_factors(shapes, 2, seed=2), random_factors(shapes, 4, seed=4)
    bank.set_factors(2, f2)  # rank-2 adapter created lazily
    bank.set_factors(4, f4)
    assert bank.ranks == [2, 4]
    for rank, ref in [(2, f2), (4, f4)]:
        got = bank.get_factors(rank)
        assert set(got) == set(ref)
        for name, (B, A) in got.items():
            assert B.dtype == A.dtype == torch.float32
            assert not B.requires_grad and not A.requires_grad
            torch.testing.assert_close(B, ref[name][0])
            torch.testing.assert_close(A, ref[name][1])
    # detached clones: editing the result leaves the model alone
    got = bank.get_factors(2)
    got["vit.layers.0.mlp.fc1"][0].zero_()
    torch.testing.assert_close(
        bank.get_factors(2)["vit.layers.0.mlp.fc1"][0], f2["vit.layers.0.mlp.fc1"][0]
    )


def test_set_factors_rejects_bad_shapes_and_names() -> None:
    bank = vit_bank()
    shapes = bank.module_shapes()
    bad = random_factors(shapes, 3, seed=0)
    with pytest.raises(ValueError, match=r"expected B \(32, 4\)"):
        bank.set_factors(4, bad)
    missing = random_factors(shapes, 4, seed=0)
    missing.pop("vit.layers.0.mlp.fc1")
    with pytest.raises(KeyError, match="missing"):
        bank.set_factors(4, missing)
    with pytest.raises(ValueError, match="rank must be"):
        bank.activate(5)


# --------------------------------------------------------------------------------------------
# forward semantics


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_layer_forward_is_x_times_w_plus_ba(use_rslora: bool) -> None:
    bank = vit_bank(lora_alpha=16, use_rslora=use_rslora)
    bank.activate(4)
    factors = random_factors(bank.module_shapes(), 4, seed=7)
    bank.set_factors(4, factors)
    name = "vit.layers.0.mlp.fc1"
    layer = bank.model.get_submodule(PEFT_PREFIX + name)
    base = layer.get_base_layer()
    B, A = factors[name]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = x @ (base.weight + B @ A).T + base.bias
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    s = 16 / (math.sqrt(4) if use_rslora else 4)
    assert lora_scaling(bank.model, "r4")[name] == pytest.approx(s)
    # stored lora_B is the effective B divided by the scaling
    torch.testing.assert_close(layer.lora_B["r4"].weight.detach(), B / s)


def test_adapter_output_equals_merged_base_model() -> None:
    plain = tiny_vit()
    bank = vit_bank()
    factors = random_factors(bank.module_shapes(), 4, seed=8)
    bank.set_factors(4, factors)
    bank.set_dense(4, {f"classifier.{k}": v for k, v in plain.classifier.state_dict().items()})
    with torch.no_grad():
        for name, (B, A) in factors.items():
            plain.get_submodule(name).weight += B @ A
    torch.testing.assert_close(
        logits(bank.model, vit_input()), logits(plain, vit_input()), atol=1e-5, rtol=1e-5
    )


def test_fixed_alpha_and_alpha_r_give_the_same_outputs() -> None:
    banks = [vit_bank(), vit_bank(lora_alpha=16), vit_bank(lora_alpha=16, use_rslora=True)]
    f2 = random_factors(banks[0].module_shapes(), 2, seed=9)
    outs = []
    for bank in banks:
        bank.activate(2)
        bank.set_factors(2, f2)
        for name, (B, A) in bank.get_factors(2).items():
            torch.testing.assert_close(B @ A, f2[name][0] @ f2[name][1])
        outs.append(logits(bank.model, vit_input()))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-5, rtol=1e-5)
    assert lora_scaling(banks[1].model, "r2")["vit.layers.0.mlp.fc1"] == pytest.approx(8.0)


def test_switching_adapters_changes_outputs_and_back() -> None:
    bank = vit_bank()
    shapes = bank.module_shapes()
    bank.set_factors(2, random_factors(shapes, 2, seed=10))
    bank.set_factors(4, random_factors(shapes, 4, seed=11))
    x = vit_input()
    bank.activate(4)
    out4 = logits(bank.model, x)
    bank.activate(2)
    assert bank.active_rank == 2
    out2 = logits(bank.model, x)
    assert not torch.allclose(out2, out4, atol=1e-3)
    bank.activate(4)
    torch.testing.assert_close(logits(bank.model, x), out4)


def test_trainable_parameters_are_the_active_adapter_only() -> None:
    bank = vit_bank()
    for rank in (2, 4, 2):
        bank.activate(rank)
        params = trainable_parameters(bank.model)
        named = {id(p): n for n, p in bank.model.named_parameters()}
        names = [named[id(p)] for p in params]
        assert names
        tag = f"r{rank}"
        assert all(f".{tag}." in n for n in names), names
        n_lora = sum(".lora_" in n for n in names)
        assert n_lora == 2 * len(bank.module_shapes())
        assert sum(".modules_to_save." in n for n in names) == 2  # classifier weight and bias
    assert bank.trainable_parameters() == params
    # a gradient step moves only those tensors
    frozen_before = {
        n: p.detach().clone() for n, p in bank.model.named_parameters() if not p.requires_grad
    }
    loss = logits_grad(bank.model, vit_input()).sum()
    loss.backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in bank.model.named_parameters() if n in frozen_before)


def logits_grad(model: nn.Module, x: Tensor) -> Tensor:
    return model(pixel_values=x).logits


# --------------------------------------------------------------------------------------------
# FLoRA merge


def test_merge_into_base_adds_exactly_b_a() -> None:
    bank = vit_bank()
    shapes = bank.module_shapes()
    delta = random_factors(shapes, 6, seed=12)  # stacked rank may exceed max_rank
    before = {
        n: bank.model.get_submodule(PEFT_PREFIX + n).get_base_layer().weight.detach().clone()
        for n in shapes
    }
    merge_into_base(bank.model, delta)
    for name, (B, A) in delta.items():
        after = bank.model.get_submodule(PEFT_PREFIX + name).get_base_layer().weight.detach()
        torch.testing.assert_close(after - before[name], B @ A, atol=1e-6, rtol=1e-5)
    # LoRA layers untouched (B = 0 from PEFT init)
    assert all(float(B.abs().max()) == 0.0 for B, _ in bank.get_factors(4).values())
    with pytest.raises(ValueError, match="merge_into_base"):
        merge_into_base(
            bank.model, {"vit.layers.0.mlp.fc1": delta["vit.layers.0.attention.q_proj"]}
        )


# --------------------------------------------------------------------------------------------
# export to a standard PEFT adapter directory


@pytest.mark.parametrize("export_rank", [4, 2])
def test_export_vit_with_head_reloads_identically(tmp_path: Path, export_rank: int) -> None:
    base = tiny_vit()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    bank = wrap_model(
        base, target_modules=VIT_TARGETS, max_rank=4, modules_to_save=["classifier"], lora_alpha=16
    )
    factors = random_factors(bank.module_shapes(), 4, seed=13)
    truncated = {n: (B[:, :export_rank], A[:export_rank]) for n, (B, A) in factors.items()}
    bank.activate(export_rank)
    bank.set_factors(export_rank, truncated)
    dense = perturb_dense(bank, export_rank, seed=14)
    expected = logits(bank.model, vit_input())

    out = export_peft_adapter(
        bank.model,
        factors,
        dense,
        tmp_path / "adapter",
        rank=export_rank,
        target_modules=VIT_TARGETS,
        modules_to_save=["classifier"],
    )
    assert (out / "adapter_model.safetensors").is_file()
    # written sorted, not in the order of PEFT's set (which follows the process's hash seed)
    written = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert written == sorted(VIT_TARGETS), written

    fresh = ViTForImageClassification.from_pretrained(base_dir).eval()
    loaded = PeftModel.from_pretrained(fresh, out).eval()
    torch.testing.assert_close(logits(loaded, vit_input()), expected, atol=1e-5, rtol=1e-5)
    # the loaded adapter carries the same effective factors and head
    got = get_factors(loaded, "default")
    for name, (B, A) in got.items():
        torch.testing.assert_close(B, truncated[name][0])
        torch.testing.assert_close(A, truncated[name][1])
    for key, value in get_dense(loaded, "default").items():
        torch.testing.assert_close(value, dense[key])


def test_export_keys_match_peft_state_dict(tmp_path: Path) -> None:
    bank = vit_bank()
    factors = bank.get_factors(4)
    out = export_peft_adapter(
        bank.model,
        factors,
        bank.get_dense(4),
        tmp_path / "adapter",
        rank=4,
        target_modules=VIT_TARGETS,
        modules_to_save=["classifier"],
    )
    saved = load_file(out / "adapter_model.safetensors")
    reference = get_peft_model_state_dict(bank.model, adapter_name="r4")
    assert set(saved) == set(reference)
    assert "base_model.model.classifier.weight" in saved
    assert "base_model.model.vit.layers.0.attention.q_proj.lora_A.weight" in saved
    for key, value in reference.items():
        assert saved[key].shape == value.shape


def test_export_roberta_seq_cls_reloads_identically(tmp_path: Path) -> None:
    base = tiny_roberta()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    bank = wrap_model(base, target_modules=ROBERTA_TARGETS, max_rank=4, task_type="SEQ_CLS")
    shapes = bank.module_shapes()
    assert "roberta.encoder.layer.1.attention.self.value" in shapes
    assert module_shapes(bank.model, "r4") == shapes
    f2, f4 = random_factors(shapes, 2, seed=15), random_factors(shapes, 4, seed=16)
    bank.set_factors(2, f2)
    bank.set_factors(4, f4)
    for rank, ref in [(2, f2), (4, f4)]:
        for name, (B, A) in bank.get_factors(rank).items():
            torch.testing.assert_close(B, ref[name][0])
            torch.testing.assert_close(A, ref[name][1])
    bank.activate(4)
    dense = perturb_dense(bank, 4, seed=17)
    assert "classifier.out_proj.weight" in dense
    expected = logits(bank.model, roberta_input())

    out = export_peft_adapter(
        bank.model,
        f4,
        dense,
        tmp_path / "adapter",
        rank=4,
        target_modules=ROBERTA_TARGETS,
        task_type="SEQ_CLS",
    )
    fresh = RobertaForSequenceClassification.from_pretrained(base_dir).eval()
    loaded = PeftModel.from_pretrained(fresh, out).eval()
    torch.testing.assert_close(logits(loaded, roberta_input()), expected, atol=1e-5, rtol=1e-5)


def test_export_validates(tmp_path: Path) -> None:
    bank = vit_bank()
    factors = random_factors(bank.module_shapes(), 2, seed=0)
    with pytest.raises(ValueError, match="rank 2 < rank 4"):
        export_peft_adapter(bank.model, factors, None, tmp_path / "a", rank=4)
    with pytest.raises(ValueError, match="no modules_to_save"):
        export_peft_adapter(bank.model, factors, bank.get_dense(4), tmp_path / "a", rank=2)
    bad = {"vit.layers.0.mlp.fc1": factors["vit.layers.0.attention.q_proj"]}
    with pytest.raises(ValueError, match="weight is"):
        export_peft_adapter(bank.model, bad, None, tmp_path / "a", rank=2)
