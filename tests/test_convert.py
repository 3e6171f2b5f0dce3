"""merge convert: GGUF (the real SmolLM2), legacy pickles and dtype casts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMOLLM2_GGUF, load_weights, run_cli
from safetensors.torch import load_file, save_file


def test_dtype_cast_of_a_sharded_folder(llama_family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    result = run_cli("convert", llama_family["ft0"], "-o", out, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.stderr
    before, after = load_weights(llama_family["ft0"]), load_weights(out)
    assert set(before) == set(after)
    assert all(torch.equal(after[k], before[k].to(torch.bfloat16)) for k in before)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_float16_overflow_is_reported(qwen_family: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "big"
    shutil.copytree(qwen_family["ft0"], src)
    sd = load_file(src / "model.safetensors")
    sd["model.norm.weight"][:3] = torch.tensor([1e6, -7e4, 100.0])
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "fp16"
    result = run_cli("convert", src, "-o", out, "--dtype", "float16")
    assert result.exit_code == 0, result.stderr
    assert "2 values in 1 tensors overflowed float16" in result.stderr
    assert "model.norm.weight" in result.stderr
    norm = load_file(out / "model.safetensors")["model.norm.weight"]
    assert torch.isinf(norm[:2]).all() and norm[2] == 100.0


def test_pickle_to_safetensors(qwen_family: dict[str, Path], tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_family["ft1"] / f, legacy / f)
    sd = load_file(qwen_family["ft1"] / "model.safetensors")
    torch.save(sd, legacy / "pytorch_model.bin")
    out = tmp_path / "st"
    refused = run_cli("convert", legacy, "-o", out)
    assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr and not out.exists()
    result = run_cli("convert", legacy, "-o", out, "--allow-pickle")
    assert result.exit_code == 0, result.stderr
    assert "from pickle" in result.stdout
    converted = load_file(out / "model.safetensors")
    assert all(torch.equal(converted[k], sd[k]) for k in sd)


def _tiny_gguf(path: Path, arch: str, quant: str | None = None) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    if quant is None:
        w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    else:
        qtype = gguf.GGMLQuantizationType[quant]
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor("token_embd.weight", np.zeros((4, type_size), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    ("arch", "quant", "needle"),
    [
        ("madeup", None, "GGUF architecture 'madeup' is not supported"),
        ("llama", "Q8_1", "GGUF quantization Q8_1 cannot be dequantized"),
    ],
)
def test_unsupported_gguf_is_refused(
    tmp_path: Path, arch: str, quant: str | None, needle: str
) -> None:
    src = _tiny_gguf(tmp_path / "m.gguf", arch, quant)
    out = tmp_path / "out"
    result = run_cli("convert", src, "-o", out)
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr
    assert not out.exists() and list(tmp_path.glob(".out.*")) == []


def test_not_a_gguf_and_missing_source(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not gguf")
    result = run_cli("convert", junk, "-o", tmp_path / "o")
    assert result.exit_code == 2 and "not a readable GGUF file" in result.stderr
    result = run_cli("convert", tmp_path / "nope", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    result = run_cli("convert", junk, "-o", tmp_path / "o", "--dtype", "float8")
    assert result.exit_code == 2 and "unknown dtype" in result.stderr


@pytest.mark.slow
def test_smollm2_gguf_converts_to_the_same_model(smollm2: Path) -> None:
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF): same logits and greedy answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = smollm2
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(
        SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template is not None
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        diff = (converted(**prompt).logits - direct(**prompt).logits).abs().max()
        assert diff < 1e-3
        a = converted.generate(**prompt, max_new_tokens=12, do_sample=False)
        b = direct.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)
    assert "Paris" in tok.decode(a[0, prompt["input_ids"].shape[1] :])
