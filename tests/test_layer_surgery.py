"""passthrough slices as layer surgery: duplicate, drop and interleave layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_weights, run_cli, write_recipe

from mergekit_lite.io.safetensors_io import read_safetensors_header


def _stack(tmp_path: Path, slices: list[tuple[Path, int, int]]) -> Path:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(m), "layer_range": [a, b]}]} for m, a, b in slices
            ],
        },
    )
    out = tmp_path / "out"
    result = run_cli("run", recipe, "-o", out)
    assert result.exit_code == 0, result.stderr
    return out


def _layer(sd: dict[str, torch.Tensor], i: int) -> list[torch.Tensor]:
    prefix = f"model.layers.{i}."
    return [sd[k] for k in sorted(sd) if k.startswith(prefix)]


def _check_loads(out: Path, n_layers: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == n_layers
    assert len(cfg["layer_types"]) == n_layers
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 6)
    return cfg


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        # duplicate the middle layers: 0 1 2 | 1 2 3
        (
            [("base", 0, 3), ("base", 1, 4)],
            [("base", 0), ("base", 1), ("base", 2), ("base", 1), ("base", 2), ("base", 3)],
        ),
        # drop layers 1 and 2
        ([("base", 0, 1), ("base", 3, 4)], [("base", 0), ("base", 3)]),
        # interleave two models layer by layer
        (
            [("base", 0, 1), ("ft0", 1, 2), ("base", 2, 3), ("ft0", 3, 4)],
            [("base", 0), ("ft0", 1), ("base", 2), ("ft0", 3)],
        ),
    ],
    ids=["duplicate", "drop", "interleave"],
)  # fmt: skip
def test_layer_surgery(
    plan: list[tuple[str, int, int]],
    expected: list[tuple[str, int]],
    qwen_family: dict[str, Path],
    tmp_path: Path,
) -> None:
    out = _stack(tmp_path, [(qwen_family[m], a, b) for m, a, b in plan])
    _check_loads(out, len(expected))
    merged = load_weights(out)
    sources = {m: load_weights(qwen_family[m]) for m in ("base", "ft0")}
    for i, (model, layer) in enumerate(expected):
        got, want = _layer(merged, i), _layer(sources[model], layer)
        assert len(got) == len(want) and all(
            torch.equal(g, w) for g, w in zip(got, want, strict=True)
        )
    assert f"model.layers.{len(expected)}.mlp.up_proj.weight" not in merged
    # duplicated layers are stored twice: distinct byte ranges, no shared storage
    header = read_safetensors_header(out / "model.safetensors")
    offsets = [i.offset for i in header.values()]
    assert len(set(offsets)) == len(offsets)
