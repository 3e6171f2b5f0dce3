"""Differential tests against mergekit 0.1.5, the reference implementation.

The promise under test: for every deterministic method, the same YAML on the same
inputs with ``dtype: float32`` gives the same tensors as mergekit 0.1.5, equal to float32
rounding. Each case runs ``merge run RECIPE -o OUT`` (our CLI, in-process) and mergekit's
``run_merge`` (in-process) on one recipe file and compares

* the set of tensor names,
* every tensor (``assert_close``, rtol 1e-5, atol 1e-6, dtype included),
* the layer count in config.json (``num_hidden_layers``, ``n_layer`` for GPT-2).

Model paths are always absolute: mergekit treats a relative ``a/b`` as a Hub id.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import load_weights, run_cli, write_recipe

pytest.importorskip("mergekit", reason="mergekit 0.1.5 (the reference) is not installed")

# mergekit's own import-time noise (its lazy unpickler touches numpy.core)
pytestmark = pytest.mark.filterwarnings("ignore:numpy.core is deprecated:DeprecationWarning")

Family = dict[str, Path]
RecipeBuilder = Callable[[Family], dict[str, Any]]

_LAYER_KEYS = ("num_hidden_layers", "n_layer")


# -- recipes -------------------------------------------------------------------------------


def _linear(weights: tuple[float, float, float], normalize: bool | None = None) -> RecipeBuilder:
    def build(f: Family) -> dict[str, Any]:
        recipe: dict[str, Any] = {
            "merge_method": "linear",
            "models": [
                {"model": f[name], "parameters": {"weight": w}}
                for name, w in zip(("base", "ft0", "ft1"), weights, strict=True)
            ],
            "dtype": "float32",
        }
        if normalize is not None:
            recipe["parameters"] = {"normalize": normalize}
        return recipe

    return build


def _slerp(t: Any) -> RecipeBuilder:
    def build(f: Family) -> dict[str, Any]:
        return {
            "merge_method": "slerp",
            "base_model": f["base"],
            "models": [{"model": f["base"]}, {"model": f["ft0"]}],
            "parameters": {"t": t},
            "dtype": "float32",
        }

    return build


def _nuslerp(with_base: bool) -> RecipeBuilder:
    def build(f: Family) -> dict[str, Any]:
        recipe: dict[str, Any] = {
            "merge_method": "nuslerp",
            "models": [
                {"model": f["ft0"], "parameters": {"weight": 0.4}},
                {"model": f["ft1"], "parameters": {"weight": 0.6}},
            ],
            "dtype": "float32",
        }
        if with_base:
            recipe["base_model"] = f["base"]
        return recipe

    return build


def _task_arithmetic(
    weights: tuple[float, float] = (0.7, 0.3), parameters: dict[str, Any] | None = None
) -> RecipeBuilder:
    def build(f: Family) -> dict[str, Any]:
        recipe: dict[str, Any] = {
            "merge_method": "task_arithmetic",
            "base_model": f["base"],
            "models": [
                {"model": f["ft0"], "parameters": {"weight": weights[0]}},
                {"model": f["ft1"], "parameters": {"weight": weights[1]}},
            ],
            "dtype": "float32",
        }
        if parameters:
            recipe["parameters"] = parameters
        return recipe

    return build


def _ties(parameters: dict[str, Any] | None = None) -> RecipeBuilder:
    def build(f: Family) -> dict[str, Any]:
        recipe: dict[str, Any] = {
            "merge_method": "ties",
            "base_model": f["base"],
            "models": [
                {"model": f["base"]},
                {"model": f["ft0"], "parameters": {"density": 0.5, "weight": 0.7}},
                {"model": f["ft1"], "parameters": {"density": 0.5, "weight": [0.2, 0.8]}},
            ],
            "dtype": "float32",
        }
        if parameters:
            recipe["parameters"] = parameters
        return recipe

    return build


def _breadcrumbs(method: str) -> RecipeBuilder:
    def build(f: Family) -> dict[str, Any]:
        return {
            "merge_method": method,
            "base_model": f["base"],
            "models": [
                {"model": f["ft0"], "parameters": {"weight": 0.7, "density": 0.6, "gamma": 0.05}},
                {"model": f["ft1"], "parameters": {"weight": 0.3, "density": 0.6, "gamma": 0.05}},
            ],
            "dtype": "float32",
        }

    return build


def _model_stock(filter_wise: bool | None = None) -> RecipeBuilder:
    def build(f: Family) -> dict[str, Any]:
        recipe: dict[str, Any] = {
            "merge_method": "model_stock",
            "base_model": f["base"],
            "models": [{"model": f["ft0"]}, {"model": f["ft1"]}, {"model": f["ft2"]}],
            "dtype": "float32",
        }
        if filter_wise is not None:
            recipe["parameters"] = {"filter_wise": filter_wise}
        return recipe

    return build


def _passthrough_stack(f: Family) -> dict[str, Any]:
    return {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": f["base"], "layer_range": [0, 3]}]},
            {"sources": [{"model": f["ft0"], "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    }


def _ties_slices(f: Family) -> dict[str, Any]:
    """Precedence source > slice > global, each level deciding some value:

    ========  ==================================  ==================================
    slice     ft0 (weight / density)              ft1 (weight / density)
    ========  ==================================  ==================================
    0 [0,2)   0.3 source / 0.7 slice              0.5 global / 0.7 slice
    1 [2,4)   0.9 source / 0.5 global             0.2 slice / 0.3 source
    ========  ==================================  ==================================
    """
    return {
        "merge_method": "ties",
        "base_model": f["base"],
        "parameters": {"weight": 0.5, "density": 0.5},
        "slices": [
            {
                "sources": [
                    {"model": f["base"], "layer_range": [0, 2]},
                    {"model": f["ft0"], "layer_range": [0, 2], "parameters": {"weight": 0.3}},
                    {"model": f["ft1"], "layer_range": [0, 2]},
                ],
                "parameters": {"density": 0.7},
            },
            {
                "sources": [
                    {"model": f["base"], "layer_range": [2, 4]},
                    {"model": f["ft0"], "layer_range": [2, 4], "parameters": {"weight": 0.9}},
                    {"model": f["ft1"], "layer_range": [2, 4], "parameters": {"density": 0.3}},
                ],
                "parameters": {"weight": 0.2},
            },
        ],
        "dtype": "float32",
    }


def _slerp_slices_one_layer(f: Family) -> dict[str, Any]:
    """A one-layer slice (gradient position t = 1) and a slice-level gradient override."""
    return {
        "merge_method": "slerp",
        "base_model": f["base"],
        "parameters": {"t": [0, 0.5, 1]},
        "slices": [
            {
                "sources": [
                    {"model": f["base"], "layer_range": [0, 1]},
                    {"model": f["ft0"], "layer_range": [0, 1]},
                ]
            },
            {
                "sources": [
                    {"model": f["base"], "layer_range": [1, 4]},
                    {"model": f["ft0"], "layer_range": [1, 4]},
                ],
                "parameters": {"t": [0.2, 0.9]},
            },
        ],
        "dtype": "float32",
    }


SLERP_FILTERS = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]

# (id, family fixture, recipe builder, expected output layer count or None)
CASES = [
    # 1. linear (0.2 + 0.3 + 0.5 = 1, so normalize is a no-op there: the 1.0/0.6/0.9
    #    variants make normalize true/false actually differ)
    pytest.param("llama_family", _linear((0.2, 0.3, 0.5)), 4, id="linear"),
    pytest.param("llama_family", _linear((0.2, 0.3, 0.5), False), 4, id="linear-no-normalize"),
    pytest.param("llama_family", _linear((1.0, 0.6, 0.9)), 4, id="linear-unnormalized-weights"),
    pytest.param(
        "llama_family", _linear((1.0, 0.6, 0.9), False), 4, id="linear-unnormalized-no-normalize"
    ),
    # 2. slerp
    pytest.param("llama_family", _slerp([0, 0.5, 1]), 4, id="slerp-gradient"),
    pytest.param("llama_family", _slerp(SLERP_FILTERS), 4, id="slerp-filters"),
    pytest.param("llama_family", _slerp_slices_one_layer, 4, id="slerp-slices-one-layer"),
    # 3. nuslerp
    pytest.param("llama_family", _nuslerp(True), 4, id="nuslerp-base"),
    pytest.param("llama_family", _nuslerp(False), 4, id="nuslerp-no-base"),
    # 4. task arithmetic (SFT + DPO); 0.7 + 0.3 = 1, so also a 0.7/0.6 normalize variant
    pytest.param("llama_family", _task_arithmetic(), 4, id="task_arithmetic"),
    pytest.param(
        "llama_family",
        _task_arithmetic(parameters={"lambda": 0.5, "normalize": True}),
        4,
        id="task_arithmetic-lambda-normalize",
    ),
    pytest.param(
        "llama_family",
        _task_arithmetic((0.7, 0.6), {"lambda": 0.5, "normalize": True}),
        4,
        id="task_arithmetic-lambda-normalize-unnormalized-weights",
    ),
    # 5. ties
    pytest.param("llama_family", _ties(), 4, id="ties"),
    pytest.param("llama_family", _ties({"int8_mask": True}), 4, id="ties-int8_mask"),
    # 6. breadcrumbs
    pytest.param("llama_family", _breadcrumbs("breadcrumbs"), 4, id="breadcrumbs"),
    pytest.param("llama_family", _breadcrumbs("breadcrumbs_ties"), 4, id="breadcrumbs_ties"),
    # 7. model stock
    pytest.param("llama_family", _model_stock(), 4, id="model_stock"),
    pytest.param("llama_family", _model_stock(True), 4, id="model_stock-filter_wise"),
    # 8. passthrough layer stacking: 3 + 3 layers
    pytest.param("llama_family", _passthrough_stack, 6, id="passthrough-stack"),
    # 9. other architectures
    pytest.param("qwen_family", _ties(), 4, id="ties-qwen2-tied"),
    pytest.param("gpt2_family", _ties(), 4, id="ties-gpt2"),
    # 10. slices with per-slice / per-source parameters
    pytest.param("llama_family", _ties_slices, 4, id="ties-slices-precedence"),
]


# -- running both tools --------------------------------------------------------------------


def _run_mergekit(recipe_path: Path, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mk_run_merge
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate(yaml.safe_load(recipe_path.read_text()))
    mk_run_merge(
        cfg,
        str(out),
        MergeOptions(copy_tokenizer=False, write_model_card=False, lazy_unpickle=False, quiet=True),
    )


def _run_ours(recipe_path: Path, out: Path) -> None:
    result = run_cli("run", recipe_path, "-o", out)
    assert result.exit_code == 0, (
        f"merge run failed ({result.exit_code}):\n{result.stdout}\n{result.stderr}\n"
        f"{result.exception!r}"
    )


def _layer_count(folder: Path) -> tuple[str, int]:
    config = json.loads((folder / "config.json").read_text())
    key = next((k for k in _LAYER_KEYS if k in config), None)
    assert key is not None, f"{folder}/config.json has none of {_LAYER_KEYS}"
    return key, config[key]


@pytest.mark.parametrize(("family", "build", "layers"), CASES)
def test_matches_mergekit(
    family: str,
    build: RecipeBuilder,
    layers: int,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    fam: Family = request.getfixturevalue(family)
    recipe = build(fam)
    for path in fam.values():
        assert path.is_absolute()  # mergekit reads a relative 'a/b' as a Hub id
    recipe_path = write_recipe(tmp_path / "recipe.yaml", recipe)

    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "mergekit"
    _run_ours(recipe_path, ours_dir)
    _run_mergekit(recipe_path, theirs_dir)

    ours, theirs = load_weights(ours_dir), load_weights(theirs_dir)
    assert theirs, "mergekit wrote no tensors"
    assert sorted(ours) == sorted(theirs), (
        f"tensor names differ: only ours {sorted(set(ours) - set(theirs))}, "
        f"only mergekit {sorted(set(theirs) - set(ours))}"
    )
    mismatches = []
    for name in sorted(theirs):
        try:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)
        except AssertionError as e:
            a, b = ours[name], theirs[name]
            diff = (
                f"max abs diff {(a.double() - b.double()).abs().max().item():.3g}"
                if a.shape == b.shape
                else f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
            )
            mismatches.append(f"{name}: {diff} ({str(e).splitlines()[0]})")
    assert not mismatches, f"{len(mismatches)} tensors differ from mergekit:\n" + "\n".join(
        mismatches
    )

    our_key, our_layers = _layer_count(ours_dir)
    their_key, their_layers = _layer_count(theirs_dir)
    assert our_key == their_key
    assert our_layers == their_layers == layers, (
        f"config.json {our_key}: ours {our_layers}, mergekit {their_layers}, expected {layers}"
    )
