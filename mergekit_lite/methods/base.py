"""What a merge method is: a small pure function over tensors plus its schema.

A method is written as a typed function; its keyword-only parameters *are* its recipe
schema (mergekit's ``easy_define`` idea)::

    @merge_method("linear", paper="https://arxiv.org/abs/2203.05482", title="Model Soups")
    def linear(tensors: list[Tensor], *, base_index: int | None,
               weight: PerModel[float], normalize: bool = True) -> Tensor: ...

* ``PerModel[T]`` - one value per input model (base included), read from the model /
  slice-source level first; ``NonBase[T]`` - one value per non-base input (the base gets
  ``None``); anything else is *shared* by all inputs of a tensor (global or slice level).
* A parameter without a default is required. ``Literal[...]`` restricts the choices,
  ``ranges={"t": Range(0, 1)}`` the numeric range. A trailing underscore maps a Python
  keyword to its YAML name (``lambda_`` -> ``lambda``).
* ``base_index`` (position of the base model in ``tensors``, or None) and ``rng``
  (``rng(i)`` -> a seeded ``numpy.random.Generator`` for input ``i``) are supplied by the
  engine. A method that declares ``dtype`` receives its inputs as stored (any float
  dtype) and computes in ``dtype`` itself, typically chunk by chunk; the others receive
  inputs already converted to the compute dtype.

The decorator only attaches a :class:`MethodSpec`; registration happens in one visible
place, :mod:`mergekit_lite.methods.registry`.
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import torch

from mergekit_lite.recipe import coerce_bool, coerce_float

__all__ = [
    "Scope",
    "Range",
    "ParamSpec",
    "MethodSpec",
    "PerModel",
    "NonBase",
    "merge_method",
    "REQUIRED",
]


class Scope(str, enum.Enum):
    SHARED = "shared"  # one value for the tensor
    PER_MODEL = "per_model"  # one value per input, base included
    NON_BASE = "non_base"  # one value per non-base input


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


T = TypeVar("T")

#: one value per input model, base included: ``weight: PerModel[float]``
PerModel = Annotated[list[T], Scope.PER_MODEL]
#: one value per non-base input (the base's entry is None)
NonBase = Annotated[list[T], Scope.NON_BASE]


@dataclass(frozen=True)
class Range:
    """Closed unless told otherwise: ``Range(0, 1, low_open=True)`` is (0, 1]."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        if self.high is not None and (x >= self.high if self.high_open else x > self.high):
            return False
        return True

    def __str__(self) -> str:
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        a = "-inf" if self.low is None else f"{self.low:g}"
        b = "inf" if self.high is None else f"{self.high:g}"
        return f"{lo}{a}, {b}{hi}"


@dataclass(frozen=True)
class ParamSpec:
    name: str  # YAML name
    arg: str  # Python keyword
    scope: Scope
    kind: type  # float | bool | str | int
    default: Any = REQUIRED
    choices: tuple[Any, ...] | None = None
    range: Range | None = None
    nullable: bool = False
    # accepted for mergekit compatibility but without effect here (a warning says so)
    inert: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any) -> Any:
        """Convert a recipe leaf value to this parameter's type; ValueError if it can't."""
        if value is None and self.nullable:
            return None
        if self.kind is float:
            out: Any = coerce_float(value)
        elif self.kind is int:
            out = int(coerce_float(value))
        elif self.kind is bool:
            out = coerce_bool(value)
        else:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
            out = value
        if self.choices is not None and out not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        if self.range is not None and not self.range.contains(out):
            raise ValueError(f"must be in {self.range}; got {value!r}")
        return out


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: the function, its parameters and its input contract."""

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[ParamSpec, ...]
    title: str
    paper: str
    base: Literal["required", "optional", "ignored"] = "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    random: bool = False
    fixed: dict[str, Any] = field(default_factory=dict)  # bound keywords (method families)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def __call__(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        base_index: int | None,
        rng: Callable[[int], Any] | None = None,
        dtype: torch.dtype | None = None,
        **params: Any,
    ) -> torch.Tensor:
        """Merge ``tensors``; parameters by YAML name, per-model ones as aligned lists."""
        return self.consume(list(tensors), base_index=base_index, rng=rng, dtype=dtype, **params)

    def consume(
        self,
        tensors: list[torch.Tensor],
        *,
        base_index: int | None,
        rng: Callable[[int], Any] | None = None,
        dtype: torch.dtype | None = None,
        **params: Any,
    ) -> torch.Tensor:
        """Like calling the spec, but hands ``tensors`` over: the method may set entries
        to ``None`` once it no longer needs them, so the engine's peak memory stays low."""
        kwargs = {p.arg: params[p.name] for p in self.params if p.name in params and not p.inert}
        extra: dict[str, Any] = {}
        if "rng" in inspect.signature(self.fn).parameters:
            extra["rng"] = rng
        if dtype is not None:
            if not self.casts_inputs:
                raise TypeError(f"{self.name} computes in its inputs' dtype; cast them first")
            extra["dtype"] = dtype
        return self.fn(tensors, base_index=base_index, **self.fixed, **extra, **kwargs)

    @property
    def casts_inputs(self) -> bool:
        """True if the method takes inputs of any float dtype and a ``dtype`` to compute
        in (it then converts chunk by chunk instead of the engine converting up front)."""
        return "dtype" in inspect.signature(self.fn).parameters


_ENGINE_ARGS = {"base_index", "rng", "dtype"}


def _strip_none(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) < len(typing.get_args(hint)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return hint, False


def params_from_signature(
    fn: Callable[..., Any], ranges: dict[str, Range] | None = None
) -> tuple[ParamSpec, ...]:
    """Derive the parameter schema from a method's keyword-only arguments."""
    ranges = ranges or {}
    hints = typing.get_type_hints(fn, include_extras=True)
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in _ENGINE_ARGS:
            continue
        hint, nullable = _strip_none(hints[p.name])
        scope = Scope.SHARED
        if typing.get_origin(hint) is Annotated:
            base_hint, *meta = typing.get_args(hint)
            scope = next(m for m in meta if isinstance(m, Scope))
            hint, inner_nullable = _strip_none(typing.get_args(base_hint)[0])  # list[T] -> T
            nullable = nullable or inner_nullable
        choices = None
        if typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            hint = type(choices[0])
        name = p.name[:-1] if p.name.endswith("_") else p.name
        default = REQUIRED if p.default is inspect.Parameter.empty else p.default
        out.append(
            ParamSpec(
                name=name,
                arg=p.name,
                scope=scope,
                kind=hint,
                default=default,
                choices=choices,
                range=ranges.get(name),
                nullable=nullable,
            )
        )
    return tuple(out)


def merge_method(
    name: str,
    *,
    title: str,
    paper: str,
    base: Literal["required", "optional", "ignored"] = "ignored",
    min_inputs: int = 1,
    max_inputs: int | None = None,
    min_non_base: int = 0,
    max_non_base: int | None = None,
    ranges: dict[str, Range] | None = None,
    random: bool = False,
) -> Callable[[Callable[..., torch.Tensor]], MethodSpec]:
    """Turn a typed tensor function into a :class:`MethodSpec` (not yet registered)."""

    def wrap(fn: Callable[..., torch.Tensor]) -> MethodSpec:
        return MethodSpec(
            name=name,
            fn=fn,
            params=params_from_signature(fn, ranges),
            title=title,
            paper=paper,
            base=base,
            min_inputs=min_inputs,
            max_inputs=max_inputs,
            min_non_base=min_non_base,
            max_non_base=max_non_base,
            random=random,
        )

    return wrap
