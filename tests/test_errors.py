"""Bad input: one line on stderr naming the key or file, exit 2, nothing at the output path."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_cli, write_recipe
from safetensors.torch import load_file, save_file


def _ties(fam: dict[str, Path], **over: Any) -> dict[str, Any]:
    recipe: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": fam["base"],
        "models": [
            {"model": fam["ft0"], "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": fam["ft1"], "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "dtype": "float32",
    }
    recipe.update(over)
    return recipe


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_single_file(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    f = folder / "model.safetensors"
    sd = load_file(f)
    edit(sd)
    save_file(sd, f, metadata={"format": "pt"})


def assert_clean_failure(result: Any, out: Path, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists()
    leftovers = [p.name for p in out.parent.glob(f".{out.name}.*")]
    assert leftovers == [], leftovers


CASES: list[tuple[str, Callable[[dict[str, Path], Path], dict[str, Any]], tuple[str, ...]]] = [
    ("unknown method", lambda f, t: _ties(f, merge_method="tiez"), ("merge_method", "tiez")),
    (
        "unknown parameter",
        lambda f, t: _ties(
            f,
            models=[
                {"model": f["ft0"], "parameters": {"weight": 0.5, "densty": 0.5}},
                {"model": f["ft1"], "parameters": {"weight": 0.5}},
            ],
        ),
        ("models[0].parameters.densty", "unknown parameter"),
    ),
    ("unknown key", lambda f, t: _ties(f, modls=[]), ("modls", "unknown key")),
    ("missing base_model", lambda f, t: _ties(f, base_model=None), ("base_model",)),
    (
        "density zero",
        lambda f, t: _ties(f, parameters={"density": 0.0}),
        ("parameters.density", "(0, 1]"),
    ),
    (
        "density above one in a gradient",
        lambda f, t: _ties(
            f,
            models=[
                {"model": f["ft0"], "parameters": {"weight": 0.5, "density": [0.5, 1.5]}},
                {"model": f["ft1"], "parameters": {"weight": 0.5}},
            ],
        ),
        ("models[0].parameters.density", "(0, 1]"),
    ),
    (
        "t outside [0, 1]",
        lambda f, t: {
            "merge_method": "slerp",
            "base_model": f["base"],
            "models": [{"model": f["base"]}, {"model": f["ft0"]}],
            "parameters": {"t": [0.0, 1.2]},
        },
        ("parameters.t", "[0, 1]"),
    ),
    (
        "slices with unequal layer counts",
        lambda f, t: {
            "merge_method": "slerp",
            "base_model": f["base"],
            "slices": [
                {
                    "sources": [
                        {"model": f["base"], "layer_range": [0, 4]},
                        {"model": f["ft0"], "layer_range": [0, 3]},
                    ]
                }
            ],
            "parameters": {"t": 0.5},
        },
        ("slices[0]", "same number of layers"),
    ),
    (
        "layer range past the end",
        lambda f, t: {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": f["base"], "layer_range": [0, 9]}]}],
        },
        ("slices[0].sources[0].layer_range", "4 layers"),
    ),
    (
        "model path does not exist",
        lambda f, t: _ties(
            f,
            models=[
                {"model": str(t / "nope"), "parameters": {"weight": 0.5}},
                {"model": f["ft1"], "parameters": {"weight": 0.5}},
            ],
        ),
        ("does not exist", "nope"),
    ),
    (
        "checkpoint with no weights",
        lambda f, t: _ties(
            f,
            models=[
                {"model": _config_only(f["ft0"], t / "empty"), "parameters": {"weight": 0.5}},
                {"model": f["ft1"], "parameters": {"weight": 0.5}},
            ],
        ),
        ("empty", "no weights"),
    ),
    (
        "corrupt safetensors",
        lambda f, t: _ties(
            f,
            models=[
                {"model": _corrupt(f["ft0"], t / "corrupt"), "parameters": {"weight": 0.5}},
                {"model": f["ft1"], "parameters": {"weight": 0.5}},
            ],
        ),
        ("corrupt", "model.safetensors"),
    ),
    (
        "truncated safetensors",
        lambda f, t: _ties(
            f,
            models=[
                {"model": _truncate(f["ft0"], t / "trunc"), "parameters": {"weight": 0.5}},
                {"model": f["ft1"], "parameters": {"weight": 0.5}},
            ],
        ),
        ("truncated", "trunc"),
    ),
    (
        "tensor shapes disagree",
        lambda f, t: _ties(
            f,
            models=[
                {"model": _reshaped(f["ft0"], t / "wide"), "parameters": {"weight": 0.5}},
                {"model": f["ft1"], "parameters": {"weight": 0.5}},
            ],
        ),
        ("shapes disagree", "model.layers.1.mlp.up_proj.weight"),
    ),
    (
        "tensor missing in one model",
        lambda f, t: _ties(
            f,
            models=[
                {"model": _dropped(f["ft0"], t / "holey"), "parameters": {"weight": 0.5}},
                {"model": f["ft1"], "parameters": {"weight": 0.5}},
            ],
        ),
        ("model.layers.2.self_attn.v_proj.weight", "missing", "holey"),
    ),
    (
        "NaN in an input tensor",
        lambda f, t: _ties(
            f,
            models=[
                {"model": f["ft0"], "parameters": {"weight": 0.5}},
                {"model": _poisoned(f["ft1"], t / "nan"), "parameters": {"weight": 0.5}},
            ],
        ),
        ("NaN or Inf", "model.layers.3.mlp.down_proj.weight", "nan"),
    ),
]


def _config_only(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def _corrupt(src: Path, dst: Path) -> Path:
    _copy_model(src, dst)
    (dst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return dst


def _truncate(src: Path, dst: Path) -> Path:
    _copy_model(src, dst)
    f = dst / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    return dst


def _reshaped(src: Path, dst: Path) -> Path:
    _copy_model(src, dst)

    def edit(sd: dict[str, torch.Tensor]) -> None:
        w = sd["model.layers.1.mlp.up_proj.weight"]
        sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(w.shape[0] + 1, w.shape[1])

    _edit_single_file(dst, edit)
    return dst


def _dropped(src: Path, dst: Path) -> Path:
    _copy_model(src, dst)
    _edit_single_file(dst, lambda sd: sd.pop("model.layers.2.self_attn.v_proj.weight"))
    return dst


def _poisoned(src: Path, dst: Path) -> Path:
    _copy_model(src, dst)

    def edit(sd: dict[str, torch.Tensor]) -> None:
        sd["model.layers.3.mlp.down_proj.weight"][0, 0] = float("nan")

    _edit_single_file(dst, edit)
    return dst


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(
    case: tuple[str, Callable[..., dict[str, Any]], tuple[str, ...]],
    qwen_family: dict[str, Path],
    tmp_path: Path,
) -> None:
    _, make, needles = case
    recipe = write_recipe(tmp_path / "recipe.yaml", make(qwen_family, tmp_path))
    out = tmp_path / "out" / "merged"
    result = run_cli("run", recipe, "-o", out)
    assert_clean_failure(result, out, *needles)


def test_verbose_shows_the_traceback(qwen_family: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", _ties(qwen_family, merge_method="tiez"))
    result = run_cli("run", recipe, "-o", tmp_path / "o", "--verbose")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_existing_output_is_refused_then_overwritten(
    qwen_family: dict[str, Path], tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", _ties(qwen_family))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_cli("run", recipe, "-o", out)
    assert result.exit_code == 2
    assert "already exists" in result.stderr and str(out) in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"

    result = run_cli("run", recipe, "-o", out, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert not (out / "precious.txt").exists()
    assert (out / "model.safetensors").is_file()


def test_missing_recipe_file_and_bad_yaml(tmp_path: Path) -> None:
    result = run_cli("run", tmp_path / "nope.yaml", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: ties\nmodels: [\n")
    result = run_cli("run", bad, "-o", tmp_path / "o")
    assert result.exit_code == 2 and "invalid YAML" in result.stderr and "bad.yaml" in result.stderr


def test_pickle_checkpoints_need_allow_pickle(qwen_family: dict[str, Path], tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(qwen_family["ft0"] / "config.json", legacy / "config.json")
    torch.save(load_file(qwen_family["ft0"] / "model.safetensors"), legacy / "pytorch_model.bin")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        _ties(
            qwen_family,
            models=[
                {"model": legacy, "parameters": {"weight": 0.5, "density": 0.5}},
                {"model": qwen_family["ft1"], "parameters": {"weight": 0.5, "density": 0.5}},
            ],
        ),
    )
    out = tmp_path / "merged"
    result = run_cli("run", recipe, "-o", out)
    assert_clean_failure(result, out, "pytorch_model.bin", "--allow-pickle")

    result = run_cli("run", recipe, "-o", out, "--allow-pickle")
    assert result.exit_code == 0, result.stderr
    # same numbers as the safetensors original
    ref = tmp_path / "ref"
    recipe2 = write_recipe(tmp_path / "r2.yaml", _ties(qwen_family))
    assert run_cli("run", recipe2, "-o", ref).exit_code == 0
    a = load_file(out / "model.safetensors")
    b = load_file(ref / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_interrupted_merge_leaves_nothing(
    qwen_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge killed half-way (here: Ctrl-C after a few tensors) leaves no output."""
    import mergekit_lite.engine as engine

    real = engine.merge_tensor
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "merge_tensor", flaky)
    recipe = write_recipe(tmp_path / "r.yaml", _ties(qwen_family))
    out = tmp_path / "merged"
    result = run_cli("run", recipe, "-o", out)
    assert result.exit_code == 130
    assert not out.exists()
    assert list(tmp_path.glob(".merged.*")) == []


