"""Preference losses against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_lite.train.losses import (
    LOSS_TYPES,
    PreferenceLogps,
    kto_loss,
    preference_loss,
    sequence_logps,
)


def T(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


# policy: log pi(y_w) = -1, log pi(y_l) = -3; reference: -2 and -2  =>  h = 2 - 0 = 2
PAIR = PreferenceLogps(
    chosen=T(-1.0), rejected=T(-3.0), chosen_tokens=T(2), rejected_tokens=T(4),
    ref_chosen=T(-2.0), ref_rejected=T(-2.0),
)  # fmt: skip


def test_sequence_logps_shifts_and_masks() -> None:
    # position 0 predicts token 1: logits [0, ln 3] -> p = 3/4; position 1 predicts
    # token 0 with uniform logits -> p = 1/2; the label at position 0 is ignored
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    logps, n = sequence_logps(logits, labels)
    assert n.tolist() == [2]
    assert logps.item() == pytest.approx(math.log(0.75) + math.log(0.5))
    logps, n = sequence_logps(logits, torch.tensor([[-100, -100, 0]]))
    assert n.tolist() == [1] and logps.item() == pytest.approx(math.log(0.5))


def test_sigmoid_is_ln2_when_policy_equals_reference() -> None:
    same = PreferenceLogps(T(-1.5, -4), T(-2.5, -1), T(3, 2), T(3, 5), T(-1.5, -4), T(-2.5, -1))
    out = preference_loss("sigmoid", same, beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2))
    m = out.metrics()
    assert m["rewards/margins"] == 0 and m["rewards/chosen"] == 0 and m["rewards/accuracies"] == 0


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected"),
    [
        # -log s(0.1 * 2) = log(1 + e^-0.2)
        ("sigmoid", {}, 0.5981388693815918),
        # 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2)
        ("sigmoid", {"label_smoothing": 0.1}, 0.6181388693815918),
        # (0.9 * log(1 + e^-0.2) - 0.1 * log(1 + e^0.2)) / 0.8
        ("robust", {"label_smoothing": 0.1}, 0.5731388693815918),
        # max(0, 1 - 0.1 * 2)
        ("hinge", {}, 0.8),
        ("hinge", {"beta": 1.0}, 0.0),
        # mean log-probs: h' = (-1/2 + 3/4) - (-2/2 + 2/4) = 0.75; (0.75 - 1/(2*0.1))^2
        ("ipo", {}, 18.0625),
    ],
)
def test_paired_losses_by_hand(loss_type: str, kwargs: dict[str, float], expected: float) -> None:
    out = preference_loss(loss_type, PAIR, **kwargs)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    beta = kwargs.get("beta", 0.1)
    assert out.chosen_rewards.item() == pytest.approx(beta * (-1 + 2))
    assert out.rejected_rewards.item() == pytest.approx(beta * (-3 + 2))
    assert out.metrics()["rewards/accuracies"] == 1.0


def test_reference_free_losses_by_hand() -> None:
    # mean token log-probs ln(1/2) (chosen, 2 tokens) and ln(1/4) (rejected, 2 tokens)
    p = PreferenceLogps(T(2 * math.log(0.5)), T(2 * math.log(0.25)), T(2), T(2))
    # ORPO: odds 1 vs 1/3 -> log odds ratio ln 3; NLL ln 2 + 0.1 * log(1 + 1/3)
    assert preference_loss("orpo", p, beta=0.1).loss.item() == pytest.approx(0.7219153878051234)
    # SimPO: -log s(2 * (ln 2) - 0.5)
    simpo = preference_loss("simpo", p, beta=2.0, gamma=0.5)
    assert simpo.loss.item() == pytest.approx(0.34513483465348077)
    assert simpo.chosen_rewards.item() == pytest.approx(2.0 * math.log(0.5))


def test_kto_by_hand() -> None:
    # r = +1 (desirable) and -1 (undesirable); KL estimate mean(0.5, -0.1) = 0.2 = z0
    loss, metrics = kto_loss(
        T(-1.0, -4.0), T(-2.0, -3.0), torch.tensor([True, False]), T(-1.0, -2.0), T(-1.5, -1.9)
    )
    # (1 - s(0.1 * (1 - 0.2)) + 1 - s(0.1 * (0.2 + 1))) / 2
    assert loss.item() == pytest.approx(0.47502330403992327)
    assert metrics["kl"] == pytest.approx(0.2)
    assert metrics["rewards/chosen"] == pytest.approx(0.1) and metrics[
        "rewards/rejected"
    ] == pytest.approx(-0.1)
    # a negative KL estimate is clamped to 0
    _, metrics = kto_loss(T(-1.0), T(-2.0), torch.tensor([True]), T(-3.0), T(-1.0))
    assert metrics["kl"] == 0.0


def test_loss_registry_and_bad_input() -> None:
    assert set(LOSS_TYPES) == {"sigmoid", "robust", "hinge", "ipo", "orpo", "simpo", "kto"}
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss("dpo++", PAIR)
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss("sigmoid", PreferenceLogps(T(-1), T(-2), T(1), T(1)))
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("robust", PAIR, label_smoothing=0.5)


def test_losses_have_gradients_towards_the_chosen() -> None:
    chosen = torch.tensor([-2.0], requires_grad=True)
    p = PreferenceLogps(
        chosen, T(-2.0).float(), T(1).float(), T(1).float(), T(-2.0).float(), T(-2.0).float()
    )
    preference_loss("sigmoid", p).loss.backward()
    assert chosen.grad is not None and chosen.grad.item() < 0  # raising log pi(y_w) lowers the loss
