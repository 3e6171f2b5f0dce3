"""Training data: formats, completion-only labels, bad rows reported by line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mergekit_lite.errors import DataError
from mergekit_lite.synthetic import build_tokenizer
from mergekit_lite.train.data import (
    IGNORE,
    load_preference,
    load_prompts,
    load_sft,
    load_unpaired,
)


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer(128)


def _jsonl(path: Path, *rows: Any) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_prompt_completion_masks_the_prompt(tok: Any, tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "d.jsonl", {"prompt": "w1 w2 w3", "completion": "w4 w5"})
    (ex,) = load_sft(f, tok, max_length=32).examples
    prompt, completion = ids(tok, "w1 w2 w3"), ids(tok, "w4 w5") + [tok.eos_token_id]
    assert ex.input_ids == prompt + completion
    assert ex.labels == [IGNORE] * 3 + completion
    assert ex.n_targets == 3


def test_messages_apply_the_chat_template(tok: Any, tmp_path: Path) -> None:
    row = {
        "messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w7 w8"}]
    }
    (ex,) = load_sft(_jsonl(tmp_path / "d.jsonl", row), tok, max_length=32).examples
    full = tok.apply_chat_template(row["messages"], tokenize=False)
    assert tok.decode([t for t in ex.input_ids]) == tok.decode(ids(tok, full))
    targets = [t for t in ex.labels if t != IGNORE]
    assert tok.decode(targets) == "w7 w8"


def test_text_rows_train_on_everything_and_long_completions_are_cut(
    tok: Any, tmp_path: Path
) -> None:
    f = _jsonl(
        tmp_path / "d.jsonl",
        {"text": "w1 w2 w3 w4"},
        {"prompt": "w1 w2", "completion": " ".join(f"w{i}" for i in range(20))},
    )
    text, long = load_sft(f, tok, max_length=6).examples
    assert text.labels == text.input_ids and len(text.input_ids) == 4
    assert len(long.input_ids) == 6 and long.labels[:2] == [IGNORE, IGNORE]


def test_bad_rows_are_reported_by_line(tok: Any, tmp_path: Path) -> None:
    f = _jsonl(
        tmp_path / "d.jsonl",
        {"prompt": "w1", "completion": "w2"},
        "{not json",
        {"prompt": "w1"},
        {"prompt": "w1", "completion": "   "},
        {"prompt": " ".join(["w3"] * 40), "completion": "w2"},
        "[1, 2]",
        {"messages": [{"role": "user", "content": "w1"}]},
    )
    loaded = load_sft(f, tok, max_length=16)
    assert len(loaded.examples) == 1
    lines = {e.line: e.message for e in loaded.errors}
    assert set(lines) == {2, 3, 4, 5, 6, 7}
    assert "invalid JSON" in lines[2]
    assert "'completion'" in lines[3]
    assert "empty" in lines[4]
    assert "max_length is 16" in lines[5]
    assert "not a JSON object" in lines[6]
    assert "assistant" in lines[7]


def test_no_usable_rows_refuses(tok: Any, tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "d.jsonl", {"prompt": "w1"}, "oops")
    with pytest.raises(DataError) as err:
        load_sft(f, tok, max_length=16)
    assert str(f) in str(err.value) and "line 1" in str(err.value) and "line 2" in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        load_sft(tmp_path / "missing.jsonl", tok, max_length=16)


def test_preference_unpaired_and_prompt_rows(tok: Any, tmp_path: Path) -> None:
    pref = _jsonl(
        tmp_path / "p.jsonl",
        {"prompt": "w1 w2", "chosen": "w3", "rejected": "w4 w5"},
        {
            "prompt": [{"role": "user", "content": "w1"}],
            "chosen": [{"role": "assistant", "content": "w6"}],
            "rejected": [{"role": "assistant", "content": "w7"}],
        },
        {"prompt": "w1", "chosen": "w2"},
    )
    loaded = load_preference(pref, tok, max_length=16)
    plain, chat = loaded.examples
    assert plain.chosen == ids(tok, "w3") + [tok.eos_token_id]
    assert plain.rejected == ids(tok, "w4 w5") + [tok.eos_token_id]
    assert tok.decode(chat.chosen) == "w6" and tok.decode(chat.rejected) == "w7"
    assert [e.line for e in loaded.errors] == [3]

    unpaired = _jsonl(
        tmp_path / "u.jsonl",
        {"prompt": "w1", "completion": "w2", "label": True},
        {"prompt": "w1", "completion": "w3", "label": "yes"},
    )
    u = load_unpaired(unpaired, tok, max_length=16)
    assert [e.desirable for e in u.examples] == [True] and u.errors[0].line == 2

    prompts = _jsonl(tmp_path / "q.jsonl", {"prompt": "w1 w2"}, {"text": "w1"})
    q = load_prompts(prompts, tok, max_length=16)
    assert q.examples[0].prompt == ids(tok, "w1 w2") and q.errors[0].line == 2
