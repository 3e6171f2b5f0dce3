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

from collections.abc import Callable
from typing import Any

import torch

from mergekit_lite.methods.base import REQUIRED, MethodSpec, ParamSpec, Range, Scope
from mergekit_lite.sparsify import SPARSIFIERS

def sign_consensus_mask(
    weighted: torch.Tensor,
    election: str,
    unweighted: torch.Tensor | None = None,
    mask_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``m_i = [sign(g_i) == elected sign]``, zero entries never agree (TIES step 2).

    ``weighted``: (n, ...) stacked ``w_i * delta_i'``. ``election`` is ``weighted``
    (sign of sum of weighted), ``unweighted`` (sign of sum of ``unweighted``) or ``count``.
    A tie (sum exactly 0) elects ``+``, as mergekit does.
    """
    dtype = mask_dtype or weighted.dtype
    sign = weighted.sign().to(dtype)
    if election == "weighted":
        votes = weighted.sum(dim=0)
    elif election == "unweighted":
        assert unweighted is not None
        votes = unweighted.sum(dim=0)
    elif election == "count":
        votes = sign.sum(dim=0)
    else:
        raise ValueError(f"unknown election {election!r}")
    elected = (votes >= 0).to(dtype) * 2 - 1
    return sign == elected


def task_vector_merge(
    tensors: list[torch.Tensor],
    *,
    base_index: int | None,
    rng: Callable[[int], torch.Generator] | None = None,
    sparsifier: str | None,
    consensus: bool,
    weight: list[float | None],
    density: list[float | None],
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    election: str = "weighted",
    rescale_norm: str = "l1",
    gamma: list[float | None] | None = None,
    epsilon: list[float | None] | None = None,
) -> torch.Tensor:
    assert base_index is not None
    base = tensors[base_index]
    others = [i for i in range(len(tensors)) if i != base_index]
    if not others:
        return base
    sparsify = SPARSIFIERS[sparsifier] if sparsifier else None
    deltas = base.new_empty((len(others), *base.shape))  # (n, ...)
    for k, i in enumerate(others):
        delta = tensors[i] - base
        tensors[i] = None  # type: ignore[call-overload]  # free the input early
        if sparsify is not None:
            extra: dict[str, Any] = {}
            if gamma is not None:
                extra["gamma"] = gamma[i]
            if epsilon is not None:
                extra["epsilon"] = epsilon[i]
            delta = sparsify(
                delta,
                density=density[i],
                rescale_norm=rescale_norm if rescale else None,
                generator=rng(i) if rng is not None else None,
                **extra,
            )
        deltas[k] = delta
        del delta
    w = torch.tensor([weight[i] for i in others], dtype=deltas.dtype, device=deltas.device)
    w = w.reshape(-1, *([1] * base.dim()))  # (n, 1, ..., 1)
    unweighted = deltas.clone() if consensus and election == "unweighted" else None
    deltas.mul_(w)
    if consensus:
        mask = sign_consensus_mask(
            deltas, election, unweighted, torch.int8 if int8_mask else base.dtype
        )
        del unweighted
        deltas.mul_(mask)  # in place: (n, ...) is the largest buffer here
        mixed = deltas.sum(dim=0)
        del deltas
        divisor = torch.zeros_like(mixed)
        for k in range(len(others)):
            divisor.add_(mask[k], alpha=float(w[k].reshape(-1)[0]))
        del mask
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        del deltas
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


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


TASK_ARITHMETIC = _family_member(
    "task_arithmetic",
    title="Task Arithmetic",
    paper="https://arxiv.org/abs/2212.04089",
    sparsifier=None,
    consensus=False,
    default_normalize=False,
    default_rescale=False,
)
TIES = _family_member(
    "ties",
    title="TIES",
    paper="https://arxiv.org/abs/2306.01708",
    sparsifier="magnitude",
    consensus=True,
    default_normalize=True,
    default_rescale=False,
)
DARE_LINEAR = _family_member(
    "dare_linear",
    title="DARE (linear)",
    paper="https://arxiv.org/abs/2311.03099",
    sparsifier="random",
    consensus=False,
    default_normalize=False,
    default_rescale=True,
)
DARE_TIES = _family_member(
    "dare_ties",
    title="DARE-TIES",
    paper="https://arxiv.org/abs/2311.03099",
    sparsifier="random",
    consensus=True,
    default_normalize=False,
    default_rescale=True,
)
BREADCRUMBS = _family_member(
    "breadcrumbs",
    title="Model Breadcrumbs",
    paper="https://arxiv.org/abs/2312.06795",
    sparsifier="magnitude_outliers",
    consensus=False,
    default_normalize=False,
    default_rescale=False,
)
BREADCRUMBS_TIES = _family_member(
    "breadcrumbs_ties",
    title="Model Breadcrumbs with TIES",
    paper="https://arxiv.org/abs/2312.06795",
    sparsifier="magnitude_outliers",
    consensus=True,
    default_normalize=False,
    default_rescale=False,
)
DELLA = _family_member(
    "della",
    title="DELLA",
    paper="https://arxiv.org/abs/2406.11617",
    sparsifier="della_magprune",
    consensus=True,
    default_normalize=True,
    default_rescale=True,
)
DELLA_LINEAR = _family_member(
    "della_linear",
    title="DELLA (linear)",
    paper="https://arxiv.org/abs/2406.11617",
    sparsifier="della_magprune",
    consensus=False,
    default_normalize=False,
    default_rescale=True,
)

FAMILY = (
    TASK_ARITHMETIC,
    TIES,
    DARE_LINEAR,
    DARE_TIES,
    BREADCRUMBS,
    BREADCRUMBS_TIES,
    DELLA,
    DELLA_LINEAR,
)
