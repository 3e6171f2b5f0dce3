"""Plan a merge: recipe + checkpoint indexes -> one task per output tensor.

Planning reads only metadata (configs and safetensors headers), so every mistake that can
be found without the weights is found here, before any output file exists: unknown
methods and parameters, out-of-range values, missing base models, layer ranges past the
end of a model, tensors missing from one model, shapes that disagree.

Layout follows mergekit 0.1.5: a ``models:`` recipe is one slice spanning all layers (a
``base_model`` that is not listed is added as a source); the output is the non-layer
tensors before the layers (embeddings: taken from the first slice's sources), the layers
of each slice in order (renumbered), then the tensors after the layers (final norm,
LM head: from the last slice's sources). Gradients are evaluated at ``t = i / (n - 1)``
for layer ``i`` of an ``n``-layer slice (``t = 1`` for a one-layer slice) and at ``t = 0``
for non-layer tensors.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mergekit_lite.errors import CheckpointError, MergeError, RecipeError
from mergekit_lite.io.checkpoint import (
    Checkpoint,
    open_checkpoint,
    resolve_model_path,
    set_config_dtype,
)
from mergekit_lite.io.safetensors_io import TensorInfo
from mergekit_lite.methods.base import MethodSpec, ParamSpec, Scope
from mergekit_lite.methods.registry import get_method
from mergekit_lite.recipe import ParameterSetting, Recipe, evaluate_setting, setting_leaves
from mergekit_lite.vocab import index_map, is_vocab_tensor, output_vocab, read_vocab

log = logging.getLogger(__name__)

__all__ = ["TensorTask", "MergePlan", "check_recipe", "build_plan", "LayerLayout"]

_LAYER_RE = re.compile(
    r"^(?P<prefix>(?:[^.]+\.)*?(?:layers|h|blocks|layer))\.(?P<idx>\d+)\.(?P<rest>.+)$"
)
_PRE_HINTS = ("embed", "wte.", "wpe.")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class TensorTask:
    """How to produce one output tensor."""

    name: str
    inputs: tuple[TensorInfo, ...]  # one per input model, in source order
    models: tuple[str, ...]  # model reference of each input
    base_index: int | None
    shared: Mapping[str, Any]
    per_input: Mapping[str, tuple[Any, ...]]  # per-model parameters, aligned with inputs
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    layer: int | None = None  # output layer index, None for embeddings/norm/head
    # vocabulary alignment: per input, the input row of each output row (-1: none)
    vocab_maps: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

    @property
    def bytes_in(self) -> int:
        return sum(i.nbytes for i in self.inputs)

    @property
    def bytes_out(self) -> int:
        return math.prod(self.shape) * self.out_dtype.itemsize


@dataclass
class MergePlan:
    recipe: Recipe
    method: MethodSpec
    tasks: list[TensorTask]
    checkpoints: dict[str, Checkpoint]
    reference: str  # model whose config/tokenizer the output starts from
    tokenizer_source: str
    config: dict[str, Any]  # the output config.json
    compute_dtype: torch.dtype
    source: str = "recipe"
    union_vocab: dict[str, int] | None = None  # the output vocabulary, for "union"

    @property
    def bytes_to_read(self) -> int:
        return sum(t.bytes_in for t in self.tasks)

    @property
    def bytes_to_write(self) -> int:
        return sum(t.bytes_out for t in self.tasks)

    @property
    def num_layers(self) -> int:
        return 1 + max((t.layer for t in self.tasks if t.layer is not None), default=-1)


# -- static checks (no checkpoint opened) ---------------------------------------------------


def check_recipe(recipe: Recipe, *, source: str = "recipe") -> MethodSpec:
    """Check everything that does not need the checkpoints: the method, every parameter
    name, where it is set, and every value a gradient or filter can take."""
    method = get_method(recipe.merge_method, where=f"{source}: merge_method")
    accepted = ", ".join(p.name for p in method.params) or "none"
    for key, name, setting, level in recipe.parameter_settings():
        where = f"{source}: {key}"
        spec = method.param(name)
        if spec is None:
            raise RecipeError(
                where, f"unknown parameter {name!r} for {method.name} (accepted: {accepted})"
            )
        if level == "model" and spec.scope is Scope.SHARED:
            raise RecipeError(
                where,
                f"{name!r} applies to all inputs of a tensor; set it under the top-level "
                "or slice 'parameters', not per model",
            )
        for leaf in setting_leaves(setting):
            try:
                spec.coerce(leaf)
            except ValueError as e:
                raise RecipeError(where, f"{name} {e}") from None
        if spec.inert:
            log.warning(
                "%s: %r has no effect for %s (accepted as mergekit does)", where, name, method.name
            )
    if (
        method.base == "required"
        and not recipe.base_model
        and not any(s.base_model for s in recipe.slices or [])
    ):
        raise RecipeError(f"{source}: base_model", f"{method.name} needs a base_model")
    if method.base == "ignored" and method.name == "passthrough" and recipe.models:
        if len(recipe.models) != 1:
            raise RecipeError(
                f"{source}: models",
                "passthrough takes exactly one model (use slices to stack layers)",
            )
    return method


# -- layer structure ------------------------------------------------------------------------


@dataclass
class LayerLayout:
    """Which tensors of a checkpoint belong to which transformer layer."""

    prefix: str | None  # e.g. "model.layers"
    layers: dict[int, dict[str, str]]  # layer index -> {suffix: full name}
    others: list[str]  # non-layer tensor names, checkpoint order

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def of(cls, ckpt: Checkpoint) -> LayerLayout:
        counts: dict[str, int] = {}
        for name in ckpt.tensors:
            m = _LAYER_RE.match(name)
            if m:
                counts[m["prefix"]] = counts.get(m["prefix"], 0) + 1
        prefix = max(counts, key=lambda p: counts[p]) if counts else None
        layers: dict[int, dict[str, str]] = {}
        others: list[str] = []
        for name in ckpt.tensors:
            m = _LAYER_RE.match(name)
            if m and m["prefix"] == prefix:
                layers.setdefault(int(m["idx"]), {})[m["rest"]] = name
            else:
                others.append(name)
        if layers and sorted(layers) != list(range(len(layers))):
            raise CheckpointError(
                str(ckpt.path), f"layer indices are not contiguous: {sorted(layers)[:10]}..."
            )
        layers = dict(sorted(layers.items()))
        return cls(prefix, layers, others)


def _is_pre(name: str) -> bool:
    return any(h in name for h in _PRE_HINTS)


# -- parameter resolution ------------------------------------------------------------------


@dataclass
class _Source:
    model: str
    layer_range: tuple[int, int]
    parameters: Mapping[str, ParameterSetting] | None
    key: str  # recipe key path, for messages


@dataclass
class _Slice:
    sources: list[_Source]
    base_model: str | None
    parameters: Mapping[str, ParameterSetting] | None
    key: str


@dataclass
class _Resolver:
    """Parameter precedence, highest first: source (per model) > slice > global."""

    recipe: Recipe
    source: str

    def _levels(
        self, sl: _Slice, model: str | None
    ) -> Iterable[Mapping[str, ParameterSetting] | None]:
        if model is not None:
            for s in sl.sources:
                if s.model == model:
                    yield s.parameters
        yield sl.parameters
        yield self.recipe.parameters

    def value(
        self, spec: ParamSpec, sl: _Slice, tensor: str, t: float, model: str | None, key: str
    ) -> Any:
        for level in self._levels(sl, model):
            if level is not None and spec.name in level:
                v = evaluate_setting(level[spec.name], tensor, t, coerce=spec.coerce)
                if v is not None:
                    return v
        if spec.required:
            who = f" for model {model!r}" if model else ""
            raise RecipeError(
                f"{self.source}: {key + '.' if key else ''}parameters",
                f"missing required parameter {spec.name!r}{who} (tensor {tensor})",
            )
        return spec.default


# -- building the plan ---------------------------------------------------------------------


def _normalize_slices(recipe: Recipe, layouts: dict[str, LayerLayout], source: str) -> list[_Slice]:
    """A ``models:`` recipe is one slice over all layers, with the base added as a source."""
    if recipe.slices:
        return [
            _Slice(
                sources=[
                    _Source(src.model, src.layer_range, src.parameters, f"slices[{i}].sources[{j}]")
                    for j, src in enumerate(s.sources)
                ],
                base_model=s.base_model,
                parameters=s.parameters,
                key=f"slices[{i}]",
            )
            for i, s in enumerate(recipe.slices)
        ]
    assert recipe.models
    sources = [
        _Source(m.model, (0, layouts[m.model].num_layers), m.parameters, f"models[{i}]")
        for i, m in enumerate(recipe.models)
    ]
    if recipe.base_model and recipe.base_model not in {s.model for s in sources}:
        sources.append(
            _Source(
                recipe.base_model, (0, layouts[recipe.base_model].num_layers), None, "base_model"
            )
        )
    counts = {s.model: s.layer_range[1] for s in sources}
    if len(set(counts.values())) > 1:
        raise MergeError(
            f"{source}: models",
            "models have different numbers of layers "
            f"({', '.join(f'{m}: {n}' for m, n in counts.items())}); use slices to say which "
            "layers to combine",
        )
    return [_Slice(sources=sources, base_model=None, parameters=None, key="")]


def _check_contract(method: MethodSpec, sl: _Slice, base: str | None, source: str) -> int | None:
    """Validate a slice's inputs against the method; returns the base's index."""
    where = f"{source}: {sl.key or 'models'}"
    models = [s.model for s in sl.sources]
    n = len(models)
    base_index = None
    if base is not None and method.base != "ignored":
        if base not in models:
            raise RecipeError(where, f"base_model {base!r} is not one of the sources")
        base_index = models.index(base)
    if method.base == "required" and base_index is None:
        raise RecipeError(f"{source}: base_model", f"{method.name} needs a base_model")
    non_base = n - (1 if base_index is not None else 0)
    if n < method.min_inputs or (method.max_inputs is not None and n > method.max_inputs):
        want = (
            f"exactly {method.min_inputs}"
            if method.max_inputs == method.min_inputs
            else f"at least {method.min_inputs}"
            if method.max_inputs is None
            else f"{method.min_inputs} to {method.max_inputs}"
        )
        raise RecipeError(
            where, f"{method.name} takes {want} input models (base included), got {n}"
        )
    if non_base < method.min_non_base or (
        method.max_non_base is not None and non_base > method.max_non_base
    ):
        raise RecipeError(
            where,
            f"{method.name} takes exactly {method.min_non_base} models besides the base, "
            f"got {non_base}",
        )
    return base_index


def _find_input(ckpt: Checkpoint, name: str, layout: LayerLayout) -> TensorInfo | None:
    info = ckpt.tensors.get(name)
    if info is None and name.endswith("lm_head.weight") and ckpt.tie_word_embeddings:
        # a model with tied embeddings stores its LM head as the input embedding
        for other in layout.others:
            if other.endswith(("embed_tokens.weight", "wte.weight")):
                return ckpt.tensors[other]
    return info


@dataclass
class _Vocabulary:
    """The output vocabulary and each model's (and so each input's) row mapping."""

    out: dict[str, int]
    rows: int
    vocabs: dict[str, dict[str, int]]

    @classmethod
    def build(
        cls, recipe: Recipe, checkpoints: dict[str, Checkpoint], reference: str, source: str
    ) -> _Vocabulary | None:
        src = recipe.vocab_source
        if src is None:
            return None
        vocabs = {ref: read_vocab(c.path) for ref, c in checkpoints.items()}
        if src not in ("base", "union") and src not in vocabs:
            vocabs[src] = read_vocab(resolve_model_path(src, where=f"{source}: tokenizer_source"))
        order = [r for r in recipe.referenced_models() if r != reference]
        out = output_vocab(src, vocabs, reference, order)
        pad = recipe.tokenizer.pad_to_multiple_of if recipe.tokenizer else None
        rows = len(out) if not pad else -(-len(out) // pad) * pad
        if len(set(out.values())) != len(out) or max(out.values()) >= rows:
            raise MergeError(f"{source}: tokenizer_source", "the output vocabulary has gaps")
        return cls(out, rows, vocabs)

    def maps(
        self, name: str, infos: list[TensorInfo], sl: _Slice
    ) -> tuple[torch.Tensor, ...] | None:
        if not is_vocab_tensor(name) or len(infos[0].shape) != 2:
            return None
        return tuple(
            index_map(self.out, self.vocabs[s.model], info.shape[0], self.rows)
            for s, info in zip(sl.sources, infos, strict=True)
        )


_ARCH_KEYS = ("model_type", "hidden_size", "n_embd", "d_model")


def _check_architectures(recipe: Recipe, checkpoints: dict[str, Checkpoint], source: str) -> None:
    """Refuse models of different architectures by name, before comparing tensors."""
    refs = recipe.referenced_models()
    for key in _ARCH_KEYS:
        values = {r: checkpoints[r].config.get(key) for r in refs if key in checkpoints[r].config}
        if len(set(values.values())) > 1:
            desc = ", ".join(f"{r}: {v}" for r, v in values.items())
            raise MergeError(
                f"{source}: models",
                f"the models have different architectures ({key}: {desc})",
            )


def _layer_count_key(config: Mapping[str, Any]) -> str | None:
    return next((k for k in _LAYER_COUNT_KEYS if k in config), None)


def build_plan(
    recipe: Recipe,
    *,
    source: str = "recipe",
    allow_pickle: bool = False,
    checkpoints: dict[str, Checkpoint] | None = None,
) -> MergePlan:
    """Validate ``recipe`` against its checkpoints and list every output tensor's task.

    ``checkpoints`` may carry already-opened checkpoints (keyed by reference) to reuse;
    it is filled with the ones opened here.
    """
    method = check_recipe(recipe, source=source)
    if checkpoints is None:
        checkpoints = {}
    for ref in recipe.referenced_models():
        if ref not in checkpoints:
            checkpoints[ref] = open_checkpoint(ref, allow_pickle=allow_pickle)
    _check_architectures(recipe, checkpoints, source)
    layouts = {ref: LayerLayout.of(c) for ref, c in checkpoints.items()}
    slices = _normalize_slices(recipe, layouts, source)

    for sl in slices:
        for s in sl.sources:
            n = layouts[s.model].num_layers
            if s.layer_range[1] > n:
                raise RecipeError(
                    f"{source}: {s.key}.layer_range",
                    f"{list(s.layer_range)} is past the end of {s.model!r}, which has {n} layers",
                )
    bases = [sl.base_model or recipe.base_model for sl in slices]
    base_indices = [
        _check_contract(method, sl, b, source) for sl, b in zip(slices, bases, strict=True)
    ]

    reference = recipe.base_model or slices[0].sources[0].model
    ref_ckpt = checkpoints[reference]
    ref_layout = layouts[reference]
    compute_dtype = getattr(torch, recipe.dtype or "float32")
    resolver = _Resolver(recipe, source)
    vocab = _Vocabulary.build(recipe, checkpoints, reference, source)
    tasks: list[TensorTask] = []

    def add_task(
        out_name: str,
        sl: _Slice,
        base_index: int | None,
        input_names: list[str],
        t: float,
        layer: int | None,
    ) -> None:
        infos: list[TensorInfo] = []
        for s, name in zip(sl.sources, input_names, strict=True):
            info = _find_input(checkpoints[s.model], name, layouts[s.model])
            if info is None:
                raise MergeError(
                    str(checkpoints[s.model].path), f"tensor {name!r} is missing from this model"
                )
            infos.append(info)
        maps = vocab.maps(out_name, infos, sl) if vocab is not None else None
        shapes = {i.shape[1:] if maps is not None else i.shape for i in infos}
        if len(shapes) > 1:
            desc = ", ".join(
                f"{s.model}: {list(i.shape)}" for s, i in zip(sl.sources, infos, strict=True)
            )
            hint = (
                "; vocabularies differ? set tokenizer_source: union or base"
                if is_vocab_tensor(out_name)
                else ""
            )
            raise MergeError(out_name, f"input shapes disagree ({desc}){hint}")
        shared = {}
        per_input: dict[str, tuple[Any, ...]] = {}
        for spec in method.params:
            if spec.scope is Scope.SHARED:
                shared[spec.name] = resolver.value(spec, sl, out_name, t, None, sl.key)
            else:
                values: list[Any] = []
                for idx, (s, name) in enumerate(zip(sl.sources, input_names, strict=True)):
                    if spec.scope is Scope.NON_BASE and idx == base_index:
                        values.append(None)
                    else:
                        values.append(resolver.value(spec, sl, name, t, s.model, s.key))
                per_input[spec.name] = tuple(values)
        _check_joint(method, shared, per_input, sl, out_name, source)
        first = infos[base_index if base_index is not None else 0]
        shape = first.shape if maps is None else (maps[0].numel(), *first.shape[1:])
        if recipe.out_dtype:
            out_dtype = getattr(torch, recipe.out_dtype)
        elif recipe.dtype:
            out_dtype = compute_dtype
        else:
            out_dtype = first.dtype
        if not first.dtype.is_floating_point:
            out_dtype = first.dtype
        tasks.append(
            TensorTask(
                name=out_name,
                inputs=tuple(infos),
                models=tuple(s.model for s in sl.sources),
                base_index=base_index,
                shared=shared,
                per_input=per_input,
                shape=shape,
                out_dtype=out_dtype,
                layer=layer,
                vocab_maps=maps,
            )
        )

    pre = [n for n in ref_layout.others if _is_pre(n)]
    post = [n for n in ref_layout.others if not _is_pre(n)]
    for name in pre:
        add_task(name, slices[0], base_indices[0], [name] * len(slices[0].sources), 0.0, None)

    out_layer = 0
    layer_types: list[Any] = []
    for sl, base_index in zip(slices, base_indices, strict=True):
        lead = sl.sources[base_index if base_index is not None else 0]
        n = lead.layer_range[1] - lead.layer_range[0]
        for idx in range(n):
            t = idx / (n - 1) if n > 1 else 1.0
            lead_layer = layouts[lead.model].layers[lead.layer_range[0] + idx]
            prefix = ref_layout.prefix or layouts[lead.model].prefix
            for suffix in lead_layer:
                names = []
                for s in sl.sources:
                    lay = layouts[s.model]
                    names.append(f"{lay.prefix}.{s.layer_range[0] + idx}.{suffix}")
                add_task(f"{prefix}.{out_layer}.{suffix}", sl, base_index, names, t, out_layer)
            lt = checkpoints[lead.model].config.get("layer_types")
            if isinstance(lt, list) and lead.layer_range[0] + idx < len(lt):
                layer_types.append(lt[lead.layer_range[0] + idx])
            out_layer += 1

    for name in post:
        add_task(name, slices[-1], base_indices[-1], [name] * len(slices[-1].sources), 0.0, None)

    config = _output_config(ref_ckpt, tasks, out_layer, layer_types, ref_layout)
    tok = recipe.vocab_source
    tokenizer_source = reference if tok in (None, "base") else tok
    if tokenizer_source != "union" and tokenizer_source not in checkpoints:
        resolve_model_path(tokenizer_source, where=f"{source}: tokenizer_source")
    return MergePlan(
        recipe=recipe,
        method=method,
        tasks=tasks,
        checkpoints=checkpoints,
        reference=reference,
        tokenizer_source=tokenizer_source,
        config=config,
        compute_dtype=compute_dtype,
        source=source,
        union_vocab=vocab.out if vocab is not None and tok == "union" else None,
    )


def _check_joint(
    method: MethodSpec,
    shared: Mapping[str, Any],
    per_input: Mapping[str, tuple[Any, ...]],
    sl: _Slice,
    tensor: str,
    source: str,
) -> None:
    """Constraints between parameters that single-value ranges cannot express."""
    if "epsilon" in per_input:
        for s, d, e in zip(sl.sources, per_input["density"], per_input["epsilon"], strict=True):
            if d is not None and d < 1 and not (0 < d - e and d + e < 1):
                raise RecipeError(
                    f"{source}: {s.key}.parameters",
                    f"density {d:g} +/- epsilon {e:g} must stay inside (0, 1) (tensor {tensor})",
                )


def _output_config(
    ref: Checkpoint,
    tasks: list[TensorTask],
    num_layers: int,
    layer_types: list[Any],
    layout: LayerLayout,
) -> dict[str, Any]:
    config = dict(ref.config)
    dtypes = {t.out_dtype for t in tasks if t.out_dtype.is_floating_point}
    if dtypes:
        main = max(dtypes, key=lambda d: sum(t.bytes_out for t in tasks if t.out_dtype == d))
        config = set_config_dtype(config, main)
    key = _layer_count_key(config)
    if key is not None and layout.num_layers:
        config[key] = num_layers
    if isinstance(config.get("layer_types"), list) and len(layer_types) == num_layers:
        config["layer_types"] = layer_types
    for t in tasks:
        if t.layer is None and "embed_tokens" in t.name and "vocab_size" in config:
            config["vocab_size"] = t.shape[0]
    return config


def describe(plan: MergePlan) -> list[dict[str, Any]]:
    """One row per output tensor, for ``merge run --dry-run``."""
    rows = []
    for t in plan.tasks:
        params = dict(t.shared)
        for k, vs in t.per_input.items():
            params[k] = [v for v in vs]
        rows.append(
            {
                "tensor": t.name,
                "shape": list(t.shape),
                "dtype": str(t.out_dtype).removeprefix("torch."),
                "inputs": [f"{m}:{i.name}" for m, i in zip(t.models, t.inputs, strict=True)],
                "base": t.models[t.base_index] if t.base_index is not None else None,
                "params": params,
            }
        )
    return rows
