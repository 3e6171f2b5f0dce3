"""End-to-end: recipes through the CLI and the API into real Hugging Face folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import load_weights, run_cli, write_recipe

from mergekit_lite.engine import InMemoryMerger, execute, merge_state_dict, run_merge
from mergekit_lite.plan import build_plan
from mergekit_lite.recipe import parse_recipe


def _ties(fam: dict[str, Path], **over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": str(fam["base"]),
        "models": [
            {"model": str(fam["ft0"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(fam["ft1"]), "parameters": {"weight": [0.2, 0.8], "density": 0.7}},
        ],
        "dtype": "float32",
    }
    r.update(over)
    return r


def _generate(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    with torch.no_grad():
        return model.generate(torch.tensor([[1, 5, 9, 7]]), max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("family", ["llama_family", "qwen_family", "gpt2_family"])
def test_merged_folder_loads_and_generates(
    family: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    fam = request.getfixturevalue(family)
    recipe = write_recipe(tmp_path / "r.yaml", _ties(fam))
    out = tmp_path / "merged"
    result = run_cli("run", recipe, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "tensors" in result.stdout and "GB/s" in result.stdout and "peak memory" in result.stdout

    tokens = _generate(out)
    assert tokens.shape == (1, 8)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template is not None
    assert len(tok) == len(AutoTokenizer.from_pretrained(fam["base"]))

    # every tensor of the base is there (tied models keep no lm_head.weight)
    assert set(load_weights(out)) == set(load_weights(fam["base"]))

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model_relation"] == "merge"
    assert front["tags"] == ["merge", "mergekit-lite"]
    assert front["library_name"] == "transformers"
    assert str(fam["ft0"]) in front["base_model"]
    assert "https://arxiv.org/abs/2306.01708" in card
    assert recipe.read_text().strip() in card  # recipe verbatim

    again = parse_recipe(yaml.safe_load((out / "merge_recipe.yaml").read_text()))
    assert again == parse_recipe(yaml.safe_load(recipe.read_text()))


def test_sharded_output_with_index(llama_family: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", _ties(llama_family))
    out = tmp_path / "merged"
    result = run_cli("run", recipe, "-o", out, "--max-shard-size", "60KB")
    assert result.exit_code == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).is_file() for s in shards)
    weights = load_weights(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in weights.values())
    assert set(index["weight_map"]) == set(weights)
    # same numbers as an unsharded merge
    single = tmp_path / "single"
    assert run_cli("run", recipe, "-o", single).exit_code == 0
    ref = load_weights(single)
    assert all(torch.equal(weights[k], ref[k]) for k in ref)
    assert _generate(out).shape == (1, 8)


def test_dry_run_reads_no_weights(
    llama_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mergekit_lite.engine
    import mergekit_lite.io.safetensors_io as sio

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("dry run read a tensor")

    monkeypatch.setattr(sio, "read_tensor", boom)
    monkeypatch.setattr(mergekit_lite.engine, "read_tensor", boom)
    recipe = write_recipe(tmp_path / "r.yaml", _ties(llama_family))
    out = tmp_path / "merged"
    result = run_cli("run", recipe, "-o", out, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert not out.exists()
    assert plan["method"] == "ties" and plan["layers"] == 4
    assert plan["tensors"] == len(load_weights(llama_family["base"]))
    assert plan["bytes_to_read"] == 3 * plan["bytes_to_write"]
    first_layer = next(t for t in plan["tasks"] if t["tensor"].startswith("model.layers.0."))
    last_layer = next(t for t in plan["tasks"] if t["tensor"].startswith("model.layers.3."))
    # the weight gradient [0.2, 0.8] over 4 layers: t = 0 and t = 1
    assert first_layer["params"]["weight"][1] == pytest.approx(0.2)
    assert last_layer["params"]["weight"][1] == pytest.approx(0.8)
    text = run_cli("run", recipe, "--dry-run")
    assert text.exit_code == 0 and "would read" in text.stdout


def test_gradient_reaches_each_layer(qwen_family: dict[str, Path], tmp_path: Path) -> None:
    """slerp with t: [0, 1] -> layer 0 is the base, the last layer is the other model."""
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "slerp",
            "base_model": str(qwen_family["base"]),
            "models": [{"model": str(qwen_family["base"])}, {"model": str(qwen_family["ft0"])}],
            "parameters": {"t": [0.0, 1.0]},
            "dtype": "float32",
        },
    )
    out = tmp_path / "merged"
    assert run_cli("run", recipe, "-o", out).exit_code == 0
    merged, base, ft = (load_weights(p) for p in (out, qwen_family["base"], qwen_family["ft0"]))
    name = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name.format(0)], base[name.format(0)])
    torch.testing.assert_close(merged[name.format(3)], ft[name.format(3)])
    # non-layer tensors take the first value of the gradient (t = 0)
    torch.testing.assert_close(merged["model.norm.weight"], base["model.norm.weight"])


def test_random_methods_are_reproducible(qwen_family: dict[str, Path], tmp_path: Path) -> None:
    def dare(seed: int) -> dict[str, Any]:
        return _ties(
            qwen_family,
            merge_method="dare_ties",
            seed=seed,
        )

    r1 = write_recipe(tmp_path / "a.yaml", dare(7))
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        assert run_cli("run", r1, "-o", out).exit_code == 0
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    other = tmp_path / "o_seed"
    assert run_cli("run", r1, "-o", other, "--seed", "8").exit_code == 0
    assert (other / "model.safetensors").read_bytes() != outs[0]
    assert "seed: 8" in (other / "merge_recipe.yaml").read_text()


def test_result_does_not_depend_on_tensor_order(qwen_family: dict[str, Path]) -> None:
    recipe = parse_recipe(_ties(qwen_family, merge_method="della", seed=3))
    plan = build_plan(recipe)
    forward: dict[str, torch.Tensor] = {}
    execute(plan, forward.__setitem__)
    plan.tasks.reverse()
    backward: dict[str, torch.Tensor] = {}
    execute(plan, backward.__setitem__, prefetch=0, threaded_sink=False)
    assert all(torch.equal(forward[k], backward[k]) for k in forward)


def test_in_memory_merge_matches_disk_and_reuses_sources(
    llama_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = parse_recipe(_ties(llama_family))
    result = run_merge(recipe, tmp_path / "merged")
    on_disk = load_weights(result.output)
    in_memory = merge_state_dict(recipe)
    assert set(in_memory) == set(on_disk)
    assert all(torch.equal(in_memory[k], on_disk[k]) for k in on_disk)

    import mergekit_lite.engine as engine

    reads = {"n": 0}
    real = engine.read_tensor

    def counting(info: Any) -> torch.Tensor:
        reads["n"] += 1
        return real(info)

    monkeypatch.setattr(engine, "read_tensor", counting)
    merger = InMemoryMerger()
    first = merger.merge(recipe)
    n_first = reads["n"]
    assert n_first == 3 * len(first)
    other = parse_recipe(_ties(llama_family, parameters={"lambda": 0.5}))
    second = merger.merge(other)
    assert reads["n"] == n_first  # nothing read again
    key = "model.layers.1.self_attn.q_proj.weight"
    base = load_weights(llama_family["base"])[key]
    # lambda scales the merged task vector
    torch.testing.assert_close(second[key] - base, 0.5 * (first[key] - base))
    # results never alias the cache
    second[key].zero_()
    assert not torch.equal(merger.merge(other)[key], second[key])


def test_bf16_inputs_keep_their_dtype_unless_told(
    bf16_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _ties(bf16_family)
    recipe.pop("dtype")
    r = write_recipe(tmp_path / "r.yaml", recipe)
    assert run_cli("run", r, "-o", tmp_path / "a").exit_code == 0
    assert {t.dtype for t in load_weights(tmp_path / "a").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "bfloat16"
    assert run_cli("run", r, "-o", tmp_path / "b", "--out-dtype", "float16").exit_code == 0
    assert {t.dtype for t in load_weights(tmp_path / "b").values()} == {torch.float16}
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "float16"
    assert _generate(tmp_path / "b").shape == (1, 8)


def test_passthrough_stacks_layers_and_updates_config(
    qwen_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(qwen_family["base"]), "layer_range": [0, 3]}]},
                {
                    "sources": [
                        {
                            "model": str(qwen_family["ft0"]),
                            "layer_range": [2, 4],
                            "parameters": {
                                "scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]
                            },
                        }
                    ]
                },
            ],
            "dtype": "float32",
        },
    )
    out = tmp_path / "stacked"
    assert run_cli("run", recipe, "-o", out).exit_code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5
    assert len(cfg["layer_types"]) == 5
    merged, base, ft = (load_weights(p) for p in (out, qwen_family["base"], qwen_family["ft0"]))
    assert torch.equal(
        merged["model.layers.2.mlp.up_proj.weight"], base["model.layers.2.mlp.up_proj.weight"]
    )
    # output layer 3 is ft0's layer 2, output layer 4 is ft0's layer 3
    assert torch.equal(
        merged["model.layers.3.mlp.up_proj.weight"], ft["model.layers.2.mlp.up_proj.weight"]
    )
    torch.testing.assert_close(
        merged["model.layers.4.self_attn.o_proj.weight"],
        0.5 * ft["model.layers.3.self_attn.o_proj.weight"],
    )
    assert "model.layers.5.mlp.up_proj.weight" not in merged
    assert _generate(out).shape == (1, 8)


def test_chat_template_and_tokenizer_source(qwen_family: dict[str, Path], tmp_path: Path) -> None:
    r = write_recipe(
        tmp_path / "r.yaml",
        _ties(qwen_family, chat_template="chatml", tokenizer_source=str(qwen_family["ft1"])),
    )
    out = tmp_path / "merged"
    assert run_cli("run", r, "-o", out).exit_code == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False)
    assert text.startswith("<|im_start|>user\nw1<|im_end|>")


def test_json_summary(qwen_family: dict[str, Path], tmp_path: Path) -> None:
    r = write_recipe(tmp_path / "r.yaml", _ties(qwen_family, output=str(tmp_path / "from_recipe")))
    result = run_cli("run", r, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["output"] == str(tmp_path / "from_recipe")
    assert summary["bytes_read"] == 3 * sum(
        t.numel() * 4 for t in load_weights(qwen_family["base"]).values()
    )
    assert summary["peak_rss_bytes"] > 0 and "model.safetensors" in summary["files"]


def test_hub_ids_resolve_from_the_local_cache_offline(
    qwen_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub repo id (with @revision) is found in the Hugging Face cache, no network."""
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for name, key in (("tiny-base", "base"), ("tiny-sft", "ft0")):
        repo = cache / f"models--test-org--{name}"
        shutil.copytree(qwen_family[key], repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": "test-org/tiny-base",
            "models": [{"model": "test-org/tiny-sft@main", "parameters": {"weight": 0.5}}],
            "dtype": "float32",
        },
    )
    out = tmp_path / "merged"
    result = run_cli("run", recipe, "-o", out)
    assert result.exit_code == 0, result.stderr
    merged, base, sft = (load_weights(p) for p in (out, qwen_family["base"], qwen_family["ft0"]))
    key = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[key], base[key] + 0.5 * (sft[key] - base[key]))
    assert "test-org/tiny-base" in (out / "README.md").read_text()

    missing = write_recipe(
        tmp_path / "m.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": "test-org/tiny-base",
            "models": [{"model": "test-org/not-cached", "parameters": {"weight": 0.5}}],
        },
    )
    result = run_cli("run", missing, "-o", tmp_path / "never")
    assert result.exit_code == 2
    assert "test-org/not-cached" in result.stderr and "Hugging Face Hub" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_card_records_the_seed_of_random_methods(
    qwen_family: dict[str, Path], tmp_path: Path
) -> None:
    r = write_recipe(tmp_path / "r.yaml", _ties(qwen_family, merge_method="dare_ties", seed=11))
    assert run_cli("run", r, "-o", tmp_path / "dare").exit_code == 0
    assert "drawn with seed 11" in (tmp_path / "dare" / "README.md").read_text()
    r = write_recipe(tmp_path / "t.yaml", _ties(qwen_family))
    assert run_cli("run", r, "-o", tmp_path / "ties").exit_code == 0
    assert "seed" not in (tmp_path / "ties" / "README.md").read_text().split("## Recipe")[0]


def test_mergekit_parameters_without_effect_are_accepted_with_a_warning(
    qwen_family: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """mergekit lists density/rescale for task_arithmetic too; its recipes keep running."""
    plain = _ties(qwen_family, merge_method="task_arithmetic")
    for m in plain["models"]:
        m["parameters"] = {"weight": m["parameters"]["weight"]}
    with_density = dict(
        plain,
        models=[dict(m, parameters={**m["parameters"], "density": 0.5}) for m in plain["models"]],
    )
    a, b = parse_recipe(plain), parse_recipe(with_density)
    with caplog.at_level("WARNING"):
        sd_b = merge_state_dict(b)
    assert "'density' has no effect for task_arithmetic" in caplog.text
    sd_a = merge_state_dict(a)
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
