"""The DPO family (the article's stage 4): preference optimisation without a reward model.

Chosen and rejected completions go through the policy in one concatenated forward pass;
their summed completion log-probabilities feed a loss from
:mod:`mergekit_lite.train.losses` (``loss_type``). Methods with a reference use a frozen
copy of the starting model (or ``reference_model``); with ``precompute_ref_logprobs``
the reference scores every training pair once before training and is then released, so
only the policy is in memory while updating. ORPO and SimPO need no reference.

KTO (``loss_type: kto``) trains on unpaired ``{"prompt", "completion", "label"}`` rows;
its reference point z0 is estimated per batch from mismatched pairs (prompt i with
completion i+1), as the KTO paper does.

Metrics (TRL's names): ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (``kl`` for KTO).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_lite.train.config import DPOConfig
from mergekit_lite.train.data import (
    IGNORE,
    PreferenceExample,
    UnpairedExample,
    load_preference,
    load_unpaired,
)
from mergekit_lite.train.loop import FitResult, fit, load_splits, prepare
from mergekit_lite.train.losses import (
    REFERENCE_FREE,
    PreferenceLogps,
    kto_loss,
    preference_loss,
    sequence_logps,
)

__all__ = ["collate_preference", "collate_unpaired", "train_dpo"]


@dataclass(frozen=True)
class _WithRef:
    """A pair with its reference log-probs computed once (``precompute_ref_logprobs``)."""

    example: PreferenceExample
    ref_chosen: float
    ref_rejected: float


def _rows(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt, completion) pairs -> right-padded ids, mask and completion-only labels."""
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p) : n] = torch.tensor(c)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_preference(items: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows (2B, T); reference log-probs if precomputed."""
    pairs = [it.example if isinstance(it, _WithRef) else it for it in items]
    batch = _rows(
        [(e.prompt, e.chosen) for e in pairs] + [(e.prompt, e.rejected) for e in pairs], pad_id
    )
    batch["n_targets"] = torch.tensor(len(pairs))
    if items and isinstance(items[0], _WithRef):
        batch["ref_chosen"] = torch.tensor([it.ref_chosen for it in items], dtype=torch.float64)
        batch["ref_rejected"] = torch.tensor([it.ref_rejected for it in items], dtype=torch.float64)
    return batch


def collate_unpaired(items: Sequence[UnpairedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """The completions (B, T), then the mismatched KL pairs (B, T), and the labels."""
    b = len(items)
    seqs = [(e.prompt, e.completion) for e in items]
    seqs += [(items[i].prompt, items[(i + 1) % b].completion) for i in range(b)]
    batch = _rows(seqs, pad_id)
    batch["desirable"] = torch.tensor([e.desirable for e in items])
    batch["n_targets"] = torch.tensor(b)
    return batch


def _logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits.float(), batch["labels"])


class _Objective:
    def __init__(self, config: DPOConfig, reference: torch.nn.Module | None) -> None:
        self.config = config
        self.reference = reference

    def _reference(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.reference is not None
        with torch.no_grad():
            ref, _ = _logps(self.reference, batch)
        return ref

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, int, dict[str, float]]:
        c = self.config
        if c.loss_type == "kto":
            return self._kto(model, batch)
        logps, ntok = _logps(model, batch)
        b = logps.shape[0] // 2
        if c.loss_type in REFERENCE_FREE:
            ref_c = ref_r = None
        elif "ref_chosen" in batch:
            ref_c, ref_r = (
                batch["ref_chosen"].to(logps.dtype),
                batch["ref_rejected"].to(logps.dtype),
            )
        else:
            ref = self._reference(batch)
            ref_c, ref_r = ref[:b], ref[b:]
        p = PreferenceLogps(logps[:b], logps[b:], ntok[:b], ntok[b:], ref_c, ref_r)
        out = preference_loss(
            c.loss_type, p, beta=c.beta, label_smoothing=c.label_smoothing, gamma=c.gamma
        )
        metrics = out.metrics()
        metrics["logps/chosen"] = float(logps[:b].mean())
        metrics["logps/rejected"] = float(logps[b:].mean())
        return out.losses.sum(), b, metrics

    def _kto(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, int, dict[str, float]]:
        c = self.config
        b = batch["desirable"].shape[0]
        main = {
            k: v[:b] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")
        }
        kl = {k: v[b:] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        policy, _ = _logps(model, main)
        with torch.no_grad():
            kl_policy, _ = _logps(model, kl)
        loss, metrics = kto_loss(
            policy,
            self._reference(main),
            batch["desirable"],
            kl_policy,
            self._reference(kl),
            beta=c.beta,
            desirable_weight=c.desirable_weight,
            undesirable_weight=c.undesirable_weight,
        )
        return loss * b, b, metrics


def _precompute(
    reference: torch.nn.Module, examples: Sequence[PreferenceExample], pad_id: int, batch_size: int
) -> list[_WithRef]:
    out: list[_WithRef] = []
    device = next(reference.parameters()).device
    reference.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            batch = {k: v.to(device) for k, v in collate_preference(chunk, pad_id).items()}
            logps, _ = _logps(reference, batch)
            b = len(chunk)
            out += [_WithRef(e, float(logps[k]), float(logps[b + k])) for k, e in enumerate(chunk)]
    return out


def train_dpo(config: DPOConfig, *, resume: bool = False, **fit_kwargs: Any) -> FitResult:
    """Load the policy (and reference), the data, train, write the folder."""
    from transformers import AutoModelForCausalLM

    ckpt, source, tokenizer = prepare(config, resume=resume)
    pad = int(tokenizer.pad_token_id)
    policy = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    reference: Any = None
    if config.loss_type not in REFERENCE_FREE:
        reference = AutoModelForCausalLM.from_pretrained(
            config.reference_model or config.model, dtype=torch.float32
        )
        reference.to(config.device).eval().requires_grad_(False)

    load = load_unpaired if config.loss_type == "kto" else load_preference
    train: Sequence[Any]
    evaluate: Sequence[Any] | None
    train, evaluate = load_splits(load, config, tokenizer)
    collate: Any = (
        (lambda ex: collate_unpaired(ex, pad))
        if config.loss_type == "kto"
        else (lambda ex: collate_preference(ex, pad))
    )
    if config.precompute_ref_logprobs and reference is not None:
        train = _precompute(reference, train, pad, config.batch_size)
        if evaluate is not None:
            evaluate = _precompute(reference, evaluate, pad, config.batch_size)
        reference = None  # only the policy stays in memory while updating
    return fit(
        policy,
        tokenizer,
        config,
        train=train,
        evaluate=evaluate,
        collate=collate,
        loss_fn=_Objective(config, reference),
        resume_from=ckpt,
        **fit_kwargs,
    )
