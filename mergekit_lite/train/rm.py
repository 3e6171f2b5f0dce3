"""Reward model (the article's stage 2): a separate scalar-head model trained on pairs.

``AutoModelForSequenceClassification`` with ``num_labels=1``, initialised from a causal
LM checkpoint (usually the SFT output; the head is new). The reward of a (prompt,
completion) is the head's value at the last non-padding token. Bradley-Terry loss
(Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, https://arxiv.org/abs/2203.02155)::

    loss = -log s(r_chosen - r_rejected - margin) + c * (r_chosen + r_rejected)^2

with an optional per-row ``margin`` (Llama 2, Touvron et al. 2023) and
``center_rewards_coefficient`` c (Eisenstein et al. 2023) that keeps rewards centred.
Metrics: ``accuracy`` (r_chosen > r_rejected), ``margin`` (mean r_chosen - r_rejected),
``rewards/chosen``, ``rewards/rejected``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mergekit_lite.train.config import RMConfig
from mergekit_lite.train.data import PreferenceExample, load_preference
from mergekit_lite.train.loop import FitResult, fit, load_splits, prepare

__all__ = ["RewardHead", "collate_pairs", "rewards", "rm_loss", "train_rm"]


def collate_pairs(examples: Sequence[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows (2B, T), right-padded, plus margins (B,)."""
    seqs = [e.prompt + e.chosen for e in examples] + [e.prompt + e.rejected for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "margin": torch.tensor([e.margin for e in examples], dtype=torch.float32),
        "n_targets": torch.tensor(len(examples)),
    }


def rewards(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head of a sequence-classification model at each row's last
    non-padding token (by the attention mask, whatever the pad token is): (B,)."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * positions).argmax(-1)  # (B,) last real token, any padding side
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return model.score(pooled).squeeze(-1).float()


class RewardHead(torch.nn.Module):
    """Wraps the model so that the loop's forward (and DistributedDataParallel's gradient
    synchronisation, which hooks the forward) goes through :func:`rewards`."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return rewards(self.model, input_ids, attention_mask)

    def save_pretrained(self, path: Any) -> None:
        self.model.save_pretrained(path)


def rm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], center_rewards_coefficient: float = 0.0
) -> tuple[torch.Tensor, int, dict[str, float]]:
    r = model(batch["input_ids"], batch["attention_mask"])
    b = r.shape[0] // 2
    chosen, rejected = r[:b], r[b:]
    losses = -F.logsigmoid(chosen - rejected - batch["margin"])
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    metrics = {
        "accuracy": float((chosen > rejected).float().mean()),
        "margin": float((chosen - rejected).mean()),
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
    }
    return losses.sum(), b, metrics


def train_rm(config: RMConfig, *, resume: bool = False, **fit_kwargs: Any) -> FitResult:
    """Load (or initialise) the reward model and the pairs, train, write the folder."""
    from transformers import AutoModelForSequenceClassification

    ckpt, source, tokenizer = prepare(config, resume=resume)
    torch.manual_seed(config.seed)  # the new head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    train, evaluate = load_splits(load_preference, config, tokenizer)
    pad = int(tokenizer.pad_token_id)
    c = config.center_rewards_coefficient
    return fit(
        RewardHead(model),
        tokenizer,
        config,
        train=train,
        evaluate=evaluate,
        collate=lambda ex: collate_pairs(ex, pad),
        loss_fn=lambda m, b: rm_loss(m, b, c),
        resume_from=ckpt,
        **fit_kwargs,
    )
