"""Supervised fine-tuning (the article's stage 1): cross-entropy on completion tokens.

``loss = -sum over completion tokens of log p(token | prefix)``, divided by the number of
completion tokens in the (accumulated, global) batch by the shared loop. Labels are
shifted by one inside the loss; prompt tokens and padding carry the label -100.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mergekit_lite.train.config import SFTConfig
from mergekit_lite.train.data import IGNORE, SFTExample, load_sft
from mergekit_lite.train.loop import FitResult, fit, latest_checkpoint

__all__ = ["sft_loss", "collate_sft", "train_sft"]


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Summed next-token cross-entropy over labelled tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]  # token t+1 is predicted at position t
    flat = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    loss_sum = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    n = int((targets != IGNORE).sum())
    return loss_sum, n, {}


def train_sft(config: SFTConfig, *, resume: bool = False, **fit_kwargs: Any) -> FitResult:
    """Load the model and data, train, and write the checkpoint folder(s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = latest_checkpoint(Path(config.output_dir)) if resume else None
    source = str(ckpt) if ckpt is not None else config.model
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    train = load_sft(config.dataset.train, tokenizer, max_length=config.max_length)
    evaluate = (
        load_sft(config.dataset.eval, tokenizer, max_length=config.max_length).examples
        if config.dataset.eval
        else None
    )
    pad = int(tokenizer.pad_token_id)
    return fit(
        model,
        tokenizer,
        config,
        train=train.examples,
        evaluate=evaluate,
        collate=lambda ex: collate_sft(ex, pad),
        loss_fn=sft_loss,
        resume_from=ckpt,
        **fit_kwargs,
    )
