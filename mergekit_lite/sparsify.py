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

Each sparsifier is split in two: a *selector* (in :data:`SELECTORS`) returns the boolean
keep-mask and the keep probability; :func:`rescale_masked` applies it. The merge engine
uses the selectors directly so that it can apply masks chunk by chunk; the tensor-level
functions (:func:`magnitude`, :func:`random_drop`, ...) compose the two and are the
readable reference.

Rescaling of the survivors (``rescale: true``) follows mergekit 0.1.5: multiply by
``||delta||_1 / ||masked||_1`` (``rescale_norm: l1``, the default; ``l2`` and ``linf``
match those norms instead). The papers rescale each kept entry by ``1 / p`` (DARE:
``p = density``; DELLA: its own ``p_i``): choose that with ``rescale_norm: inverse_p``.

Randomness: masks come from a CPU generator that the caller seeds per (recipe seed,
tensor, input model). The result is bit-identical across runs, thread counts and
tensor order, and the masks are the same on every device (drawn on the CPU, then moved).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Literal, Union

import numpy as np
import torch

__all__ = [
    "SELECTORS",
    "sparsify",
    "RescaleNorm",
    "magnitude",
    "random_drop",
    "magnitude_outliers",
    "della_magprune",
    "rescale_masked",
    "sum64",
    "norm_ratio",
    "CHUNK",
]

RescaleNorm = Literal["l1", "l2", "linf", "inverse_p"]
Generator = Union[np.random.Generator, torch.Generator, None]
_EPS = 1e-7
#: elements per chunk for streamed element-wise work: 1 MB of float32, cache-sized
CHUNK = 1 << 18


def _uniform(n: int, generator: Generator, device: torch.device) -> torch.Tensor:
    """``n`` draws from U[0, 1) as float32, made on the CPU, moved to ``device``.

    The engine passes a seeded ``numpy.random.Generator`` (PCG64: single-threaded, so
    independent of the thread count, and ~3x faster than ``torch.rand``); a
    ``torch.Generator`` works too.
    """
    if isinstance(generator, np.random.Generator):
        u = torch.from_numpy(generator.random(n, dtype=np.float32))
    else:
        u = torch.rand(n, generator=generator, dtype=torch.float32, device="cpu")
    return u.to(device)


def sum64(x: torch.Tensor) -> float:
    """``x.sum()`` in float64, in an order that does not depend on the thread count.

    torch's CPU reductions split work across threads, so a float32 ``sum()`` can differ
    in its last bits between runs with different ``torch.get_num_threads()``; numpy's
    pairwise summation is single-threaded and fixed.
    """
    if x.device.type == "cpu":
        return float(x.detach().float().numpy().sum(dtype=np.float64))
    return float(x.sum(dtype=torch.float64))


# -- selectors: (|delta|, density, ...) -> (keep mask, keep probability) ------------------------

_SAMPLE = 1 << 16


