"""Sparsifiers: which entries of a task vector survive, and how the survivors are rescaled.

Shared by the task-vector family of merge methods (:mod:`mergekit_lite.methods.task_vector`):

========================  ==========================================================
``magnitude``             keep the top ``density`` fraction by ``|delta|``
                          (TIES, Yadav et al. 2023, https://arxiv.org/abs/2306.01708)
``random``                keep each entry with probability ``density``
                          (DARE, Yu et al. 2023, https://arxiv.org/abs/2311.03099)
``magnitude_outliers``    drop the top ``gamma`` fraction (outliers) and the smallest
                          entries, keep ``density`` (Model Breadcrumbs, Davari &
                          Belilovsky 2023, https://arxiv.org/abs/2312.06795)
``della_magprune``        keep entry i with probability p_i in [density - epsilon,
                          density + epsilon], rising with its magnitude rank within its
                          row (DELLA, Deep et al. 2024, https://arxiv.org/abs/2406.11617)
========================  ==========================================================

Rescaling of the survivors (``rescale: true``) follows mergekit 0.1.5: multiply by
``||delta||_1 / ||masked||_1`` (``rescale_norm: l1``, the default; ``l2`` and ``linf``
match those norms instead). The papers rescale each kept entry by ``1 / p`` (DARE:
``p = density``; DELLA: its own ``p_i``): choose that with ``rescale_norm: inverse_p``.

Randomness: masks come from ``torch.rand`` on a CPU generator that the caller seeds per
(recipe seed, tensor, input model). The result is bit-identical across runs, thread
counts, tensor order and devices (masks are drawn on the CPU, then moved).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

__all__ = [
    "SPARSIFIERS",
    "RescaleNorm",
    "magnitude",
    "random_drop",
    "magnitude_outliers",
    "della_magprune",
    "rescale_masked",
]

RescaleNorm = Literal["l1", "l2", "linf", "inverse_p"]
_EPS = 1e-7


def _uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(like.shape, generator=generator, dtype=torch.float32, device="cpu")
    return u.to(like.device)


def rescale_masked(
    delta: torch.Tensor,
    mask: torch.Tensor,
    norm: RescaleNorm | None,
    keep_prob: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``delta * mask``, rescaled so the chosen norm matches the unmasked ``delta``.

    ``inverse_p`` divides by the keep probability instead (the papers' unbiased
    estimator: E[mask / p] = 1).
    """
    masked = delta * mask
    if norm is None:
        return masked
    if norm == "inverse_p":
        assert keep_prob is not None
        return masked / keep_prob
    if norm == "l1":
        before, after = _norm_sum(delta, 1), _norm_sum(masked, 1)
    elif norm == "l2":
        before, after = _norm_sum(delta, 2) ** 0.5, _norm_sum(masked, 2) ** 0.5
    elif norm == "linf":
        before, after = float(delta.abs().max()), float(masked.abs().max())
    else:
        raise ValueError(f"unknown rescale_norm {norm!r}")
    if before < _EPS or after < _EPS:
        return masked
    return masked * (before / after)


def _norm_sum(x: torch.Tensor, p: int) -> float:
    """sum |x|^p in float64, in an order that does not depend on the thread count.

    torch's CPU reductions split work across threads, so a float32 ``sum()`` can
    differ in its last bits between runs with different ``torch.get_num_threads()``;
    numpy's pairwise summation is single-threaded and fixed.
    """
    if x.device.type == "cpu":
        a = np.abs(x.detach().float().numpy()) if p == 1 else np.square(x.detach().float().numpy())
        return float(a.sum(dtype=np.float64))
    y = x.abs() if p == 1 else x.square()
    return float(y.sum(dtype=torch.float64))


def magnitude(
    delta: torch.Tensor,
    *,
    density: float,
    rescale_norm: RescaleNorm | None = None,
    generator: torch.Generator | None = None,
    **_: float,
) -> torch.Tensor:
    """Keep the ``k = max(1, int(density * n))`` largest ``|delta|`` (TIES' trim step).

    Selection is by threshold (``kthvalue``), not a full sort: a quarter of the memory
    and several times faster on large tensors. When entries tie at the threshold, the
    earliest in memory order are kept, so the result is the same on every device.
    (mergekit keeps whichever ``torch.argsort`` happens to put first, which is not
    stable and can differ between devices; the results agree whenever the k-th
    largest magnitude is unique, as it is for float32 weights in practice.)
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    n = delta.numel()
    k = max(1, int(density * n))
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    threshold = torch.kthvalue(w, n - k + 1).values  # the k-th largest magnitude
    keep = w > threshold
    missing = k - int(keep.sum())
    if missing > 0:  # fill up with entries equal to the threshold, earliest first
        tied = torch.nonzero(w == threshold).reshape(-1)[:missing]
        keep[tied] = True
    del w
    mask = keep.reshape(delta.shape).to(delta.dtype)
    return rescale_masked(delta, mask, rescale_norm, density)


def random_drop(
    delta: torch.Tensor,
    *,
    density: float,
    rescale_norm: RescaleNorm | None = None,
    generator: torch.Generator | None = None,
    **_: float,
) -> torch.Tensor:
    """DARE: drop each entry with probability ``1 - density`` (Yu et al. 2023, eq. 2)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    mask = (_uniform(delta, generator) < density).to(delta.dtype)
    return rescale_masked(delta, mask, rescale_norm, density)


def magnitude_outliers(
    delta: torch.Tensor,
    *,
    density: float,
    gamma: float = 0.01,
    rescale_norm: RescaleNorm | None = None,
    generator: torch.Generator | None = None,
    **_: float,
) -> torch.Tensor:
    """Breadcrumbs: remove the top ``gamma`` fraction by magnitude (outliers), then the
    smallest entries, keeping ``int(density * n)`` entries.

    When ``density + gamma > 1`` fewer outliers are removed so that the density holds
    (mergekit 0.1.5's rule)."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    order = torch.sort(w, descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[n_bottom : n_bottom + target]] = 1
    return rescale_masked(delta, mask.reshape_as(delta), rescale_norm, density)


def della_magprune(
    delta: torch.Tensor,
    *,
    density: float,
    epsilon: float = 0.15,
    rescale_norm: RescaleNorm | None = None,
    generator: torch.Generator | None = None,
    **_: float,
) -> torch.Tensor:
    """DELLA's MAGPRUNE: within each row, rank entries by ``|delta|`` and keep entry i
    with probability ``p_i = density - epsilon + 2 * epsilon * rank_i / (n - 1)``
    (Deep et al. 2024, sec. 3; mergekit's per-row ranking). A row with a single entry
    keeps it with probability ``density``."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("epsilon must keep density +/- epsilon inside (0, 1)")
    shape = delta.shape
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).float() + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    span = hi - lo
    rank_norm = torch.where(span > 0, (ranks - lo) / span.clamp(min=1), 0.5).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon  # (rows, cols) float32
    mask = (_uniform(probs, generator) < probs).to(rows.dtype)
    out = rescale_masked(rows, mask, rescale_norm, probs.to(rows.dtype))
    return out.reshape(shape)


Sparsifier = Callable[..., torch.Tensor]

#: The one registry of sparsifiers, by the names mergekit uses.
SPARSIFIERS: dict[str, Sparsifier] = {
    "magnitude": magnitude,
    "random": random_drop,
    "magnitude_outliers": magnitude_outliers,
    "della_magprune": della_magprune,
}
