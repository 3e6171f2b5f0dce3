"""Merging models whose vocabularies differ: tokenizer_source base | union | model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_weights, run_cli, write_recipe


def _extend(src: Path, dst: Path, tokens: list[str], values: list[float]) -> Path:
    """Copy ``src``, add special ``tokens`` to its tokenizer and resize its embedding and
    head; the new rows are filled with ``values``."""
    from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    tok.save_pretrained(dst)
    model = AutoModelForCausalLM.from_pretrained(dst)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        for i, v in enumerate(values):
            model.get_input_embeddings().weight[old + i] = v
            model.get_output_embeddings().weight[old + i] = -v
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def vocab_family(
    llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {
        "base": llama_family["base"],
        "a": _extend(llama_family["ft0"], root / "a", ["<tool>", "<think>"], [1.0, 2.0]),
        "b": _extend(llama_family["ft1"], root / "b", ["<think>", "<json>"], [3.0, 4.0]),
    }


def _linear(fam: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "base_model": str(fam["base"]),
        "models": [
            {"model": str(fam[k]), "parameters": {"weight": 1.0}} for k in ("base", "a", "b")
        ],
        "dtype": "float32",
        **extra,
    }


def test_union_vocabulary(vocab_family: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe(tmp_path / "r.yaml", _linear(vocab_family, tokenizer_source="union"))
    out = tmp_path / "union"
    result = run_cli("run", recipe, "-o", out)
    assert result.exit_code == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 131
    assert [tok.convert_tokens_to_ids(t) for t in ("<tool>", "<think>", "<json>")] == [
        128,
        129,
        130,
    ]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 131
    merged = load_weights(out)
    embed, head = merged["model.embed_tokens.weight"], merged["lm_head.weight"]
    assert embed.shape == (131, 64) and head.shape == (131, 64)
    # <tool>: only a has it -> every input takes a's row -> the average is a's row
    assert torch.allclose(embed[128], torch.full((64,), 1.0))
    # <think>: a (2.0) and b (3.0) have it, the base takes their mean 2.5 -> (2.5+2+3)/3
    assert torch.allclose(embed[129], torch.full((64,), 2.5))
    assert torch.allclose(head[129], torch.full((64,), -2.5))
    # <json>: only b
    assert torch.allclose(embed[130], torch.full((64,), 4.0))
    # shared tokens: the plain average of the three models' rows
    rows = [
        load_weights(vocab_family[k])["model.embed_tokens.weight"][:128] for k in "base a b".split()
    ]
    torch.testing.assert_close(embed[:128], sum(rows) / 3)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("w1 <json> w2", return_tensors="pt")["input_ids"]
    assert 130 in ids[0].tolist()
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_base_vocabulary_with_padding(vocab_family: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = write_recipe(
        tmp_path / "r.yaml",
        _linear(vocab_family, tokenizer={"source": "base", "pad_to_multiple_of": 48}),
    )
    out = tmp_path / "padded"
    result = run_cli("run", recipe, "-o", out)
    assert result.exit_code == 0, result.stderr
    embed = load_weights(out)["model.embed_tokens.weight"]
    assert embed.shape[0] == 144 and torch.count_nonzero(embed[128:]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 144
    assert len(AutoTokenizer.from_pretrained(out)) == 128
    AutoModelForCausalLM.from_pretrained(out)


def test_a_models_vocabulary(vocab_family: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    recipe = write_recipe(
        tmp_path / "r.yaml", _linear(vocab_family, tokenizer_source=str(vocab_family["b"]))
    )
    out = tmp_path / "b_vocab"
    result = run_cli("run", recipe, "-o", out)
    assert result.exit_code == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<json>") == 129 and len(tok) == 130
    embed = load_weights(out)["model.embed_tokens.weight"]
    assert embed.shape[0] == 130
    assert torch.allclose(embed[128], torch.full((64,), 2.5))  # <think> as in the union


def test_differing_vocabularies_need_a_tokenizer_source(
    vocab_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", _linear(vocab_family))
    out = tmp_path / "o"
    result = run_cli("run", recipe, "-o", out)
    assert result.exit_code == 2 and "tokenizer_source" in result.stderr and not out.exists()
