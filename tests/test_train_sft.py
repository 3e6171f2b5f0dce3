"""SFT over the shared loop: it learns, it is invariant to how a batch is split (micro-
batches or processes), and a resumed run continues exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import run_cli

from mergekit_lite.train.config import SFTConfig, load_train_config
from mergekit_lite.train.sft import train_sft


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama and a learnable task: the completion is a fixed function of the prompt."""
    from mergekit_lite.synthetic import save_family

    root = tmp_path_factory.mktemp("sft")
    fam = save_family(root / "fam", arch="llama", n_finetunes=0, seed=0)
    rows = [
        {"prompt": f"w{i} w{i + 1}", "completion": f"w{(7 * i) % 100} w{(7 * i + 3) % 100}"}
        for i in range(64)
    ]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:8]) + "\n")
    return {"model": fam["base"], "train": root / "train.jsonl", "eval": root / "eval.jsonl"}


def _config(setup: dict[str, Path], out: Path, **over: Any) -> SFTConfig:
    base = {
        "model": str(setup["model"]),
        "dataset": {"train": str(setup["train"]), "eval": str(setup["eval"])},
        "output_dir": str(out),
        "max_steps": 8,
        "learning_rate": 3e-3,
        "batch_size": 8,
        "max_length": 16,
        "warmup_steps": 2,
        "seed": 3,
    }
    return load_train_config(SFTConfig, None, {**base, **over})


def _losses(history: list[dict[str, Any]]) -> list[float]:
    return [h["loss"] for h in history]


def test_sft_learns_and_writes_a_checkpoint(sft_setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train_sft(_config(sft_setup, out, max_steps=30, eval_steps=10))
    losses = _losses(result.history)
    assert losses[-1] < 0.8 * losses[0]
    assert result.history[-1]["eval_loss"] < result.history[9]["eval_loss"]
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == list(range(1, 31))
    assert {"step", "loss", "lr", "tokens"} <= set(lines[0])
    assert lines[0]["lr"] < lines[1]["lr"]  # warm-up
    assert yaml.safe_load((out / "train_config.yaml").read_text())["max_steps"] == 30
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 30
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template is not None


def test_accumulation_does_not_change_the_run(sft_setup: dict[str, Path], tmp_path: Path) -> None:
    whole = train_sft(_config(sft_setup, tmp_path / "a", batch_size=8))
    split = train_sft(
        _config(sft_setup, tmp_path / "b", batch_size=2, gradient_accumulation_steps=4)
    )
    assert _losses(split.history) == pytest.approx(_losses(whole.history), abs=1e-5)


def test_resume_equals_an_uninterrupted_run(sft_setup: dict[str, Path], tmp_path: Path) -> None:
    straight = train_sft(_config(sft_setup, tmp_path / "straight"))
    out = tmp_path / "resumed"
    first = train_sft(_config(sft_setup, out), stop_at=4)
    assert first.steps == 4 and (out / "checkpoint-4" / "optimizer.pt").is_file()
    rest = train_sft(_config(sft_setup, out), resume=True)
    assert rest.steps == 8
    assert _losses(rest.history) == pytest.approx(_losses(straight.history), abs=1e-6)
    logged = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 9))


def test_cli_config_errors_and_overrides(sft_setup: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config(sft_setup, tmp_path / "out").model_dump(mode="json")))
    result = run_cli("train", "sft", cfg, "--max_steps", "2", "--learning_rat", "1e-3")
    assert (
        result.exit_code == 2 and "learning_rat" in result.stderr and "unknown key" in result.stderr
    )
    result = run_cli(
        "train", "sft", cfg, "--max_steps", "2", "--dataset.train", tmp_path / "nope.jsonl"
    )
    assert result.exit_code == 2 and "does not exist" in result.stderr
    result = run_cli("train", "sft", cfg, "--max_steps", "2")
    assert result.exit_code == 0, result.stderr
    assert "2 steps" in result.stdout


def test_packing_gives_the_same_loss_as_one_by_one(sft_setup: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_lite.train.data import load_sft
    from mergekit_lite.train.sft import collate_packed, collate_sft, pack, sft_loss

    tok = AutoTokenizer.from_pretrained(sft_setup["model"])
    model = AutoModelForCausalLM.from_pretrained(sft_setup["model"]).eval()
    examples = load_sft(sft_setup["train"], tok, max_length=16).examples[:9]
    rows = pack(examples, max_length=16)
    assert len(rows) < len(examples) and all(sum(len(e.input_ids) for e in r) <= 16 for r in rows)
    with torch.no_grad():
        packed, n_packed, _ = sft_loss(model, collate_packed(rows, 0))
        alone = [sft_loss(model, collate_sft([e], 0)) for e in examples]
    assert n_packed == sum(n for _, n, _ in alone)
    assert packed.item() == pytest.approx(sum(float(s) for s, _, _ in alone), rel=1e-5)


def test_packed_training_runs(sft_setup: dict[str, Path], tmp_path: Path) -> None:
    result = train_sft(_config(sft_setup, tmp_path / "p", packing=True, batch_size=2, max_steps=12))
    losses = _losses(result.history)
    assert losses[-1] < losses[0]


def test_example_config_runs(sft_setup: dict[str, Path], tmp_path: Path) -> None:
    example = Path(__file__).parent.parent / "recipes" / "train" / "sft.yaml"
    result = run_cli(
        "train", "sft", example,
        "--model", sft_setup["model"],
        "--dataset.train", sft_setup["train"],
        "--dataset.eval", sft_setup["eval"],
        "--output_dir", tmp_path / "out",
        "--max_steps", "3", "--max_length", "16", "--eval_steps", "3", "--save_steps", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").is_file()
    assert "eval_loss" in (tmp_path / "out" / "log.jsonl").read_text().splitlines()[-1]
