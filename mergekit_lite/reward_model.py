"""Score (prompt, completion) pairs with a reward model trained by ``merge train rm``.

Used by evaluation (reward scores beside length and KL), the coefficient search and
PPO. Prompts and completions are tokenized exactly as the reward-model trainer saw them
(:class:`mergekit_lite.train.data.Tokens`): strings as plain text with EOS after the
completion, message lists through the chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.train.data import Tokens
from mergekit_lite.train.rm import rewards

__all__ = ["RewardModel"]


class RewardModel:
    """A loaded reward model; :meth:`score` returns one float per pair."""

    def __init__(self, model: Any, tokenizer: Any, *, device: str = "cpu", max_length: int = 4096):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self._tokens = Tokens(tokenizer, max_length)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str = "cpu") -> RewardModel:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        return cls(model, tokenizer, device=device)

    def score(
        self, prompts: Sequence[Any], completions: Sequence[Any], *, batch_size: int = 8
    ) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        seqs: list[list[int]] = []
        for p, c in zip(prompts, completions, strict=True):
            prompt_ids, msgs = self._tokens.prompt(p)
            seqs.append(prompt_ids + self._tokens.completion(c, "completion", msgs))
        out: list[float] = []
        pad = int(self.tokenizer.pad_token_id)
        with torch.no_grad():
            for i in range(0, len(seqs), batch_size):
                chunk = seqs[i : i + batch_size]
                width = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, s in enumerate(chunk):
                    ids[j, : len(s)] = torch.tensor(s)
                    mask[j, : len(s)] = 1
                r = rewards(self.model, ids.to(self.device), mask.to(self.device))
                out.extend(float(x) for x in r.cpu())
        return out
