"""Preference-optimisation losses as pure functions of sequence log-probabilities.

Everything here works on per-example tensors of shape (B,): the *summed* log-probability
of a completion under the policy and under the frozen reference, and the number of
completion tokens. Write ``h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))``
for the policy's log-ratio margin over the reference.

* ``sigmoid`` (DPO, Rafailov et al. 2023, https://arxiv.org/abs/2305.18290; label
  smoothing e as in cDPO): ``-(1-e) log s(b h) - e log s(-b h)``
* ``robust`` (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409):
  ``(-(1-e) log s(b h) + e log s(-b h)) / (1 - 2e)``
* ``hinge`` (SLiC, Zhao et al. 2023, https://arxiv.org/abs/2305.10425): ``max(0, 1 - b h)``
* ``ipo`` (Azar et al. 2023, https://arxiv.org/abs/2310.12036): ``(h' - 1/(2b))^2``, with
  ``h'`` computed from per-token *mean* log-probabilities
* ``orpo`` (Hong et al. 2024, https://arxiv.org/abs/2403.07691), no reference:
  ``NLL(y_w) - b log s(log odds(y_w) - log odds(y_l))``, ``odds(y) = p / (1 - p)``,
  ``p = exp(mean token log-prob)``
* ``simpo`` (Meng et al. 2024, https://arxiv.org/abs/2405.14734), no reference:
  ``-log s(b (mean logp(y_w) - mean logp(y_l)) - gamma)``
* ``kto`` (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306), unpaired:
  ``1 - s(b (r - z0))`` for desirable and ``1 - s(b (z0 - r))`` for undesirable
  completions, ``r = log pi(y) - log ref(y)``, ``z0 = max(0, KL estimate)``

(s is the logistic sigmoid, b is ``beta``.) The implicit rewards reported as
``rewards/chosen`` and ``rewards/rejected`` are ``b (log pi(y) - log ref(y))`` for the
methods with a reference, as in TRL, and ``b * mean token log-prob`` for ORPO and SimPO.
When the policy equals the reference, ``h = 0`` and the ``sigmoid`` loss is ``ln 2``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "PreferenceLogps",
    "LossOutput",
    "sequence_logps",
    "preference_loss",
    "kto_loss",
    "PAIRED_LOSSES",
    "LOSS_TYPES",
]


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the labelled tokens, and how many there are.

    ``logits`` (B, T, V) predict token t+1 at position t, so labels are shifted by one;
    positions whose label is ``ignore_index`` (prompt, padding) do not count.
    Returns ``(logps (B,), n_tokens (B,))``.
    """
    logits = logits[:, :-1, :]  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != ignore_index
    safe = targets.masked_fill(~mask, 0)
    token_logps = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


@dataclass(frozen=True)
class PreferenceLogps:
    """Per-example (B,) summed completion log-probs and token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def margin(self) -> torch.Tensor:
        """h: the policy's chosen-vs-rejected log-ratio minus the reference's."""
        assert self.ref_chosen is not None and self.ref_rejected is not None
        return (self.chosen - self.rejected) - (self.ref_chosen - self.ref_rejected)


@dataclass(frozen=True)
class LossOutput:
    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,), detached
    rejected_rewards: torch.Tensor  # (B,), detached

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    def metrics(self) -> dict[str, float]:
        """TRL's metric names, averaged over the batch."""
        return {
            "rewards/chosen": float(self.chosen_rewards.mean()),
            "rewards/rejected": float(self.rejected_rewards.mean()),
            "rewards/accuracies": float(
                (self.chosen_rewards > self.rejected_rewards).float().mean()
            ),
            "rewards/margins": float((self.chosen_rewards - self.rejected_rewards).mean()),
        }


def _reference_rewards(p: PreferenceLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    assert p.ref_chosen is not None and p.ref_rejected is not None
    return (
        (beta * (p.chosen - p.ref_chosen)).detach(),
        (beta * (p.rejected - p.ref_rejected)).detach(),
    )


def _sigmoid(p: PreferenceLogps, beta: float, label_smoothing: float, **_: float) -> LossOutput:
    h = p.margin()
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
        -beta * h
    )
    return LossOutput(losses, *_reference_rewards(p, beta))


