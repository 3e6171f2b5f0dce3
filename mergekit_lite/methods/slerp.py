"""Spherical interpolation: SLERP (two models) and NuSLERP.

SLERP (Shoemake 1985, "Animating rotation with quaternion curves",
https://doi.org/10.1145/325165.325242; for weights: mergekit), with the whole tensor
as one vector and ``t`` the fraction of the way from the base to the other model::

    cos(theta) = <v0 / |v0|, v1 / |v1|>
    slerp(t)   = sin((1 - t) theta) / sin(theta) * v0 + sin(t theta) / sin(theta) * v1

Falls back to linear interpolation ``(1 - t) v0 + t v1`` when ``|cos| > 0.9995``
(nearly colinear: the formula is ill-conditioned) or when either vector has norm
~0 (``<= 1e-8``: no direction to rotate). The second fallback is ours: mergekit 0.1.5
instead treats a zero tensor as a unit-norm one, which yields ``sin(t pi/2) * v1``
rather than ``t * v1``; both agree whenever the norms are non-zero.

NuSLERP (mergekit's "new" SLERP): two models with weights ``w0, w1`` interpolated at
``t = w1 / (w0 + w1)``; with a ``base_model``, their *task vectors* are interpolated and
added to the base. ``nuslerp_flatten: true`` (default) uses one angle for the whole
tensor; with ``false``, one angle per vector along the last dimension (each row of a
weight matrix), or along the first dimension with ``nuslerp_row_wise: true``
(mergekit's naming).
"""

from __future__ import annotations

import torch

from mergekit_lite.methods.base import NonBase, Range, merge_method

_DOT_THRESHOLD = 0.9995
_EPS = 1e-8


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Whole-tensor SLERP from ``v0`` (t=0) to ``v1`` (t=1), computed in float32."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    if norm_a <= _EPS or norm_b <= _EPS:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    if dot.abs() > _DOT_THRESHOLD:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    coef_a = torch.sin((1 - t) * theta) / sin_theta
    coef_b = torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).reshape(v0.shape).to(v0.dtype)


@merge_method(
    "slerp",
    title="SLERP",
    paper="https://doi.org/10.1145/325165.325242",
    base="required",
    min_inputs=2,
    max_inputs=2,
    ranges={"t": Range(0, 1)},
)
def slerp(tensors: list[torch.Tensor], *, base_index: int | None, t: float) -> torch.Tensor:
    assert base_index is not None
    return slerp_tensors(t, tensors[base_index], tensors[1 - base_index])


def _nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool
) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@merge_method(
    "nuslerp",
    title="NuSLERP",
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp",
    base="optional",
    min_non_base=2,
    max_non_base=2,
)
def nuslerp(
    tensors: list[torch.Tensor],
    *,
    base_index: int | None,
    weight: NonBase[float],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> torch.Tensor:
    idx = [i for i in range(len(tensors)) if i != base_index]
    w0, w1 = (weight[i] for i in idx)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    a, b = (tensors[i] for i in idx)
    if base_index is None:
        return _nuslerp(t, a, b, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    base = tensors[base_index]
    return base + _nuslerp(
        t, a - base, b - base, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten
    )