def kth_largest(w: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest value of the flat tensor ``w`` (1 <= k <= n).

    ``torch.kthvalue`` over tens of millions of entries is slow; instead a fixed
    pseudo-random sample brackets the answer, one comparison pass counts what lies
    above the bracket, and ``kthvalue`` runs on the few entries inside it. Falls back
    to the full ``kthvalue`` if the bracket misses (then still exact, only slower).
    """
    n = w.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(w, n - k + 1).values
    idx = torch.randint(0, n, (_SAMPLE,), generator=torch.Generator().manual_seed(0))
    sample = w[idx.to(w.device)].sort().values
    q = (n - k) / n  # fraction of entries below the answer
    margin = 6 * (_SAMPLE * q * (1 - q)) ** 0.5 + 64
    lo = sample[max(0, int(q * _SAMPLE - margin))]
    hi = sample[min(_SAMPLE - 1, int(q * _SAMPLE + margin))]
    above = int(torch.count_nonzero(w > hi))
    inside = (w >= lo) & (w <= hi)
    band = w[inside]
    rank = n - k - (n - above - band.numel())  # 0-based rank of the answer within band
    if above >= k or not 0 <= rank < band.numel():
        return torch.kthvalue(w, n - k + 1).values
    return torch.kthvalue(band, rank + 1).values


def keep_magnitude(
    magnitude: torch.Tensor, *, density: float, **_: object
) -> tuple[torch.Tensor, float]:
    """The ``k = max(1, int(density * n))`` largest ``|delta|``, by threshold.

    A threshold (:func:`kth_largest`) instead of a full sort: a quarter of the memory
    and several times faster on large tensors. When entries tie at the threshold, the
    earliest in memory order are kept, so the result is the same on every device. (mergekit keeps
    whichever ``torch.argsort`` happens to put first, which is not stable and can
    differ between devices; the results agree whenever the k-th largest magnitude is
    unique, as it is for float32 weights in practice.)
    """
    n = magnitude.numel()
    if density >= 1:
        return torch.ones(magnitude.shape, dtype=torch.bool, device=magnitude.device), 1.0
    if density <= 0 or n == 0:
        return torch.zeros(magnitude.shape, dtype=torch.bool, device=magnitude.device), 1.0
    k = max(1, int(density * n))
    w = magnitude.reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    threshold = kth_largest(w, k)
    keep = w > threshold
    missing = k - int(torch.count_nonzero(keep))
    if missing > 0:  # fill up with entries equal to the threshold, earliest first
        tied = torch.nonzero(w == threshold).reshape(-1)[:missing]
        keep[tied] = True
    return keep.reshape(magnitude.shape), density


def keep_random(
    shape: torch.Size, *, density: float, generator: Generator, device: torch.device, **_: object
) -> tuple[torch.Tensor, float]:
    """DARE: keep each entry with probability ``density`` (Yu et al. 2023, eq. 2).

    Needs no task vector at all; the mask is drawn in chunks (same stream as one draw).
    """
    n = int(np.prod(shape)) if len(shape) else 1
    keep = torch.empty(n, dtype=torch.bool, device=device)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        keep[start:stop] = _uniform(stop - start, generator, device) < density
    return keep.reshape(shape), density


def keep_outliers(
    magnitude: torch.Tensor, *, density: float, gamma: float = 0.01, **_: object
) -> tuple[torch.Tensor, float]:
    """Breadcrumbs: remove the top ``gamma`` fraction by magnitude (outliers), then the
    smallest entries, keeping ``int(density * n)`` entries. When ``density + gamma > 1``
    fewer outliers are removed so that the density holds (mergekit 0.1.5's rule)."""
    n = magnitude.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    w = magnitude.reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    order = torch.sort(w, descending=False).indices
    keep = torch.zeros(n, dtype=torch.bool, device=magnitude.device)
    keep[order[n_bottom : n_bottom + target]] = True
    return keep.reshape(magnitude.shape), density


def keep_della(
    magnitude: torch.Tensor,
    *,
    density: float,
    epsilon: float = 0.15,
    generator: Generator = None,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DELLA's MAGPRUNE: within each row, rank entries by ``|delta|`` and keep entry i
    with probability ``p_i = density - epsilon + 2 * epsilon * rank_i / (n - 1)``
    (Deep et al. 2024, sec. 3; mergekit's per-row ranking). A row with a single entry
    keeps it with probability ``density``. Returns the mask and the ``p_i``."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("epsilon must keep density +/- epsilon inside (0, 1)")
    rows = (
        magnitude.unsqueeze(0) if magnitude.dim() < 2 else magnitude.reshape(magnitude.shape[0], -1)
    )
    ranks = torch.argsort(torch.argsort(rows, dim=1), dim=1).float() + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    span = hi - lo
    rank_norm = torch.where(span > 0, (ranks - lo) / span.clamp(min=1), 0.5).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon  # float32
    keep = _uniform(probs.numel(), generator, probs.device).reshape(probs.shape) < probs
    return keep.reshape(magnitude.shape), probs.reshape(magnitude.shape)


Selector = Callable[..., tuple[torch.Tensor, "float | torch.Tensor"]]

#: The one registry of sparsifiers, by the names mergekit uses, and whether the
#: selector needs the task vector's magnitudes (DARE's random drop does not).
SELECTORS: dict[str, tuple[Selector, bool]] = {
    "magnitude": (keep_magnitude, True),
    "random": (keep_random, False),
    "magnitude_outliers": (keep_outliers, True),
    "della_magprune": (keep_della, True),
}


# -- applying a mask ------------------------------------------------------------------------------


def norm_ratio(pieces: Iterable[tuple[torch.Tensor, torch.Tensor]], norm: RescaleNorm) -> float:
    """mergekit's norm matching: ``norm(delta) / norm(where(keep, delta, 0))``, or 1 if
    either is ~0. ``pieces`` yields ``(delta, keep)`` chunks of one tensor, so the norms
    can be accumulated without materializing the whole task vector."""
    before = after = 0.0
    for delta, keep in pieces:
        masked = torch.where(keep, delta, 0)
        if norm == "l1":
            before += sum64(delta.abs())
            after += sum64(masked.abs())
        elif norm == "l2":
            before += sum64(delta.square())
            after += sum64(masked.square())
        elif norm == "linf":
            before = max(before, float(delta.abs().max()) if delta.numel() else 0.0)
            after = max(after, float(masked.abs().max()) if masked.numel() else 0.0)
        else:
            raise ValueError(f"unknown rescale_norm {norm!r}")
    if norm == "l2":
        before, after = before**0.5, after**0.5
    if before < _EPS or after < _EPS:
        return 1.0
    return before / after


def rescale_masked(
    delta: torch.Tensor,
    keep: torch.Tensor,
    norm: RescaleNorm | None,
    keep_prob: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``delta`` where ``keep`` (a boolean mask), else 0; then rescaled so that the
    chosen norm matches the unmasked ``delta`` (mergekit's ``rescale``), or divided by
    the keep probability (``inverse_p``, the papers' unbiased estimator E[keep/p] = 1).
    """
    masked = torch.where(keep, delta, 0)
    if norm is None:
        return masked
    if norm == "inverse_p":
        assert keep_prob is not None
        return masked.div_(keep_prob)
    factor = norm_ratio([(delta, keep)], norm)
    return masked if factor == 1.0 else masked.mul_(factor)


# -- the tensor-level sparsifiers (reference implementations) -------------------------------


def sparsify(
    delta: torch.Tensor,
    *,
    method: str,
    density: float,
    rescale_norm: RescaleNorm | None = None,
    generator: Generator = None,
    gamma: float = 0.01,
    epsilon: float = 0.15,
) -> torch.Tensor:
    """Sparsify a whole task vector with the named selector, then rescale."""
    if density >= 1:
        return delta
    select, needs_magnitude = SELECTORS[method]
    if needs_magnitude:
        keep, p = select(
            delta.abs(), density=density, gamma=gamma, epsilon=epsilon, generator=generator
        )
    else:
        keep, p = select(delta.shape, density=density, generator=generator, device=delta.device)
    if isinstance(p, torch.Tensor):
        p = p.to(delta.dtype)
    return rescale_masked(delta, keep, rescale_norm, p)


#: TIES' trim step: keep the top ``density`` fraction by magnitude
magnitude = partial(sparsify, method="magnitude")
#: DARE: drop each entry with probability ``1 - density``
random_drop = partial(sparsify, method="random")
#: Breadcrumbs: drop outliers and the smallest entries
magnitude_outliers = partial(sparsify, method="magnitude_outliers")
#: DELLA: magnitude-ranked random drop
della_magprune = partial(sparsify, method="della_magprune")
