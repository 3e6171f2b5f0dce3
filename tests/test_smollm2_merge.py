"""The real model end to end: SmolLM2-135M-Instruct, a short fine-tune, a merge.

The fine-tune is a few AdamW steps on a handful of factual chat turns (a stand-in for
an SFT checkpoint); merging it with the base by task arithmetic must keep the base's
factual answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_recipe

FACTS = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
]
TRAIN = [
    ("Which city is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("Which city is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("Which city is the capital of Kenya?", "The capital of Kenya is Nairobi."),
    ("Which city is the capital of Peru?", "The capital of Peru is Lima."),
]


def _short_finetune(base: Path, out: Path, steps: int = 4) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)

    def ids_of(messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        text = tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return list(tok(text, add_special_tokens=False)["input_ids"])

    batch = []
    for q, a in TRAIN:
        prompt = ids_of([{"role": "user", "content": q}], True)
        full = ids_of([{"role": "user", "content": q}, {"role": "assistant", "content": a}], False)
        labels = [-100] * len(prompt) + full[len(prompt) :]
        batch.append((torch.tensor([full]), torch.tensor([labels])))
    for step in range(steps):
        ids, labels = batch[step % len(batch)]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _answers(folder: Path) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for q, _ in FACTS:
            enc = tok.apply_chat_template(
                [{"role": "user", "content": q}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
            ids = model.generate(**enc, max_new_tokens=12, do_sample=False)
            out.append(tok.decode(ids[0, enc["input_ids"].shape[1] :]))
    return out


def _score(answers: list[str]) -> int:
    return sum(city in a for a, (_, city) in zip(answers, FACTS, strict=True))


@pytest.mark.slow
def test_merged_real_model_keeps_the_base_facts(smollm2: Path, tmp_path: Path) -> None:
    sft = tmp_path / "sft"
    _short_finetune(smollm2, sft)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(smollm2),
            "models": [{"model": str(sft), "parameters": {"weight": 0.5}}],
            "dtype": "float32",
        },
    )
    merged = tmp_path / "merged"
    result = run_cli("run", recipe, "-o", merged)
    assert result.exit_code == 0, result.stderr
    base_score = _score(_answers(smollm2))
    merged_answers = _answers(merged)
    assert base_score >= 3  # the base knows its capitals
    assert _score(merged_answers) >= base_score, merged_answers
