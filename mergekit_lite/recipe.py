"""Merge recipes: the YAML schema and parameter resolution.

A recipe is mergekit-compatible YAML (mergekit 0.1.5's ``MergeConfiguration``)::

    merge_method: ties
    base_model: ./ckpt/base
    models:
      - model: ./ckpt/sft
        parameters: {weight: 0.7, density: 0.5}
      - model: ./ckpt/dpo
        parameters: {weight: [0.2, 0.8], density: 0.5}   # a gradient over the layers
    parameters: {normalize: true}
    dtype: float32

plus two keys of our own: ``seed`` (random methods) and ``output`` (default output path).

A parameter value is one of
  * a scalar;
  * a *gradient*: a list of numbers, interpolated piecewise-linearly over the layers of
    a slice (layer ``i`` of ``n`` sits at ``t = i / (n - 1)``; non-layer tensors such as
    embeddings, the final norm and the LM head sit at ``t = 0``, i.e. take the first
    value); a list of non-numbers picks ``values[int(t * (len - 1))]``;
  * a list of ``{filter, value}`` entries: the first entry whose ``filter`` is a
    substring of the tensor name (or has no filter, or ``"*"``) wins, so put the
    unfiltered fallback last.

Precedence, highest first: slice source (or ``models[i]``) > slice > global
``parameters``; parameters that are shared by all inputs of a tensor (``t``,
``normalize``, ...) are read from the slice and global levels only.

Everything here is pure data: the recipe does not know the merge methods. Which
parameters a method accepts, and their ranges, is checked by :mod:`mergekit_lite.plan`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from mergekit_lite.errors import RecipeError

__all__ = [
    "Recipe",
    "ModelEntry",
    "TokenizerConfig",
    "Slice",
    "SliceSource",
    "ConditionalParameter",
    "ParameterSetting",
    "evaluate_setting",
    "load_recipe",
    "parse_recipe",
    "DTYPE_ALIASES",
]

Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr]
ScalarOrGradient = Union[Scalar, list[Scalar]]

#: accepted spellings of the ``dtype``/``out_dtype`` keys -> canonical torch names
DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionalParameter(_Frozen):
    """``{filter: "self_attn", value: 0.5}``: applies to tensors whose name contains filter."""

    value: ScalarOrGradient
    filter: StrictStr | None = None


ParameterSetting = Union[ConditionalParameter, list[ConditionalParameter], ScalarOrGradient]
Parameters = dict[str, ParameterSetting]


def _check_model_ref(value: str) -> str:
    if not value or not value.strip():
        raise ValueError("model reference is empty")
    if value.startswith("+") or value.endswith("+"):
        raise ValueError(f"{value!r}: a LoRA reference is path+adapter_path")
    return value


ModelRef = Annotated[StrictStr, AfterValidator(_check_model_ref)]


class ModelEntry(_Frozen):
    """One input model of a ``models:`` recipe."""

    model: ModelRef
    parameters: Parameters | None = None


class SliceSource(_Frozen):
    """``layer_range: [start, end)`` of ``model``, with per-source parameters."""

    model: ModelRef
    layer_range: tuple[StrictInt, StrictInt]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class Slice(_Frozen):
    """An output slice: each source contributes the same number of layers."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: ModelRef | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _equal_lengths(self) -> Slice:
        lengths = [s.num_layers for s in self.sources]
        if len(set(lengths)) > 1:
            desc = ", ".join(f"{s.model} {list(s.layer_range)}" for s in self.sources)
            raise ValueError(
                "all sources of a slice must have the same number of layers, "
                f"got {lengths} ({desc})"
            )
        return self


class TokenizerConfig(_Frozen):
    """mergekit's ``tokenizer:`` block: the output vocabulary and row padding."""

    source: StrictStr
    pad_to_multiple_of: StrictInt | None = Field(default=None, gt=0)


