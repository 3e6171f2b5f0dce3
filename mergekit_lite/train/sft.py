"""Supervised fine-tuning (the article's stage 1): cross-entropy on completion tokens.

``loss = -sum over completion tokens of log p(token | prefix)``, divided by the number of
completion tokens in the (accumulated, global) batch by the shared loop. Labels are
shifted by one inside the loss; prompt tokens and padding carry the label -100.

With ``packing: true`` several examples share a row (greedily, in file order, up to
``max_length``): position ids restart at 0 for each example and a block-diagonal causal
attention mask keeps each example from seeing the others, so a packed row gives the same
loss as its examples one by one, with less padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mergekit_lite.train.config import SFTConfig
from mergekit_lite.train.data import IGNORE, SFTExample, load_sft
from mergekit_lite.train.loop import FitResult, fit, load_splits, prepare

__all__ = ["sft_loss", "collate_sft", "collate_packed", "pack", "train_sft"]


def pack(examples: Sequence[SFTExample], max_length: int) -> list[list[SFTExample]]:
    """Greedy packing in order: each row holds whole examples, at most ``max_length`` tokens."""
    rows: list[list[SFTExample]] = []
    size = 0
    for e in examples:
        if not rows or size + len(e.input_ids) > max_length:
            rows.append([])
            size = 0
        rows[-1].append(e)
        size += len(e.input_ids)
    return rows


def collate_packed(rows: Sequence[list[SFTExample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows: ``input_ids``, ``labels``, ``position_ids`` (restarting per example)
    and a float (B, 1, T, T) attention mask, 0 where a query may look, -inf elsewhere."""
    flat = [
        SFTExample(sum((e.input_ids for e in r), []), sum((e.labels for e in r), [])) for r in rows
    ]
    batch = collate_sft(flat, pad_id)
    width = batch["input_ids"].shape[1]
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
    for i, r in enumerate(rows):
        start = 0
        for k, e in enumerate(r):
            n = len(e.input_ids)
            positions[i, start : start + n] = torch.arange(n)
            segments[i, start : start + n] = k
            start += n
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    allowed = causal & same & (segments[:, :, None] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty rows
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
    return {
        "input_ids": batch["input_ids"],
        "labels": batch["labels"],
        "position_ids": positions,
        "attention_mask": mask,
    }


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
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs).logits
    targets = batch["labels"][:, 1:]  # token t+1 is predicted at position t
    flat = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    loss_sum = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    n = int((targets != IGNORE).sum())
    return loss_sum, n, {}


def train_sft(config: SFTConfig, *, resume: bool = False, **fit_kwargs: Any) -> FitResult:
    """Load the model and data, train, and write the checkpoint folder(s)."""
    from transformers import AutoModelForCausalLM

    ckpt, source, tokenizer = prepare(config, resume=resume)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    train, evaluate = load_splits(load_sft, config, tokenizer)
    pad = int(tokenizer.pad_token_id)
    examples: Sequence[Any] = train
    collate: Any = lambda ex: collate_sft(ex, pad)  # noqa: E731
    if config.packing:
        examples = pack(train, config.max_length)
        collate = lambda rows: collate_packed(rows, pad)  # noqa: E731
    return fit(
        model,
        tokenizer,
        config,
        train=examples,
        evaluate=evaluate,
        collate=collate,
        loss_fn=sft_loss,
        eval_collate=lambda ex: collate_sft(ex, pad),
        resume_from=ckpt,
        **fit_kwargs,
    )
