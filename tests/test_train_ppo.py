"""PPO: GAE and the clipped losses by hand; a toy reward rises, a large KL coefficient
keeps the policy near the reference."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_cli

from mergekit_lite.train.config import PPOConfig, load_train_config
from mergekit_lite.train.ppo import gae, ppo_losses, train_ppo

TARGET = 9  # the toy reward counts this token in the response


def test_gae_by_hand() -> None:
    # r = [0, 0, 1], V = 0.5 everywhere, gamma 1, lambda 0.95:
    # A2 = 1 - 0.5 = 0.5; A1 = 0 + 0.95 * 0.5 = 0.475; A0 = 0.95 * 0.475 = 0.45125
    adv, ret = gae(
        torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3), 1.0, 0.95
    )
    assert adv[0].tolist() == pytest.approx([0.45125, 0.475, 0.5])
    assert ret[0].tolist() == pytest.approx([0.95125, 0.975, 1.0])
    # masked tail: nothing flows back from padding
    adv, _ = gae(
        torch.tensor([[0.0, 1.0, 5.0]]), torch.zeros(1, 3), torch.tensor([[1, 1, 0]]), 1.0, 1.0
    )
    assert adv[0].tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_clipped_losses_by_hand() -> None:
    ones = torch.ones(1, 1)
    # ratio 1.5 > 1 + 0.2 with A = 1: max(-1.5, -1.2) = -1.2, clipped
    pg, vf, stats = ppo_losses(
        torch.log(torch.tensor([[1.5]])), torch.zeros(1, 1), ones,
        values=ones, old_values=torch.zeros(1, 1), returns=ones, mask=ones,
        cliprange=0.2, cliprange_value=0.2,
    )  # fmt: skip
    assert pg.item() == pytest.approx(-1.2) and stats["policy/clipfrac"] == 1.0
    # value moved 0 -> 1, clipped to 0.2: 0.5 * max((1-1)^2, (0.2-1)^2) = 0.32
    assert vf.item() == pytest.approx(0.32)
    pg, _, stats = ppo_losses(
        torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]),
        torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
        cliprange=0.2, cliprange_value=0.2,
    )  # fmt: skip
    assert pg.item() == pytest.approx(0.0) and stats["policy/approxkl"] == 0.0


@pytest.fixture(scope="module")
def ppo_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mergekit_lite.synthetic import save_family

    root = tmp_path_factory.mktemp("ppo")
    fam = save_family(root / "fam", arch="llama", n_finetunes=0, seed=0)
    rng = random.Random(0)
    rows = [{"prompt": " ".join(f"w{rng.randrange(100)}" for _ in range(3))} for _ in range(32)]
    (root / "prompts.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    return {"model": fam["base"], "prompts": root / "prompts.jsonl"}


def _config(setup: dict[str, Path], out: Path, **over: Any) -> PPOConfig:
    base = {
        "model": str(setup["model"]),
        "reward_model": str(setup["model"]),  # also initialises the value model
        "dataset": {"train": str(setup["prompts"])},
        "output_dir": str(out),
        "max_steps": 20,
        "learning_rate": 3e-3,
        "lr_scheduler": "constant",
        "batch_size": 8,
        "max_length": 16,
        "max_new_tokens": 8,
        "ppo_epochs": 2,
        "num_mini_batches": 2,
    }
    return load_train_config(PPOConfig, None, {**base, **over})


def _count_target(prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
    return torch.tensor([sum(t == TARGET for t in r) for r in responses], dtype=torch.float32)


def _mean(history: list[dict[str, Any]], key: str, sl: slice) -> float:
    values = [h[key] for h in history[sl]]
    return sum(values) / len(values)


def test_toy_reward_rises(ppo_setup: dict[str, Path], tmp_path: Path) -> None:
    history = train_ppo(
        _config(ppo_setup, tmp_path / "a", kl_coef=0.05), reward_fn=_count_target
    ).history
    assert (
        _mean(history, "objective/scores", slice(-3, None))
        > _mean(history, "objective/scores", slice(0, 3)) + 1
    )
    for key in ("objective/kl", "objective/rlhf_reward", "policy/approxkl", "policy/clipfrac",
                "loss/policy", "loss/value", "response_length/mean"):  # fmt: skip
        assert math.isfinite(history[-1][key]), key
    assert (tmp_path / "a" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_large_kl_coefficient_stays_near_the_reference(
    ppo_setup: dict[str, Path], tmp_path: Path
) -> None:
    history = train_ppo(
        _config(ppo_setup, tmp_path / "b", kl_coef=2.0), reward_fn=_count_target
    ).history
    assert max(h["objective/kl"] for h in history) < 3
    assert _mean(history, "objective/scores", slice(-3, None)) < 1


def test_missing_eos_penalty_and_reward_model_cli(
    ppo_setup: dict[str, Path], tmp_path: Path
) -> None:
    zero = lambda p, r: torch.zeros(len(r))  # noqa: E731
    history = train_ppo(
        _config(ppo_setup, tmp_path / "c", max_steps=1, missing_eos_penalty=1.0), reward_fn=zero
    ).history
    assert -1.0 <= history[0]["objective/scores"] <= -0.5  # most samples never emit EOS

    example = Path(__file__).parent.parent / "recipes" / "train" / "ppo.yaml"
    result = run_cli(
        "train", "ppo", example,
        "--model", ppo_setup["model"], "--reward_model", ppo_setup["model"],
        "--dataset.train", ppo_setup["prompts"], "--output_dir", tmp_path / "cli",
        "--max_steps", "1", "--batch_size", "4", "--max_new_tokens", "4", "--max_length", "16",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    log = json.loads((tmp_path / "cli" / "log.jsonl").read_text().splitlines()[-1])
    assert log["step"] == 1 and "objective/scores" in log


def test_resume_equals_an_uninterrupted_run(ppo_setup: dict[str, Path], tmp_path: Path) -> None:
    straight = train_ppo(_config(ppo_setup, tmp_path / "s", max_steps=4), reward_fn=_count_target)
    out = tmp_path / "r"
    first = train_ppo(_config(ppo_setup, out, max_steps=4), reward_fn=_count_target, stop_at=2)
    assert first.steps == 2 and (out / "checkpoint-2" / "value_model" / "config.json").is_file()
    rest = train_ppo(_config(ppo_setup, out, max_steps=4), reward_fn=_count_target, resume=True)
    for key in ("loss", "objective/scores", "objective/kl"):
        assert [h[key] for h in rest.history] == pytest.approx(
            [h[key] for h in straight.history], abs=1e-5
        )
