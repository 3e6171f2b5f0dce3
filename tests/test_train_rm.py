"""Reward model: the Bradley-Terry loss by hand, a learnable preference, the score API."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

from mergekit_lite.train.config import RMConfig, load_train_config
from mergekit_lite.train.rm import rm_loss, train_rm


class _Head(torch.nn.Module):
    """A stand-in reward model: the last non-padding token id / 10 (for the loss by hand)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        last = attention_mask.sum(-1) - 1
        return input_ids[torch.arange(input_ids.shape[0]), last].float() / 10


def test_bradley_terry_by_hand() -> None:
    # chosen rewards 0.5 and 0.2, rejected 0.1 and 0.4 (last non-padding token / 10)
    batch = {
        "input_ids": torch.tensor([[1, 5, 0], [2, 2, 0], [3, 1, 0], [4, 4, 0]]),
        "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]]),
        "margin": torch.tensor([0.0, 0.1]),
    }
    loss_sum, n, metrics = rm_loss(_Head(), batch)  # type: ignore[arg-type]
    # -log s(0.5 - 0.1) - log s(0.2 - 0.4 - 0.1)
    expected = math.log1p(math.exp(-0.4)) + math.log1p(math.exp(0.3))
    assert n == 2 and loss_sum.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["accuracy"] == 0.5 and metrics["margin"] == pytest.approx((0.4 - 0.2) / 2)
    centred, _, _ = rm_loss(_Head(), batch, center_rewards_coefficient=0.01)  # type: ignore[arg-type]
    assert centred.item() == pytest.approx(expected + 0.01 * (0.6**2 + 0.6**2), rel=1e-6)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Chosen completions use low-numbered words, rejected ones high-numbered words."""
    from mergekit_lite.synthetic import save_family

    root = tmp_path_factory.mktemp("rm")
    fam = save_family(root / "fam", arch="llama", n_finetunes=0, seed=0)
    rng = random.Random(0)

    def row() -> dict[str, str]:
        prompt = " ".join(f"w{rng.randrange(100)}" for _ in range(3))
        low = " ".join(f"w{rng.randrange(0, 40)}" for _ in range(3))
        high = " ".join(f"w{rng.randrange(60, 100)}" for _ in range(3))
        return {"prompt": prompt, "chosen": low, "rejected": high}

    (root / "train.jsonl").write_text("\n".join(json.dumps(row()) for _ in range(96)) + "\n")
    (root / "eval.jsonl").write_text("\n".join(json.dumps(row()) for _ in range(32)) + "\n")
    return {"model": fam["base"], "train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def test_reward_model_learns_the_preference(pairs: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_train_config(
        RMConfig,
        None,
        {
            "model": str(pairs["model"]),
            "dataset": {"train": str(pairs["train"]), "eval": str(pairs["eval"])},
            "output_dir": str(tmp_path / "rm"),
            "max_steps": 40,
            "learning_rate": 2e-3,
            "batch_size": 8,
            "max_length": 16,
            "eval_steps": 40,
        },
    )
    result = train_rm(cfg)
    assert result.history[-1]["accuracy"] > 0.9
    assert result.history[-1]["loss"] < result.history[0]["loss"]

    from mergekit_lite.reward_model import RewardModel

    rm = RewardModel.from_pretrained(tmp_path / "rm")
    rows = [json.loads(x) for x in pairs["eval"].read_text().splitlines()]
    good = rm.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    bad = rm.score([r["prompt"] for r in rows], [r["rejected"] for r in rows], batch_size=5)
    accuracy = sum(g > b for g, b in zip(good, bad, strict=True)) / len(rows)
    assert accuracy > 0.9  # held-out pairs, through the score() API
    with pytest.raises(ValueError):
        rm.score(["w1"], [])


def test_cli_trains_a_reward_model(pairs: dict[str, Path], tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "recipes" / "train" / "rm.yaml"
    assert yaml.safe_load(example.read_text())["center_rewards_coefficient"] >= 0
    result = run_cli(
        "train", "rm", example,
        "--model", pairs["model"],
        "--dataset.train", pairs["train"], "--dataset.eval", pairs["eval"],
        "--output_dir", tmp_path / "out", "--max_steps", "2", "--max_length", "16",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    log = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert {"accuracy", "margin", "rewards/chosen", "rewards/rejected"} <= set(log[-1])