def _robust(p: PreferenceLogps, beta: float, label_smoothing: float, **_: float) -> LossOutput:
    if not 0 <= label_smoothing < 0.5:
        raise ValueError("robust DPO needs 0 <= label_smoothing < 0.5")
    h = p.margin()
    losses = (
        -(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)
    ) / (1 - 2 * label_smoothing)
    return LossOutput(losses, *_reference_rewards(p, beta))


def _hinge(p: PreferenceLogps, beta: float, **_: float) -> LossOutput:
    return LossOutput(torch.relu(1 - beta * p.margin()), *_reference_rewards(p, beta))


def _ipo(p: PreferenceLogps, beta: float, **_: float) -> LossOutput:
    assert p.ref_chosen is not None and p.ref_rejected is not None
    # IPO works on length-normalised log-probabilities (Azar et al., as TRL does)
    nc, nr = p.chosen_tokens.clamp(min=1), p.rejected_tokens.clamp(min=1)
    h = (p.chosen / nc - p.rejected / nr) - (p.ref_chosen / nc - p.ref_rejected / nr)
    return LossOutput((h - 1 / (2 * beta)) ** 2, *_reference_rewards(p, beta))


def _mean_logps(p: PreferenceLogps) -> tuple[torch.Tensor, torch.Tensor]:
    return p.chosen / p.chosen_tokens.clamp(min=1), p.rejected / p.rejected_tokens.clamp(min=1)


def _orpo(p: PreferenceLogps, beta: float, **_: float) -> LossOutput:
    mc, mr = _mean_logps(p)
    # log odds(y) = log p - log(1 - p), with p = exp(mean logp) < 1
    log_odds = (mc - mr) - (torch.log1p(-torch.exp(mc)) - torch.log1p(-torch.exp(mr)))
    losses = -mc - beta * F.logsigmoid(log_odds)
    return LossOutput(losses, (beta * mc).detach(), (beta * mr).detach())


def _simpo(p: PreferenceLogps, beta: float, gamma: float, **_: float) -> LossOutput:
    mc, mr = _mean_logps(p)
    losses = -F.logsigmoid(beta * (mc - mr) - gamma)
    return LossOutput(losses, (beta * mc).detach(), (beta * mr).detach())


PairedLoss = Callable[..., LossOutput]

#: The one registry of paired preference losses (``kto`` is unpaired: :func:`kto_loss`).
PAIRED_LOSSES: dict[str, PairedLoss] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "hinge": _hinge,
    "ipo": _ipo,
    "orpo": _orpo,
    "simpo": _simpo,
}
LOSS_TYPES = (*PAIRED_LOSSES, "kto")
REFERENCE_FREE = frozenset({"orpo", "simpo"})


def preference_loss(
    loss_type: str,
    logps: PreferenceLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
) -> LossOutput:
    """The paired loss ``loss_type`` (see the module table) for a batch."""
    if loss_type not in PAIRED_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if loss_type not in REFERENCE_FREE and (logps.ref_chosen is None or logps.ref_rejected is None):
        raise ValueError(f"loss_type {loss_type!r} needs reference log-probabilities")
    return PAIRED_LOSSES[loss_type](logps, beta=beta, label_smoothing=label_smoothing, gamma=gamma)


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl_policy: torch.Tensor,
    kl_reference: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired examples.

    ``policy``/``reference``: (B,) summed completion log-probs; ``desirable``: (B,) bool.
    ``kl_policy``/``kl_reference``: log-probs of *mismatched* (prompt, completion) pairs,
    whose mean log-ratio, clamped at 0 and not differentiated, is the reference point z0.
    Returns the mean loss and the reward metrics.
    """
    z0 = (kl_policy - kl_reference).mean().clamp(min=0).detach()
    r = policy - reference
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    rewards = (beta * r).detach()
    metrics = {"kl": float(z0)}
    if desirable.any():
        metrics["rewards/chosen"] = float(rewards[desirable].mean())
    if (~desirable).any():
        metrics["rewards/rejected"] = float(rewards[~desirable].mean())
    return losses.mean(), metrics
