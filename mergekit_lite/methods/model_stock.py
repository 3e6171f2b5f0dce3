"""Model Stock (Jang et al. 2024, https://arxiv.org/abs/2403.19522).

With ``N >= 2`` fine-tunes ``w_i`` of a base ``w_0``, the offsets ``w_i - w_0`` meet at
an angle theta (cos(theta) is the mean pairwise cosine, per tensor or per row with
``filter_wise: true``). The paper's eq. 7 interpolates the average of the fine-tunes
towards the base::

    t   = N cos(theta) / (1 + (N - 1) cos(theta))
    w_H = t * mean_i(w_i) + (1 - t) * w_0

When ``1 + (N - 1) cos(theta)`` is ~0 there is no finite estimate and the base is kept
(mergekit 0.1.5's rule).
"""

from __future__ import annotations

import torch

from mergekit_lite.methods.base import merge_method


@merge_method(
    "model_stock",
    title="Model Stock",
    paper="https://arxiv.org/abs/2403.19522",
    base="required",
    min_inputs=3,
)
def model_stock(
    tensors: list[torch.Tensor], *, base_index: int | None, filter_wise: bool = False
) -> torch.Tensor:
    assert base_index is not None
    w0 = tensors[base_index]
    ws = [x for i, x in enumerate(tensors) if i != base_index]
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:  # a bias: one row
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (n * cos) / torch.where(singular, 1, denom))
    mean = sum(ws) / n
    return (t * mean + (1 - t) * w0).reshape(shape)
