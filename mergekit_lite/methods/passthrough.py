"""Passthrough: copy one input tensor unchanged, optionally multiplied by ``scale``.

With ``slices`` this is layer surgery: stack layer ranges of one or several models
(frankenmerges such as SOLAR's depth up-scaling, Kim et al. 2023,
https://arxiv.org/abs/2312.15166), duplicate layers, or drop them. ``scale`` is
per-source, e.g. ``{filter: o_proj, value: 0.5}`` to damp a duplicated layer's output.
"""

from __future__ import annotations

import torch

from mergekit_lite.methods.base import PerModel, merge_method


@merge_method(
    "passthrough",
    title="Passthrough (layer stacking)",
    paper="https://arxiv.org/abs/2312.15166",
    base="ignored",
    max_inputs=1,
)
def passthrough(
    tensors: list[torch.Tensor],
    *,
    base_index: int | None,
    scale: PerModel[float | None] | None = None,
) -> torch.Tensor:
    value = scale[0] if scale else None
    return tensors[0] if value is None else tensors[0] * value
