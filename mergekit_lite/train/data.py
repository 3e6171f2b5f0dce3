"""Training data: local JSONL rows -> tokenized examples with completion-only labels.

Formats (one JSON object per line):

* SFT: ``{"messages": [...]}`` (the chat template is applied; the last message must be
  the assistant's and is the completion), ``{"prompt", "completion"}`` or ``{"text"}``
  (every token is a target);
* preference: ``{"prompt", "chosen", "rejected"}``, as strings or message lists (the
  prompt's messages, and the chosen/rejected assistant turns), with an optional
  numeric ``margin``;
* unpaired (KTO): ``{"prompt", "completion", "label"}`` with a boolean label;
* prompt-only (PPO): ``{"prompt"}``.

Prompt tokens and padding are masked out of the labels (``-100``), so the loss is on
completion tokens only. String completions end with the tokenizer's EOS token; chat
completions end as the template ends them. A completion that does not fit
``max_length`` is truncated; a prompt that does not leave room for at least one
completion token is a bad row. Bad rows (invalid JSON, missing keys, empty completions,
over-long prompts) are reported with their line numbers; loading fails with a
:class:`~mergekit_lite.errors.DataError` only if no row is usable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_lite.errors import DataError

__all__ = [
    "RowError",
    "Tokens",
    "SFTExample",
    "PreferenceExample",
    "UnpairedExample",
    "PromptExample",
    "Loaded",
    "read_jsonl",
    "load_sft",
    "load_preference",
    "load_unpaired",
    "load_prompts",
]

IGNORE = -100
Message = dict[str, str]


@dataclass(frozen=True)
class RowError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the loss does not look

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass(frozen=True)
class PreferenceExample:
    prompt: list[int]
    chosen: list[int]  # completion tokens only
    rejected: list[int]
    margin: float = 0.0  # optional per-row preference strength (reward-model margin)


@dataclass(frozen=True)
class UnpairedExample:
    prompt: list[int]
    completion: list[int]
    desirable: bool


@dataclass(frozen=True)
class PromptExample:
    prompt: list[int]


@dataclass
class Loaded:
    """Usable examples, and the rows that were skipped (with why)."""

    examples: list[Any]
    errors: list[RowError] = field(default_factory=list)


class _BadRow(ValueError):
    pass


def read_jsonl(path: str | Path) -> tuple[list[tuple[int, dict[str, Any]]], list[RowError]]:
    """``(line number, object)`` for each non-blank line, and the lines that are not
    JSON objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "data file does not exist")
    rows, errors = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(RowError(n, f"invalid JSON ({e.msg})"))
                continue
            if not isinstance(obj, dict):
                errors.append(RowError(n, "not a JSON object"))
                continue
            rows.append((n, obj))
    return rows, errors


