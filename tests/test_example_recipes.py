"""Every example recipe in recipes/ runs through the CLI and gives a loadable model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

from mergekit_lite.methods.registry import METHODS

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
MERGE_RECIPES = [p for p in RECIPES if "merge_method" in yaml.safe_load(p.read_text())]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ckpt/{base,sft,dpo,ipo}, the names the example recipes use."""
    from mergekit_lite.synthetic import save_family

    root = tmp_path_factory.mktemp("examples")
    fam = save_family(root / "family", arch="llama", n_finetunes=3, seed=11)
    (root / "ckpt").mkdir()
    for name, key in {"base": "base", "sft": "ft0", "dpo": "ft1", "ipo": "ft2"}.items():
        os.symlink(fam[key], root / "ckpt" / name)
    return root


def test_every_method_has_an_example() -> None:
    used = {yaml.safe_load(p.read_text())["merge_method"] for p in MERGE_RECIPES}
    assert used == set(METHODS)
    assert (Path(__file__).parent.parent / "recipes" / "sft_dpo_task_arithmetic.yaml").is_file()


@pytest.mark.parametrize("recipe", MERGE_RECIPES, ids=[p.stem for p in MERGE_RECIPES])
def test_example_recipe_runs(recipe: Path, ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(ckpt_dir)
    out = ckpt_dir / "out" / recipe.stem
    result = run_cli("run", recipe, "-o", out)
    assert result.exit_code == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        tokens = model.generate(torch.tensor([[1, 4, 8]]), max_new_tokens=3, do_sample=False)
    assert tokens.shape == (1, 6)
    logits = model(torch.tensor([[1, 4, 8]])).logits
    assert torch.isfinite(logits).all()
