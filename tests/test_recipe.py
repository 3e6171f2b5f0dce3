"""Recipe schema, parameter evaluation, loading, and the static checks of plan.check_recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from mergekit_lite.errors import RecipeError
from mergekit_lite.methods.registry import METHODS
from mergekit_lite.plan import check_recipe
from mergekit_lite.recipe import (
    ConditionalParameter,
    Recipe,
    coerce_float,
    evaluate_setting,
    load_recipe,
    parse_recipe,
)

SRC = "r.yaml"


def ties_recipe(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "ft0", "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": "ft1", "parameters": {"weight": 0.5}},
        ],
    }
    data.update(over)
    return data


def slices_recipe(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "merge_method": "slerp",
        "slices": [
            {
                "sources": [
                    {"model": "a", "layer_range": [0, 4]},
                    {"model": "b", "layer_range": [2, 6]},
                ],
                "base_model": "a",
                "parameters": {"t": [0.0, 0.5, 1.0]},
            }
        ],
        "parameters": {"t": 0.5},
        "dtype": "bfloat16",
    }
    data.update(over)
    return data


def recipe_error(data: Any) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, source=SRC)
    return info.value


def check_error(data: dict[str, Any]) -> RecipeError:
    recipe = parse_recipe(data, source=SRC)
    with pytest.raises(RecipeError) as info:
        check_recipe(recipe, source=SRC)
    return info.value


# -- parse_recipe -----------------------------------------------------------------------


def test_parse_models_recipe() -> None:
    r = parse_recipe(ties_recipe(dtype="bf16", seed=3), source=SRC)
    assert r.merge_method == "ties"
    assert [m.model for m in r.models or []] == ["ft0", "ft1"]
    assert r.dtype == "bfloat16"  # alias canonicalised
    assert r.seed == 3
    assert r.referenced_models() == ["base", "ft0", "ft1"]


def test_parse_slices_recipe() -> None:
    r = parse_recipe(slices_recipe(), source=SRC)
    assert r.models is None
    (sl,) = r.slices or []
    assert [s.layer_range for s in sl.sources] == [(0, 4), (2, 6)]
    assert [s.num_layers for s in sl.sources] == [4, 4]
    assert r.referenced_models() == ["a", "b"]


def test_unknown_top_level_key() -> None:
    err = recipe_error({**ties_recipe(), "modelz": []})
    assert err.where == f"{SRC}: modelz"
    assert "unknown key" in err.message
    assert f"{SRC}: modelz" in str(err)


def test_unknown_nested_key_names_its_path() -> None:
    err = recipe_error(ties_recipe(models=[{"model": "ft0", "paramters": {"weight": 1}}]))
    assert err.where == f"{SRC}: models[0].paramters"
    assert "unknown key" in err.message


@pytest.mark.parametrize("keys", [("models", "slices"), ()], ids=["both", "neither"])
def test_models_xor_slices(keys: tuple[str, ...]) -> None:
    data: dict[str, Any] = {"merge_method": "linear"}
    if keys:
        data["models"] = ties_recipe()["models"]
        data["slices"] = slices_recipe()["slices"]
    err = recipe_error(data)
    assert "exactly one of 'models' or 'slices'" in err.message


def test_slice_sources_with_unequal_layer_counts() -> None:
    data = slices_recipe()
    data["slices"][0]["sources"][1]["layer_range"] = [0, 3]  # 4 vs 3 layers
    err = recipe_error(data)
    assert err.where == f"{SRC}: slices[0]"
    assert "same number of layers" in err.message
    assert "[4, 3]" in err.message


def test_bad_layer_range() -> None:
    data = slices_recipe()
    data["slices"][0]["sources"][0]["layer_range"] = [3, 3]
    assert "layer_range" in str(recipe_error(data))


def test_bad_dtype() -> None:
    err = recipe_error(ties_recipe(dtype="float8"))
    assert err.where == f"{SRC}: dtype"
    assert "float8" in err.message


def test_tokenizer_source_and_block_are_exclusive() -> None:
    assert parse_recipe(ties_recipe(tokenizer_source="union")).vocab_source == "union"
    r = parse_recipe(ties_recipe(tokenizer={"source": "base", "pad_to_multiple_of": 64}))
    assert r.vocab_source == "base" and r.tokenizer is not None
    err = recipe_error(ties_recipe(tokenizer_source="union", tokenizer={"source": "base"}))
    assert "not both" in err.message
    err = recipe_error(ties_recipe(tokenizer={"source": "union", "pad_to_multiple_of": 0}))
    assert err.where == f"{SRC}: tokenizer.pad_to_multiple_of"


@pytest.mark.parametrize(
    "data,where",
    [
        (ties_recipe(models=[{"model": "ft0+"}]), "models[0].model"),
        (ties_recipe(base_model="+lora"), "base_model"),
    ],
)
def test_malformed_lora_references_rejected(data: dict[str, Any], where: str) -> None:
    err = recipe_error(data)
    assert err.where == f"{SRC}: {where}"
    assert "path+adapter_path" in err.message


def test_lora_references_accepted() -> None:
    assert parse_recipe(ties_recipe(models=[{"model": "ft0+lora"}])).models[0].model == "ft0+lora"


def test_non_mapping_recipe() -> None:
    assert recipe_error([1, 2]).where == SRC


# -- evaluate_setting -------------------------------------------------------------------


def test_scalar_setting() -> None:
    assert evaluate_setting(0.3, "any.tensor", 0.7) == 0.3
    assert evaluate_setting(None, "any.tensor") is None


@pytest.mark.parametrize("t,expected", [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)])
def test_two_knot_gradient(t: float, expected: float) -> None:
    # scaled = t * (2-1) = t, i0 = int(t), frac = t - i0 -> (1-frac)*0 + frac*1 (t=1: i0=i1=1)
    assert evaluate_setting([0.0, 1.0], "x", t) == pytest.approx(expected)


@pytest.mark.parametrize(
    "t,expected", [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.75, 0.5), (1.0, 0.0)]
)
def test_three_knot_gradient(t: float, expected: float) -> None:
    # [0, 1, 0]: t=.25 -> scaled .5, i0 0, frac .5 -> .5*0 + .5*1 = .5
    #            t=.75 -> scaled 1.5, i0 1, frac .5 -> .5*1 + .5*0 = .5
    assert evaluate_setting([0, 1, 0], "x", t) == pytest.approx(expected)


def test_gradient_four_knots_by_hand() -> None:
    # [1, 3, 2, 6] at t=0.5: scaled 1.5, i0 1, frac .5 -> .5*3 + .5*2 = 2.5
    assert evaluate_setting([1, 3, 2, 6], "x", 0.5) == pytest.approx(2.5)
    # t = 0.9: scaled 2.7, i0 2, frac .7 -> .3*2 + .7*6 = 4.8
    assert evaluate_setting([1, 3, 2, 6], "x", 0.9) == pytest.approx(4.8)


FILTERS = [
    ConditionalParameter(filter="self_attn", value=0.1),
    ConditionalParameter(filter="attn", value=0.2),
    ConditionalParameter(value=0.3),
]


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", 0.1),  # first match wins over "attn"
        ("model.layers.0.cross_attn.k_proj.weight", 0.2),
        ("model.layers.0.mlp.up_proj.weight", 0.3),  # unfiltered fallback
    ],
)
def test_filter_list_first_match_wins(name: str, expected: float) -> None:
    assert evaluate_setting(FILTERS, name) == expected


def test_filter_star_matches_anything() -> None:
    setting = [
        ConditionalParameter(filter="mlp", value=1),
        ConditionalParameter(filter="*", value=2),
    ]
    assert evaluate_setting(setting, "model.layers.3.self_attn.o_proj.weight") == 2
    assert evaluate_setting(setting, "model.layers.3.mlp.down_proj.weight") == 1


def test_filter_list_without_match_is_none() -> None:
    setting = [ConditionalParameter(filter="mlp", value=1)]
    assert evaluate_setting(setting, "model.embed_tokens.weight") is None
    # a single conditional behaves like a one-entry list
    assert evaluate_setting(setting[0], "model.embed_tokens.weight") is None
    assert evaluate_setting(setting[0], "model.layers.0.mlp.gate_proj.weight") == 1


def test_filter_value_can_be_a_gradient() -> None:
    setting = [
        ConditionalParameter(filter="mlp", value=[0.0, 1.0]),
        ConditionalParameter(value=0.9),
    ]
    # matched entry's gradient at t=.25: .75*0 + .25*1
    assert evaluate_setting(setting, "layers.1.mlp.w", 0.25) == pytest.approx(0.25)
    assert evaluate_setting(setting, "layers.1.attn.w", 0.25) == 0.9


def test_filters_from_parsed_yaml() -> None:
    text = """
