"""The DPO family through the shared loop: ln 2 at the start, learning, every loss_type."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from mergekit_lite.errors import RecipeError
from mergekit_lite.train.config import DPOConfig, load_train_config
from mergekit_lite.train.dpo import train_dpo


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Chosen completions use low-numbered words, rejected ones high-numbered words."""
    from mergekit_lite.synthetic import save_family

    root = tmp_path_factory.mktemp("dpo")
    fam = save_family(root / "fam", arch="llama", n_finetunes=0, seed=0)
    rng = random.Random(1)

    def words(lo: int, hi: int) -> str:
        return " ".join(f"w{rng.randrange(lo, hi)}" for _ in range(3))

    rows = [
        {"prompt": words(0, 100), "chosen": words(0, 40), "rejected": words(60, 100)}
        for _ in range(96)
    ]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    unpaired = [
        {"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
        for r in rows
        for k in ("chosen", "rejected")
    ]
    (root / "unpaired.jsonl").write_text("\n".join(json.dumps(r) for r in unpaired) + "\n")
    return {
        "model": fam["base"],
        "pairs": root / "pairs.jsonl",
        "unpaired": root / "unpaired.jsonl",
    }


def _config(prefs: dict[str, Path], out: Path, **over: Any) -> DPOConfig:
    data = prefs["unpaired"] if over.get("loss_type") == "kto" else prefs["pairs"]
    base = {
        "model": str(prefs["model"]),
        "dataset": {"train": str(data)},
        "output_dir": str(out),
        "max_steps": 3,
        "learning_rate": 1e-3,
        "batch_size": 8,
        "max_length": 16,
        "seed": 0,
    }
    return load_train_config(DPOConfig, None, {**base, **over})


def test_first_step_is_ln2_with_zero_margins(prefs: dict[str, Path], tmp_path: Path) -> None:
    first = train_dpo(_config(prefs, tmp_path / "a", max_steps=1)).history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["logps/chosen"] < 0


def test_dpo_learns_the_preference(prefs: dict[str, Path], tmp_path: Path) -> None:
    result = train_dpo(_config(prefs, tmp_path / "dpo", max_steps=24, beta=0.5))
    last = result.history[-1]
    assert last["rewards/accuracies"] > 0.8
    assert last["rewards/margins"] > 0 and last["loss"] < math.log(2)


def test_precomputed_reference_gives_the_same_run(prefs: dict[str, Path], tmp_path: Path) -> None:
    live = train_dpo(_config(prefs, tmp_path / "live"))
    pre = train_dpo(_config(prefs, tmp_path / "pre", precompute_ref_logprobs=True))
    assert [h["loss"] for h in pre.history] == pytest.approx(
        [h["loss"] for h in live.history], abs=1e-5
    )


@pytest.mark.parametrize("loss_type", ["robust", "hinge", "ipo", "orpo", "simpo", "kto"])
def test_every_loss_type_trains(prefs: dict[str, Path], tmp_path: Path, loss_type: str) -> None:
    extra: dict[str, Any] = {"label_smoothing": 0.1} if loss_type == "robust" else {}
    result = train_dpo(_config(prefs, tmp_path / loss_type, loss_type=loss_type, **extra))
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert ("kl" in result.history[-1]) == (loss_type == "kto")


def test_config_and_cli(prefs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="kto"):
        _config(prefs, tmp_path / "x", loss_type="kto", precompute_ref_logprobs=True)
    with pytest.raises(RecipeError, match="loss_type"):
        _config(prefs, tmp_path / "x", loss_type="dpo++")
    example = Path(__file__).parent.parent / "recipes" / "train" / "dpo.yaml"
    result = run_cli(
        "train", "dpo", example,
        "--model", prefs["model"],
        "--dataset.train", prefs["pairs"], "--dataset.eval", prefs["pairs"],
        "--output_dir", tmp_path / "cli", "--max_steps", "2", "--max_length", "16",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    log = [json.loads(x) for x in (tmp_path / "cli" / "log.jsonl").read_text().splitlines()]
    assert {"rewards/accuracies", "rewards/margins", "logps/rejected"} <= set(log[-1])
