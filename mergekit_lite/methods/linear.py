"""Linear merge (weighted average of weights).

    merged = sum_i w_i * theta_i / sum_i w_i        (normalize: true, the default)
    merged = sum_i w_i * theta_i                    (normalize: false)

Wortsman et al. 2022, "Model soups", https://arxiv.org/abs/2203.05482. As in mergekit
0.1.5, the sum is accumulated in float32 (float64 for float64 inputs) in input order;
a ``base_model`` is an ordinary input with its own weight.
"""

from __future__ import annotations

import torch

from mergekit_lite.methods.base import PerModel, merge_method
from mergekit_lite.sparsify import CHUNK


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
    dtype: torch.dtype = torch.float32,
    weight: PerModel[float],
    normalize: bool = True,
) -> torch.Tensor:
    first = tensors[0]
    # inputs are taken in the compute dtype (as mergekit casts them on load) and summed
    # in float32 (float64 for float64), chunk by chunk
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.tensor(weight, dtype=acc_dtype, device=first.device)
    flat = [x.reshape(-1) for x in tensors]
    n = first.numel()
    out = torch.empty(n, dtype=acc_dtype, device=first.device)
    for start in range(0, n, CHUNK):
        sl = slice(start, min(n, start + CHUNK))
        acc = torch.zeros(sl.stop - sl.start, dtype=acc_dtype, device=first.device)
        for x, wi in zip(flat, w.unbind(0), strict=True):
            acc.addcmul_(x[sl].to(dtype), wi)
        if normalize:
            acc.div_(w.sum())
        out[sl] = acc
    return out.reshape(first.shape).to(dtype)
