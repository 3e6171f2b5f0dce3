"""The task-vector family: task arithmetic, TIES, DARE, Breadcrumbs, DELLA.

Every method here is one function, :func:`task_vector_merge`, composed of a *sparsifier*
(:mod:`mergekit_lite.sparsify`) and an optional *sign consensus* rule:

    delta_i  = theta_i - theta_base                    task vector (Ilharco et al. 2022)
    delta_i' = sparsify(delta_i; density_i)            trim / drop (TIES, DARE, ...)
    g_i      = w_i * delta_i'
    consensus (TIES): gamma = sign(sum_i g_i); m_i = [sign(g_i) == gamma]
    mixed    = sum_i m_i g_i                            (m_i = 1 without consensus)
    mixed   /= sum_i m_i w_i                            (normalize: true)
    merged   = theta_base + lambda * mixed

=====================  =================  =========  =========  ===========
method                 sparsifier         consensus  normalize  rescale
=====================  =================  =========  =========  ===========
task_arithmetic        -                  -          false      -
ties                   magnitude          sum        true       false
dare_linear            random             -          false      true
dare_ties              random             sum        false      true
breadcrumbs            magnitude_outliers -          false      false
breadcrumbs_ties       magnitude_outliers sum        false      false
della_linear           della_magprune     -          false      true
della                  della_magprune     sum        true       true
=====================  =================  =========  =========  ===========

(the normalize/rescale columns are defaults, as in mergekit 0.1.5).

Where mergekit and the papers differ, mergekit is the default and the paper is an option:

* TIES sign election. Yadav et al. (https://arxiv.org/abs/2306.01708, Alg. 1) elect the
  sign of the *unweighted* sum of trimmed task vectors and average the agreeing entries.
  mergekit elects on the *weighted* vectors ``w_i * delta_i'`` and divides by the sum of
  the agreeing weights. The two coincide when all weights are 1. ``election: unweighted``
  gives the paper's election; ``election: count`` a plain majority of signs.
* DARE / DELLA rescaling. The papers multiply each surviving entry by ``1 / p``
  (Yu et al. https://arxiv.org/abs/2311.03099 eq. 2; Deep et al.
  https://arxiv.org/abs/2406.11617). mergekit matches the L1 norm of the unsparsified
  task vector instead. ``rescale_norm: inverse_p`` gives the paper's rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from mergekit_lite.methods.base import REQUIRED, MethodSpec, ParamSpec, Range, Scope
from mergekit_lite.sparsify import CHUNK, SELECTORS, norm_ratio


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


def _sparsify_plan(
    x: torch.Tensor,
    base: torch.Tensor,
    *,
    sparsifier: str,
    dtype: torch.dtype,
    density: float,
    rescale: bool,
    rescale_norm: str,
    generator: Any,
    extra: dict[str, Any],
) -> tuple[torch.Tensor | None, float, Any]:
    """Phase 1 for one model: its flat keep-mask, a factor to multiply the survivors by
    (norm matching), and a value, scalar or per-entry, to divide them by (``inverse_p``).
    ``base`` is already in ``dtype``."""
    if density >= 1:
        return None, 1.0, None
    select, needs_magnitude = SELECTORS[sparsifier]
    xf, bf = x.reshape(-1), base.reshape(-1)
    if needs_magnitude:  # thresholds, sorts and ranks see the whole |task vector|
        magnitude = torch.empty(xf.numel(), dtype=dtype, device=x.device)
        for s in _chunks(xf.numel()):
            torch.sub(xf[s].to(dtype), bf[s], out=magnitude[s]).abs_()
        keep, prob = select(
            magnitude.reshape(x.shape), density=density, generator=generator, **extra
        )
        del magnitude
    else:
        keep, prob = select(x.shape, density=density, generator=generator, device=x.device)
    keep = keep.reshape(-1)
    if isinstance(prob, torch.Tensor):
        prob = prob.reshape(-1).to(dtype)
    if not rescale:
        return keep, 1.0, None
    if rescale_norm == "inverse_p":
        return keep, 1.0, prob
    pieces = ((xf[s].to(dtype) - bf[s], keep[s]) for s in _chunks(xf.numel()))
    return keep, norm_ratio(pieces, rescale_norm), None  # type: ignore[arg-type]


def task_vector_merge(
    tensors: list[torch.Tensor],
    *,
    base_index: int | None,
    dtype: torch.dtype = torch.float32,
    rng: Callable[[int], Any] | None = None,
    sparsifier: str | None,
    consensus: bool,
    weight: list[float | None],
    density: list[float | None],
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    int8_mask: bool = False,  # accepted for mergekit recipes; masks here are always boolean
    election: str = "weighted",
    rescale_norm: str = "l1",
    gamma: list[float | None] | None = None,
    epsilon: list[float | None] | None = None,
) -> torch.Tensor:
    """Inputs may be in any float dtype; the arithmetic is done in ``dtype``.

    Phase 1 decides, per model, which task-vector entries survive (whole-tensor
    statistics: thresholds, norms, ranks). Phase 2 is element-wise and runs in
    cache-sized chunks, so no (n, ...) temporaries are ever materialized; per element
    it performs mergekit's operations in mergekit's order (same rounding).
    """
    assert base_index is not None
    base_raw = tensors[base_index].to(dtype)
    others = [i for i in range(len(tensors)) if i != base_index]
    if not others:
        return base_raw
    plans = []
    for i in others:
        if sparsifier is None:
            plans.append((None, 1.0, None))
            continue
        extra: dict[str, Any] = {}
        if gamma is not None:
            extra["gamma"] = gamma[i]
        if epsilon is not None:
            extra["epsilon"] = epsilon[i]
        plans.append(
            _sparsify_plan(
                tensors[i],
                base_raw,
                sparsifier=sparsifier,
                dtype=dtype,
                density=float(density[i]),  # type: ignore[arg-type]
                rescale=rescale,
                rescale_norm=rescale_norm,
                generator=rng(i) if rng is not None else None,
                extra=extra,
            )
        )
    base = base_raw.reshape(-1)
    flat = [tensors[i].reshape(-1) for i in others]
    w = torch.tensor([weight[i] for i in others], dtype=dtype, device=base.device)
    w = w.reshape(-1, 1)  # (n, 1)
    out = torch.empty(base.numel(), dtype=dtype, device=base.device)
    for sl in _chunks(base.numel()):
        b = base[sl]
        rows = []
        for x, (keep, factor, div) in zip(flat, plans, strict=True):
            d = x[sl].to(dtype) - b  # delta_i = theta_i - theta_base
            if keep is not None:
                d = torch.where(keep[sl], d, 0)
                if factor != 1.0:
                    d.mul_(factor)
                if div is not None:
                    d.div_(div[sl] if isinstance(div, torch.Tensor) else div)
            rows.append(d)
        deltas = torch.stack(rows)  # (n, chunk)
        weighted = deltas * w
        if consensus:
            mask = _agreement(weighted, deltas, election)
            mixed = (weighted * mask).sum(dim=0)
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = weighted.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed /= divisor
        if lambda_ != 1:
            mixed *= lambda_
        out[sl] = b + mixed
    return out.reshape(base_raw.shape)


def _agreement(weighted: torch.Tensor, deltas: torch.Tensor, election: str) -> torch.Tensor:
    """TIES step 2: ``m_i = [sign(w_i delta_i) == elected sign]`` for (n, chunk) inputs.

    ``weighted``: sign of sum_i w_i delta_i (mergekit); ``unweighted``: sign of
    sum_i delta_i (Yadav et al.); ``count``: the majority of the signs. A tie (sum
    exactly 0) elects ``+``; zero entries never agree, as in mergekit.
    """
    sign = weighted.sign()
    if election == "weighted":
        votes = weighted.sum(dim=0)
    elif election == "unweighted":
        votes = deltas.sum(dim=0)
    elif election == "count":
        votes = sign.sum(dim=0)
    else:
        raise ValueError(f"unknown election {election!r}")
    elected = (votes >= 0).to(sign.dtype) * 2 - 1
    return sign == elected


_DENSITY = Range(0, 1, low_open=True)


def _family_member(
    name: str,
    *,
    title: str,
    paper: str,
    sparsifier: str | None,
    consensus: bool,
    default_normalize: bool,
    default_rescale: bool,
) -> MethodSpec:
    """One member of the family: a sparsifier + a consensus rule + defaults."""
    params = [
        ParamSpec("weight", "weight", Scope.NON_BASE, float, REQUIRED),
        ParamSpec("normalize", "normalize", Scope.SHARED, bool, default_normalize),
        ParamSpec("lambda", "lambda_", Scope.SHARED, float, 1.0),
        ParamSpec("int8_mask", "int8_mask", Scope.SHARED, bool, False),
    ]
    if sparsifier:
        params += [
            ParamSpec("density", "density", Scope.NON_BASE, float, 1.0, range=_DENSITY),
            ParamSpec("rescale", "rescale", Scope.SHARED, bool, default_rescale),
            ParamSpec(
                "rescale_norm",
                "rescale_norm",
                Scope.SHARED,
                str,
                "l1",
                choices=("l1", "l2", "linf", "inverse_p"),
            ),
        ]
    if consensus:
        params.append(
            ParamSpec(
                "election",
                "election",
                Scope.SHARED,
                str,
                "weighted",
                choices=("weighted", "unweighted", "count"),
            )
        )
    if sparsifier == "magnitude_outliers":
        params.append(ParamSpec("gamma", "gamma", Scope.NON_BASE, float, 0.01, range=Range(0, 1)))
    if sparsifier == "della_magprune":
        params.append(
            ParamSpec("epsilon", "epsilon", Scope.NON_BASE, float, 0.15, range=Range(0, 1))
        )
    fixed: dict[str, Any] = {"sparsifier": sparsifier, "consensus": consensus}
    if not sparsifier:
        fixed.update(density=None, rescale=False)
        # mergekit 0.1.5 lists these for every member of the family; without a
        # sparsifier they do nothing, so recipes keep running but are told so
        params += [
            ParamSpec("density", "density", Scope.NON_BASE, float, 1.0, range=_DENSITY, inert=True),
            ParamSpec("rescale", "rescale", Scope.SHARED, bool, False, inert=True),
        ]
    return MethodSpec(
        name=name,
        fn=task_vector_merge,
        params=tuple(params),
        title=title,
        paper=paper,
        base="required",
        random=sparsifier in ("random", "della_magprune"),
        fixed=fixed,
    )


#: The family, one row per method: (name, title, paper, sparsifier, consensus,
#: default normalize, default rescale) - the table in the module docstring.
_TABLE: tuple[tuple[str, str, str, str | None, bool, bool, bool], ...] = (
    ("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
     None, False, False, False),
    ("ties", "TIES", "https://arxiv.org/abs/2306.01708",
     "magnitude", True, True, False),
    ("dare_linear", "DARE (linear)", "https://arxiv.org/abs/2311.03099",
     "random", False, False, True),
    ("dare_ties", "DARE-TIES", "https://arxiv.org/abs/2311.03099",
     "random", True, False, True),
    ("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
     "magnitude_outliers", False, False, False),
    ("breadcrumbs_ties", "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795",
     "magnitude_outliers", True, False, False),
    ("della", "DELLA", "https://arxiv.org/abs/2406.11617",
     "della_magprune", True, True, True),
    ("della_linear", "DELLA (linear)", "https://arxiv.org/abs/2406.11617",
     "della_magprune", False, False, True),
)  # fmt: skip

FAMILY = tuple(
    _family_member(
        name,
        title=title,
        paper=paper,
        sparsifier=sparsifier,
        consensus=consensus,
        default_normalize=normalize,
        default_rescale=rescale,
    )
    for name, title, paper, sparsifier, consensus, normalize, rescale in _TABLE
)