def _require(row: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise _BadRow(f"missing key(s) {', '.join(map(repr, missing))}")


def _messages(value: Any, key: str) -> list[Message]:
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        raise _BadRow(f"{key!r} must be a list of {{role, content}} messages")
    return value


def _nonempty_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _BadRow(f"{key!r} must be a string or a list of messages")
    if not value.strip():
        raise _BadRow(f"{key!r} is empty")
    return value


class Tokens:
    """Prompt and completion token ids, as chat template or plain text."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tok = tokenizer
        self.max_length = max_length

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def prompt(self, prompt: Any) -> tuple[list[int], list[Message] | None]:
        if isinstance(prompt, list):
            msgs = _messages(prompt, "prompt")
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return self._ids(text, special=False), msgs
        return self._ids(_nonempty_str(prompt, "prompt"), special=True), None

    def completion(self, value: Any, key: str, messages: list[Message] | None) -> list[int]:
        if messages is None:
            text = _nonempty_str(value, key)
            eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
            return self._ids(text, special=False) + eos
        turn = value
        if isinstance(value, list):
            turn = _messages(value, key)
            if len(turn) != 1 or turn[0]["role"] != "assistant":
                raise _BadRow(f"{key!r} must be one assistant message")
            turn = turn[0]["content"]
        _nonempty_str(turn, key)
        prompt_text = self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        full_text = self.tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": turn}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise _BadRow("the chat template does not extend the prompt with the answer")
        return self._ids(full_text[len(prompt_text) :], special=False)

    def fit(self, prompt: list[int], completion: list[int]) -> list[int]:
        """The completion, truncated to fit; a prompt leaving no room is a bad row."""
        room = self.max_length - len(prompt)
        if room < 1:
            raise _BadRow(f"prompt is {len(prompt)} tokens, max_length is {self.max_length}")
        if not completion:
            raise _BadRow("completion is empty")
        return completion[:room]


def _load(path: str | Path, build: Any) -> Loaded:
    rows, errors = read_jsonl(path)
    examples = []
    for n, row in rows:
        try:
            examples.append(build(row))
        except _BadRow as e:
            errors.append(RowError(n, str(e)))
    if not examples:
        first = "; ".join(str(e) for e in errors[:3]) or "the file is empty"
        raise DataError(str(path), f"no usable rows ({first})")
    return Loaded(examples, errors)


def load_sft(path: str | Path, tokenizer: Any, *, max_length: int) -> Loaded:
    """SFT examples with labels on the completion (``text``: on everything)."""
    t = Tokens(tokenizer, max_length)

    def build(row: dict[str, Any]) -> SFTExample:
        if "messages" in row:
            msgs = _messages(row["messages"], "messages")
            if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
                raise _BadRow("'messages' must end with an assistant message after a prompt")
            prompt, prompt_msgs = t.prompt(msgs[:-1])
            completion = t.completion(msgs[-1]["content"], "messages", prompt_msgs)
        elif "text" in row:
            ids = t._ids(_nonempty_str(row["text"], "text"), special=True)[:max_length]
            return SFTExample(ids, list(ids))
        else:
            _require(row, "prompt", "completion")
            prompt, prompt_msgs = t.prompt(row["prompt"])
            completion = t.completion(row["completion"], "completion", prompt_msgs)
        completion = t.fit(prompt, completion)
        return SFTExample(prompt + completion, [IGNORE] * len(prompt) + completion)

    return _load(path, build)


def load_preference(path: str | Path, tokenizer: Any, *, max_length: int) -> Loaded:
    """``{"prompt", "chosen", "rejected"}`` rows as token ids."""
    t = Tokens(tokenizer, max_length)

    def build(row: dict[str, Any]) -> PreferenceExample:
        _require(row, "prompt", "chosen", "rejected")
        prompt, msgs = t.prompt(row["prompt"])
        chosen = t.fit(prompt, t.completion(row["chosen"], "chosen", msgs))
        rejected = t.fit(prompt, t.completion(row["rejected"], "rejected", msgs))
        margin = row.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise _BadRow("'margin' must be a number")
        return PreferenceExample(prompt, chosen, rejected, float(margin))

    return _load(path, build)


def load_unpaired(path: str | Path, tokenizer: Any, *, max_length: int) -> Loaded:
    """``{"prompt", "completion", "label"}`` rows (KTO)."""
    t = Tokens(tokenizer, max_length)

    def build(row: dict[str, Any]) -> UnpairedExample:
        _require(row, "prompt", "completion", "label")
        if not isinstance(row["label"], bool):
            raise _BadRow("'label' must be true or false")
        prompt, msgs = t.prompt(row["prompt"])
        completion = t.fit(prompt, t.completion(row["completion"], "completion", msgs))
        return UnpairedExample(prompt, completion, row["label"])

    return _load(path, build)


def load_prompts(path: str | Path, tokenizer: Any, *, max_length: int) -> Loaded:
    """``{"prompt"}`` rows (PPO rollouts)."""
    t = Tokens(tokenizer, max_length)

    def build(row: dict[str, Any]) -> PromptExample:
        _require(row, "prompt")
        prompt, _ = t.prompt(row["prompt"])
        if len(prompt) >= max_length:
            raise _BadRow(f"prompt is {len(prompt)} tokens, max_length is {max_length}")
        return PromptExample(prompt)

    return _load(path, build)
