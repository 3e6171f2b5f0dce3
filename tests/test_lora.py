"""LoRA: extract (SVD) -> PEFT adapter -> apply / fold on the fly in recipes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_weights, run_cli, write_recipe
from safetensors.torch import load_file, save_file

RANK = 3


@pytest.fixture(scope="module")
def low_rank_ft(llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama base plus an exactly rank-3 delta on every linear layer weight."""
    dst = tmp_path_factory.mktemp("lowrank") / "ft"
    shutil.copytree(llama_family["base"], dst)
    gen = torch.Generator().manual_seed(5)
    for f in dst.glob("*.safetensors"):
        sd = load_file(f)
        for name, w in sd.items():
            if name.startswith("model.layers.") and w.dim() == 2:
                out_dim, in_dim = w.shape
                b = torch.randn(out_dim, RANK, generator=gen) * 0.05
                a = torch.randn(RANK, in_dim, generator=gen) * 0.05
                sd[name] = w + b @ a
        save_file(sd, f, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def adapter(
    low_rank_ft: Path, llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "lora"
    result = run_cli(
        "extract-lora", "--model", low_rank_ft, "--base", llama_family["base"],
        "--rank", str(RANK), "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "retained energy mean 1.0000" in result.stdout
    return out


def test_exact_low_rank_delta_is_reconstructed(
    adapter: Path, low_rank_ft: Path, llama_family: dict[str, Path]
) -> None:
    from mergekit_lite.io.lora import load_adapter

    lora = load_adapter(adapter)
    base, ft = load_weights(llama_family["base"]), load_weights(low_rank_ft)
    assert len(lora.factors) == 4 * 7  # q, k, v, o, gate, up, down in 4 layers
    for name in lora.factors:
        delta = ft[name] - base[name]
        rebuilt = lora.fold(name, base[name]) - base[name]
        assert (rebuilt - delta).norm() / delta.norm() < 1e-4, name
    energy = json.loads((adapter / "extraction.json").read_text())["energy"]
    assert min(energy.values()) > 1 - 1e-6
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == RANK
    assert set(config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip


def test_peft_loads_the_adapter(
    adapter: Path, low_rank_ft: Path, llama_family: dict[str, Path]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama_family["base"])
    peft_model = PeftModel.from_pretrained(base, adapter)
    target = AutoModelForCausalLM.from_pretrained(low_rank_ft)
    ids = torch.tensor([[1, 7, 9, 11, 3]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, target(ids).logits, rtol=1e-4, atol=1e-4)


def test_apply_lora_and_recipe_reference_fold_the_adapter(
    adapter: Path, low_rank_ft: Path, llama_family: dict[str, Path], tmp_path: Path
) -> None:
    folded = tmp_path / "folded"
    result = run_cli("apply-lora", llama_family["base"], adapter, "-o", folded)
    assert result.exit_code == 0, result.stderr
    ft, out = load_weights(low_rank_ft), load_weights(folded)
    assert set(out) == set(ft)
    for k in ft:
        torch.testing.assert_close(out[k], ft[k], rtol=1e-4, atol=1e-5)

    # mergekit's path+adapter syntax: the folded model, on the fly
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(llama_family["base"]),
            "models": [
                {"model": f"{llama_family['base']}+{adapter}", "parameters": {"weight": 0.5}},
                {"model": str(llama_family["ft0"]), "parameters": {"weight": 0.5}},
            ],
            "dtype": "float32",
        },
    )
    merged = tmp_path / "merged"
    assert run_cli("run", recipe, "-o", merged).exit_code == 0
    base, ft0, m = (
        load_weights(llama_family["base"]),
        load_weights(llama_family["ft0"]),
        load_weights(merged),
    )
    key = "model.layers.2.mlp.down_proj.weight"
    expected = base[key] + 0.5 * (out[key] - base[key]) + 0.5 * (ft0[key] - base[key])
    torch.testing.assert_close(m[key], expected, rtol=1e-5, atol=1e-6)


def test_low_rank_of_a_full_rank_delta_reports_energy(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    from mergekit_lite.surgery.lora import extract_lora

    result = extract_lora(
        str(llama_family["ft0"]), str(llama_family["base"]), tmp_path / "a", rank=2
    )
    assert 0 < result.min_energy[1] <= result.mean_energy < 1


def test_rank_too_large_and_bad_adapters(
    adapter: Path, llama_family: dict[str, Path], qwen_family: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "o"
    result = run_cli(
        "extract-lora", "--model", llama_family["ft0"], "--base", llama_family["base"],
        "--rank", "999", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 2 and "--rank: 999 is larger than" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()

    # different hidden sizes: refused by name
    wide = tmp_path / "wide"
    from mergekit_lite.synthetic import save_family

    save_family(wide, arch="llama", n_finetunes=0, hidden_size=32, intermediate_size=64)
    result = run_cli(
        "extract-lora", "--model", wide / "base", "--base", llama_family["base"],
        "--rank", "2", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 2 and "shapes disagree" in result.stderr and not out.exists()

    # an adapter whose modules the base does not have (qwen names its layers alike, so
    # rename one target to something that exists nowhere)
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    sd = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in sd if ".q_proj.lora_A." in k)
    sd[key.replace("q_proj", "qq_proj")] = sd.pop(key)
    sd[key.replace("q_proj", "qq_proj").replace("lora_A", "lora_B")] = sd.pop(
        key.replace("lora_A", "lora_B")
    )
    save_file(sd, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    result = run_cli("apply-lora", llama_family["base"], broken, "-o", out)
    assert result.exit_code == 2 and "qq_proj" in result.stderr and "does not have" in result.stderr
    assert not out.exists()

    result = run_cli("apply-lora", llama_family["base"], qwen_family["base"], "-o", out)
    assert result.exit_code == 2 and "not a LoRA adapter" in result.stderr
