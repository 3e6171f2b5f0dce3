"""Linear merge (weighted average of weights).

    merged = sum_i w_i * theta_i / sum_i w_i        (normalize: true, the default)
    merged = sum_i w_i * theta_i                    (normalize: false)

Wortsman et al. 2022, "Model soups", https://arxiv.org/abs/2203.05482. As in mergekit
0.1.5, the sum is accumulated in float32 (float64 for float64 inputs) in input order and
cast back to the input dtype; a ``base_model`` is an ordinary input with its own weight.
"""

from __future__ import annotations

import torch

from mergekit_lite.methods.base import PerModel, merge_method


@merge_method(
    "linear",
    title="Linear (Model Soups)",
    paper="https://arxiv.org/abs/2203.05482",
    base="ignored",
)
def linear(
    tensors: list[torch.Tensor],
    *,
    base_index: int | None,
    weight: PerModel[float],
    normalize: bool = True,
) -> torch.Tensor:
    first = tensors[0]
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(weight, dtype=acc_dtype, device=first.device)
    out = torch.zeros_like(first, dtype=acc_dtype)
    for x, wi in zip(tensors, w.unbind(0)):
        out.addcmul_(x, wi)
    if normalize:
        out.div_(w.sum())
    return out.to(first.dtype)