class Recipe(_Frozen):
    """A validated, immutable merge recipe (mergekit-compatible)."""

    merge_method: StrictStr
    base_model: ModelRef | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: Parameters | None = None
    dtype: StrictStr | None = None
    out_dtype: StrictStr | None = None
    tokenizer_source: StrictStr | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: StrictStr | None = None
    seed: StrictInt = 0
    output: StrictStr | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if v not in DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {v!r}; use one of float32, bfloat16, float16, float64")
        return DTYPE_ALIASES[v]

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is None or v in ("auto", "chatml") or "{{" in v or "{%" in v:
            return v
        raise ValueError(f"{v!r}: use 'auto', 'chatml' or a Jinja template string")

    @model_validator(mode="after")
    def _models_xor_slices(self) -> Recipe:
        if bool(self.models) == bool(self.slices):
            raise ValueError("exactly one of 'models' or 'slices' must be given (and non-empty)")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either tokenizer_source or tokenizer, not both")
        return self

    @property
    def vocab_source(self) -> str | None:
        """Where the output vocabulary comes from (base | union | a model), if set."""
        return self.tokenizer.source if self.tokenizer else self.tokenizer_source

    # -- conveniences -------------------------------------------------------------

    def referenced_models(self) -> list[str]:
        """Every model reference in the recipe, base first, in order of appearance."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or []:
            seen[m.model] = None
        for s in self.slices or []:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)

    def parameter_settings(self) -> Iterator[tuple[str, str, ParameterSetting, str]]:
        """Yield ``(key_path, name, setting, scope)`` for every parameter in the recipe.

        ``scope`` is ``"model"`` for per-model/per-source settings, else ``"shared"``
        (meaning the level may hold both kinds: global and slice parameters apply to
        every input).
        """
        for name, setting in (self.parameters or {}).items():
            yield f"parameters.{name}", name, setting, "shared"
        for i, m in enumerate(self.models or []):
            for name, setting in (m.parameters or {}).items():
                yield f"models[{i}].parameters.{name}", name, setting, "model"
        for i, s in enumerate(self.slices or []):
            for name, setting in (s.parameters or {}).items():
                yield f"slices[{i}].parameters.{name}", name, setting, "shared"
            for j, src in enumerate(s.sources):
                for name, setting in (src.parameters or {}).items():
                    yield f"slices[{i}].sources[{j}].parameters.{name}", name, setting, "model"

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# -- parameter evaluation ---------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def evaluate_setting(
    setting: ParameterSetting | None,
    tensor_name: str,
    t: float = 0.0,
    *,
    coerce: Callable[[Any], Any] = lambda x: x,
) -> Any:
    """Value of ``setting`` for ``tensor_name`` at relative layer position ``t`` in [0, 1].

    Returns ``None`` when a filter list has no matching entry (the caller then falls
    through to the next precedence level). ``coerce`` converts leaf values to the
    parameter's type (e.g. ``"1e-3"`` -> ``0.001`` for a float parameter) before
    interpolation, as mergekit does.
    """
    if setting is None:
        return None
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return coerce(setting)
    if not setting:
        return None
    if all(isinstance(e, ConditionalParameter) for e in setting):
        for cond in setting:
            assert isinstance(cond, ConditionalParameter)
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return evaluate_setting(cond.value, tensor_name, t, coerce=coerce)
        return None
    values = [coerce(e) for e in setting]
    if not all(_is_number(v) for v in values):
        return values[int(t * (len(values) - 1))]
    # piecewise-linear gradient (Goddard et al., mergekit): same arithmetic, same rounding
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return coerce((1 - frac) * values[i0] + frac * values[i1])


def setting_leaves(setting: ParameterSetting) -> Iterator[Any]:
    """Every scalar a setting can take at a gradient knot (used for range checks:
    interpolation stays inside any interval that contains the knots)."""
    if isinstance(setting, ConditionalParameter):
        yield from setting_leaves(setting.value)
    elif isinstance(setting, list):
        for e in setting:
            yield from setting_leaves(e)
    else:
        yield setting


# -- loading ----------------------------------------------------------------------------


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (
            "[" in part or part in _UNION_TAGS or part.startswith("function-")
        ):
            continue  # pydantic's union-branch labels are noise to a user
        else:
            out += f".{part}" if out else str(part)
    return out


_UNION_TAGS = {"str", "bool", "int", "float", "ConditionalParameter"}
_SPECIFIC = {"extra_forbidden": 0, "value_error": 1, "missing": 2}


def _validation_error_to_recipe_error(err: ValidationError, source: str) -> RecipeError:
    # A value that fits none of a union's branches gets one error per branch: report
    # the most specific one (an unknown key beats "should be a valid dictionary").
    errors = err.errors(include_url=False)
    e = min(errors, key=lambda x: (_SPECIFIC.get(x["type"], 9), -len(x["loc"])))
    loc = _format_loc(tuple(e["loc"]))
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key (a typo?)"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    where = f"{source}: {loc}" if loc else source
    return RecipeError(where, msg)


def parse_recipe(data: Any, *, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a mapping (already-parsed YAML)."""
    if not isinstance(data, dict):
        raise RecipeError(source, "a recipe must be a YAML mapping (key: value pairs)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise _validation_error_to_recipe_error(err, source) from err


def load_recipe(path: str | Path, *, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a YAML recipe file; ``overrides`` (CLI) win over the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), "recipe file does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise RecipeError(where, f"invalid YAML: {getattr(err, 'problem', err)}") from err
    if isinstance(data, dict) and overrides:
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return parse_recipe(data, source=str(path))


def coerce_float(value: Any) -> float:
    """Float parameter coercion: numbers and numeric strings (``"1e-3"``), not bools."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            out = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
        if math.isnan(out):
            raise ValueError("expected a number, got NaN")
        return out
    raise ValueError(f"expected a number, got {value!r}")


def coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "false"}:
        return value.lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"expected true or false, got {value!r}")