def test_index_listing_a_missing_shard(llama_family: dict[str, Path], tmp_path: Path) -> None:
    broken = _copy_model(llama_family["ft0"], tmp_path / "broken")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (broken / victim).unlink()
    recipe = write_recipe(
        tmp_path / "r.yaml",
        _ties(
            llama_family,
            models=[
                {"model": broken, "parameters": {"weight": 0.5}},
                {"model": llama_family["ft1"], "parameters": {"weight": 0.5}},
            ],
        ),
    )
    out = tmp_path / "merged"
    assert_clean_failure(run_cli("run", recipe, "-o", out), out, victim, "missing")


def test_different_architectures_are_refused_by_name(
    llama_family: dict[str, Path], tmp_path: Path
) -> None:
    from mergekit_lite.synthetic import save_family

    narrow = save_family(tmp_path / "narrow", arch="llama", n_finetunes=0, hidden_size=32)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "linear",
            "models": [
                {"model": str(llama_family["base"]), "parameters": {"weight": 1.0}},
                {"model": str(narrow["base"]), "parameters": {"weight": 1.0}},
            ],
        },
    )
    out = tmp_path / "merged"
    assert_clean_failure(
        run_cli("run", recipe, "-o", out),
        out,
        "different architectures (hidden_size:",
        "base: 64",
        "base: 32",
    )


def test_bad_shard_size_and_missing_gpu(qwen_family: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", _ties(qwen_family))
    out = tmp_path / "merged"
    assert_clean_failure(
        run_cli("run", recipe, "-o", out, "--max-shard-size", "lots"), out, "--max-shard-size"
    )
    if not torch.cuda.is_available():
        assert_clean_failure(run_cli("run", recipe, "-o", out, "--device", "cuda"), out, "GPU")
