"""The registry of merge methods: the one place where methods are made available.

Adding a method: write its function (see :mod:`mergekit_lite.methods.base`) and list it
here. A duplicate name is an error at import time.
"""

from __future__ import annotations

from collections.abc import Iterable

from mergekit_lite.errors import RecipeError
from mergekit_lite.methods.base import MethodSpec
from mergekit_lite.methods.linear import linear
from mergekit_lite.methods.model_stock import model_stock
from mergekit_lite.methods.passthrough import passthrough
from mergekit_lite.methods.slerp import nuslerp, slerp
from mergekit_lite.methods.task_vector import FAMILY

__all__ = ["METHODS", "get_method", "build_registry"]


def build_registry(specs: Iterable[MethodSpec]) -> dict[str, MethodSpec]:
    out: dict[str, MethodSpec] = {}
    for spec in specs:
        if spec.name in out:
            raise ValueError(f"merge method {spec.name!r} is registered twice")
        out[spec.name] = spec
    return out


METHODS: dict[str, MethodSpec] = build_registry(
    [linear, slerp, nuslerp, *FAMILY, model_stock, passthrough]
)


def get_method(name: str, *, where: str = "merge_method") -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(
            where, f"unknown merge method {name!r}; choose one of {', '.join(sorted(METHODS))}"
        ) from None