merge_method: linear
models:
  - model: a
    parameters:
      weight:
        - {filter: self_attn, value: 0.1}
        - value: 0.7
"""
    r = parse_recipe(yaml.safe_load(text), source=SRC)
    setting = (r.models or [])[0].parameters["weight"]  # type: ignore[index]
    assert evaluate_setting(setting, "l.0.self_attn.q.weight") == 0.1
    assert evaluate_setting(setting, "l.0.mlp.up.weight") == 0.7


@pytest.mark.parametrize("t,expected", [(0.0, "a"), (0.5, "b"), (0.99, "b"), (1.0, "c")])
def test_non_numeric_list_picks_by_index(t: float, expected: str) -> None:
    # values[int(t * 2)]: int(0.5*2)=1, int(0.99*2)=int(1.98)=1, int(1*2)=2
    assert evaluate_setting(["a", "b", "c"], "x", t) == expected


def test_coerce() -> None:
    assert evaluate_setting("1e-3", "x", coerce=coerce_float) == 0.001
    # leaves are coerced before interpolating: ["0", "1e-1"] at t=.5 -> .5*0 + .5*0.1
    assert evaluate_setting(["0", "1e-1"], "x", 0.5, coerce=coerce_float) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        coerce_float(True)
    with pytest.raises(ValueError):
        coerce_float("nan")


# -- round trip and loading -------------------------------------------------------------


def test_round_trip_models_recipe() -> None:
    data = ties_recipe(
        models=[
            {
                "model": "ft0",
                "parameters": {
                    "weight": [0.2, 0.8, 0.5],
                    "density": [{"filter": "mlp", "value": [0.3, 0.6]}, {"value": 0.5}],
                },
            },
            {"model": "ft1", "parameters": {"weight": {"filter": "attn", "value": 1}}},
        ],
        parameters={"normalize": True, "lambda": 0.9, "rescale_norm": "l1"},
        dtype="fp16",
        seed=11,
        output="./out",
    )
    r = parse_recipe(data, source=SRC)
    again = parse_recipe(yaml.safe_load(r.to_yaml()), source=SRC)
    assert again == r
    assert again.dtype == "float16"


def test_round_trip_slices_recipe() -> None:
    r = parse_recipe(slices_recipe(chat_template="chatml"), source=SRC)
    assert parse_recipe(yaml.safe_load(r.to_yaml()), source=SRC) == r


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_load_recipe_with_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, ties_recipe(seed=1))
    assert load_recipe(path).seed == 1
    assert load_recipe(path, overrides={"seed": 7}).seed == 7
    assert load_recipe(path, overrides={"seed": None}).seed == 1  # None: not overridden


def test_load_recipe_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: ties\ndtype: float32: oops\nmodels: []\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.where == f"{path}:2"  # the second line holds the stray ':'
    assert "invalid YAML" in info.value.message


def test_load_recipe_validation_error_names_file(tmp_path: Path) -> None:
    path = _write(tmp_path, ties_recipe(modelz=1))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.where == f"{path}: modelz"


def test_load_recipe_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


# -- plan.check_recipe ------------------------------------------------------------------


def test_check_recipe_accepts_a_valid_recipe() -> None:
    assert check_recipe(parse_recipe(ties_recipe()), source=SRC) is METHODS["ties"]
    assert check_recipe(parse_recipe(slices_recipe()), source=SRC) is METHODS["slerp"]


def test_unknown_method_lists_valid_ones() -> None:
    err = check_error(ties_recipe(merge_method="tiez"))
    assert err.where == f"{SRC}: merge_method"
    assert "tiez" in err.message
    for name in METHODS:
        assert name in err.message


def test_unknown_parameter_names_key_path() -> None:
    err = check_error(
        ties_recipe(models=[{"model": "ft0", "parameters": {"weight": 1, "densty": 0.5}}])
    )
    assert err.where == f"{SRC}: models[0].parameters.densty"
    assert "densty" in err.message
    assert "density" in err.message  # the accepted list helps spot the typo


def test_shared_parameter_set_per_model() -> None:
    err = check_error(
        ties_recipe(models=[{"model": "ft0", "parameters": {"weight": 1, "normalize": False}}])
    )
    assert err.where == f"{SRC}: models[0].parameters.normalize"


def test_shared_parameter_per_slice_source() -> None:
    data = slices_recipe()
    data["slices"][0]["sources"][0]["parameters"] = {"t": 0.3}
    assert check_error(data).where == f"{SRC}: slices[0].sources[0].parameters.t"


@pytest.mark.parametrize(
    "data,where",
    [
        (ties_recipe(parameters={"density": 0}), "parameters.density"),
        (ties_recipe(parameters={"density": 1.5}), "parameters.density"),
        (ties_recipe(parameters={"density": [0.5, 0.0]}), "parameters.density"),
        (
            ties_recipe(
                models=[
                    {
                        "model": "ft0",
                        "parameters": {
                            "weight": 1,
                            "density": [{"filter": "mlp", "value": 1.5}, {"value": 0.5}],
                        },
                    }
                ]
            ),
            "models[0].parameters.density",
        ),
        (
            ties_recipe(
                models=[
                    {
                        "model": "ft0",
                        "parameters": {"weight": 1, "density": {"filter": "x", "value": [0.2, 0]}},
                    }
                ]
            ),
            "models[0].parameters.density",
        ),
    ],
    ids=["zero", "above-one", "in-gradient", "in-filter", "in-filter-gradient"],
)
def test_density_out_of_range_anywhere(data: dict[str, Any], where: str) -> None:
    err = check_error(data)
    assert err.where == f"{SRC}: {where}"
    assert "(0, 1]" in err.message


def test_density_out_of_range_in_slice_source() -> None:
    data = {
        "merge_method": "ties",
        "slices": [
            {
                "sources": [
                    {"model": "a", "layer_range": [0, 2]},
                    {
                        "model": "b",
                        "layer_range": [0, 2],
                        "parameters": {"weight": 1, "density": 0},
                    },
                ],
                "base_model": "a",
            }
        ],
    }
    err = check_error(data)
    assert err.where == f"{SRC}: slices[0].sources[1].parameters.density"
    assert "(0, 1]" in err.message


def test_density_one_is_allowed() -> None:
    # the interval is (0, 1]: 1 is inside
    check_recipe(parse_recipe(ties_recipe(parameters={"density": 1})), source=SRC)


def test_slerp_t_out_of_range() -> None:
    err = check_error(slices_recipe(parameters={"t": 1.2}))
    assert err.where == f"{SRC}: parameters.t"
    assert "[0, 1]" in err.message


def test_non_numeric_weight() -> None:
    err = check_error(ties_recipe(parameters={"weight": "abc"}))
    assert "expected a number" in err.message


def test_ties_without_base_model() -> None:
    data = ties_recipe()
    del data["base_model"]
    err = check_error(data)
    assert "base_model" in str(err)
    assert "ties" in err.message


def test_passthrough_models_takes_one() -> None:
    err = check_error({"merge_method": "passthrough", "models": [{"model": "a"}, {"model": "b"}]})
    assert err.where == f"{SRC}: models"


def test_recipe_is_immutable() -> None:
    r = parse_recipe(ties_recipe())
    assert isinstance(r, Recipe)
    with pytest.raises(ValidationError):
        r.seed = 5  # type: ignore[misc]
    assert r.seed == 0
