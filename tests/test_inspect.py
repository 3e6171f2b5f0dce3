"""``merge inspect``: task-vector norms, cosine, sign conflicts, top-k overlap, density."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergekit_lite.cli.inspect_models import inspect as inspect_cmd
from mergekit_lite.errors import MergeError, RecipeError
from mergekit_lite.io.checkpoint import Checkpoint
from mergekit_lite.surgery.inspect import (
    DENSITIES,
    InspectReport,
    inspect_models,
    module_kind,
    save_heatmap,
    write_json,
)

Q = "model.layers.0.self_attn.q_proj.weight"
U = "model.layers.0.mlp.up_proj.weight"


def _save(folder: Path, tensors: dict[str, torch.Tensor], *, tie: bool = False) -> Path:
    """A minimal model folder: one safetensors file and a Llama-like config.json."""
    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "tie_word_embeddings": tie,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _vec(*values: float, n: int = 10) -> torch.Tensor:
    """A [2, 5] tensor whose flattened entries start with ``values`` and are 0 after."""
    out = torch.zeros(n)
    out[: len(values)] = torch.tensor(values)
    return out.reshape(2, 5)


@pytest.fixture(scope="module")
def hand(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tensors (attention, mlp) with deltas chosen for hand computation.

    base: q = 1, up = 2 (||base||^2 = 10 + 40 = 50); delta_A = [1, -2, 3, 0, ...] in q only.
    """
    root = tmp_path_factory.mktemp("hand")
    base = {Q: torch.ones(2, 5), U: torch.full((2, 5), 2.0)}
    d_a = _vec(1.0, -2.0, 3.0)

    def model(name: str, dq: torch.Tensor, du: torch.Tensor | None = None) -> Path:
        du = torch.zeros(2, 5) if du is None else du
        return _save(root / name, {Q: base[Q] + dq, U: base[U] + du})

    return {
        "base": _save(root / "base", base),
        "A": model("A", d_a),
        "orth": model("orth", _vec(0.0, 0.0, 0.0, 4.0)),  # disjoint support
        "neg": model("neg", -d_a),
        "dbl": model("dbl", 2 * d_a),
        "unif": model("unif", torch.full((2, 5), 0.5), torch.full((2, 5), 0.5)),
    }


@pytest.fixture(scope="module")
def hand_report(hand: dict[str, Path]) -> InspectReport:
    names = ["A", "orth", "neg", "dbl", "unif", "base"]
    return inspect_models([hand[n] for n in names], base=hand["base"])


def _pair(report: InspectReport, a: int, b: int) -> Any:
    return report.pair_total(report.pairs.index((a, b)))


# -- numbers checked by hand -----------------------------------------------------------------


def test_per_model_numbers_by_hand(hand_report: InspectReport) -> None:
    a = hand_report.model_total(0)
    assert a.numel == 20
    assert a.delta_norm == pytest.approx(math.sqrt(14))
    assert a.base_norm == pytest.approx(math.sqrt(50))
    assert a.relative_norm == pytest.approx(math.sqrt(14 / 50))
    assert a.near_zero == 17 and a.near_zero_fraction == pytest.approx(0.85)
    # TIES keeps the top d*n entries per tensor: q keeps 3^2 at d=0.1, 3^2+2^2 at d=0.2
    kept = a.kept_mass_fraction
    assert kept is not None
    assert kept[0.1] == pytest.approx(9 / 14) and kept[0.2] == pytest.approx(13 / 14)
    assert kept[1.0] == 1.0
    assert a.recommended_density == 0.2
    # per module kind and per layer
    kinds = hand_report.model_by_kind(0)
    assert kinds["attention"].delta_norm == pytest.approx(math.sqrt(14))
    assert kinds["mlp"].delta_norm == 0.0
    assert kinds["mlp"].relative_norm == 0.0
    assert hand_report.groups == ["0"]
    assert hand_report.model_by_group(0)["0"].delta_sq == pytest.approx(14)

    # a uniform delta needs 90 % of its entries to keep 90 % of its mass
    u = hand_report.model_total(4)
    assert u.relative_norm == pytest.approx(math.sqrt(20 * 0.25 / 50))
    assert u.near_zero_fraction == 0.0
    assert u.kept_mass_fraction is not None
    for d in DENSITIES:
        assert u.kept_mass_fraction[d] == pytest.approx(d)
    assert u.recommended_density == 0.9


def test_pair_numbers_by_hand(hand_report: InspectReport) -> None:
    orth = _pair(hand_report, 0, 1)
    assert orth.cosine == pytest.approx(0.0, abs=1e-12)
    assert orth.sign_basis == 0 and orth.sign_conflict_rate is None  # no shared support
    # top-2 of q: A = {-2, 3}; orth has one nonzero entry (zeros are never "top")
    assert (orth.topk_size_a, orth.topk_size_b, orth.topk_intersection) == (2, 1, 0)
    assert orth.topk_overlap == 0.0

    neg = _pair(hand_report, 0, 2)
    assert neg.cosine == pytest.approx(-1.0)
    assert (neg.sign_conflicts, neg.sign_basis) == (3, 3)
    assert neg.sign_conflict_rate == 1.0
    assert neg.topk_overlap == 1.0

    dbl = _pair(hand_report, 0, 3)
    assert dbl.cosine == pytest.approx(1.0)
    assert dbl.sign_conflict_rate == 0.0 and dbl.sign_basis == 3
    assert dbl.topk_overlap == 1.0
    assert dbl.dot == pytest.approx(28.0)

    # A vs uniform 0.5: dot = 0.5 * (1 - 2 + 3) = 1; ||unif|| = sqrt(20 * 0.25)
    unif = _pair(hand_report, 0, 4)
    assert unif.cosine == pytest.approx(1.0 / (math.sqrt(14) * math.sqrt(5)))
    assert (unif.sign_conflicts, unif.sign_basis) == (1, 3)

    # most conflicting / least aligned layers come from the per-layer numbers
    p = hand_report.pairs.index((0, 2))
    assert hand_report.most_conflicting_layers(p) == [("0", 1.0)]
    assert hand_report.least_aligned_layers(p)[0][0] == "0"
    assert hand_report.least_aligned_layers(p)[0][1] == pytest.approx(-1.0)


def test_model_identical_to_base_gives_none_not_nan(hand_report: InspectReport) -> None:
    same = hand_report.model_total(5)
    assert same.delta_norm == 0.0 and same.relative_norm == 0.0
    assert same.near_zero_fraction == 1.0
    assert same.kept_mass_fraction is None and same.recommended_density is None
    pair = _pair(hand_report, 0, 5)
    assert pair.cosine is None and pair.sign_conflict_rate is None and pair.topk_overlap is None
    p = hand_report.pairs.index((0, 5))
    assert hand_report.most_conflicting_layers(p) == []
    json.dumps(hand_report.to_json(), allow_nan=False)  # strict JSON: no NaN anywhere


def test_top_k_changes_the_overlap_set(hand: dict[str, Path]) -> None:
    report = inspect_models([hand["A"], hand["unif"]], base=hand["base"], top_k=0.1)
    pair = report.pair_total(0)
    # k = 1 per tensor: A keeps {3} in q; uniform ties everywhere, so keeps all 20
    assert (pair.topk_size_a, pair.topk_size_b, pair.topk_intersection) == (1, 20, 1)
    assert pair.topk_overlap == pytest.approx(2 / 21)


def test_zero_base_norm_is_none(tmp_path: Path) -> None:
    base = _save(tmp_path / "base", {Q: torch.zeros(2, 5)})
    model = _save(tmp_path / "m", {Q: torch.ones(2, 5)})
    report = inspect_models([model], base=base)
    assert report.model_total(0).relative_norm is None
    assert report.to_json()["per_model"][0]["whole"]["relative_norm"] is None


def test_eps_defines_near_zero_and_sign_basis(hand: dict[str, Path]) -> None:
    report = inspect_models([hand["A"], hand["neg"]], base=hand["base"], eps=1.5)
    assert report.model_total(0).near_zero == 18  # |1| <= 1.5 now counts as zero
    assert report.pair_total(0).sign_basis == 2


# -- model families --------------------------------------------------------------------------


def test_family_task_vectors_share_a_direction(llama_family: dict[str, Path]) -> None:
    """ft_i = base + shared + own_i with equal variances: cosine ~ 0.5, conflicts ~ 1/3."""
    fam = llama_family
    report = inspect_models([fam["ft0"], fam["ft1"], fam["ft2"]], base=fam["base"])
    assert report.pairs == [(0, 1), (0, 2), (1, 2)]
    for p in range(3):
        s = report.pair_total(p)
        assert s.cosine is not None and 0.3 < s.cosine < 0.7
        assert s.sign_conflict_rate is not None and 0.25 < s.sign_conflict_rate < 0.42
        assert s.topk_overlap is not None and s.topk_overlap > report.top_k  # above chance
        assert len(report.most_conflicting_layers(p)) == 3
        assert len(report.least_aligned_layers(p)) == 3
    assert report.groups == ["embed", "0", "1", "2", "3", "final"]
    for i in range(3):
        total = report.model_total(i)
        assert total.relative_norm is not None and total.relative_norm > 0
        assert total.recommended_density == 0.5  # Gaussian: top 50 % holds ~93 % of the mass
        by_layer = report.model_by_group(i)
        by_kind = report.model_by_kind(i)
        assert set(by_kind) == {"embeddings", "attention", "mlp", "norms"}
        assert sum(s.delta_sq for s in by_layer.values()) == pytest.approx(total.delta_sq)
        assert sum(s.delta_sq for s in by_kind.values()) == pytest.approx(total.delta_sq)
        assert sum(s.numel for s in by_kind.values()) == total.numel


def test_tied_family(qwen_family: dict[str, Path]) -> None:
    fam = qwen_family
    report = inspect_models([fam["ft0"], fam["ft1"]], base=fam["base"])
    names = {t.name for t in report.tensors}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    cos = report.pair_total(0).cosine
    assert cos is not None and 0.3 < cos < 0.7


def test_tied_model_against_untied_base_compares_its_embedding(tmp_path: Path) -> None:
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    base = _save(tmp_path / "base", {emb: torch.zeros(4, 2), head: torch.ones(4, 2)})
    tied = _save(tmp_path / "tied", {emb: torch.full((4, 2), 3.0)}, tie=True)
    report = inspect_models([tied], base=base)
    by_name = {t.name: t for t in report.tensors}
    assert by_name[emb].models[0].delta_norm == pytest.approx(3.0 * math.sqrt(8))
    assert by_name[head].models[0].delta_norm == pytest.approx(2.0 * math.sqrt(8))  # 3 - 1
    assert report.tied_head == [True]

    untied = _save(tmp_path / "untied", {emb: torch.zeros(4, 2)})
    with pytest.raises(MergeError, match="lm_head.weight' is missing"):
        inspect_models([untied], base=base)


def test_non_floating_tensors_are_skipped(tmp_path: Path) -> None:
    ids = "model.layers.0.self_attn.position_ids"
    t = {Q: torch.ones(2, 5), ids: torch.arange(4)}
    base = _save(tmp_path / "base", t)
    model = _save(tmp_path / "m", {**t, Q: torch.full((2, 5), 2.0)})
    report = inspect_models([model], base=base)
    assert report.skipped == [ids]
    assert [x.name for x in report.tensors] == [Q]


def test_tensors_only_a_model_has_are_ignored(
    hand: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra = "model.layers.0.self_attn.q_proj.bias"
    t = {Q: torch.ones(2, 5), U: torch.full((2, 5), 2.0), extra: torch.ones(2)}
    model = _save(tmp_path / "m", t)
    report = inspect_models([model], base=hand["base"])
    assert report.ignored == [[extra]]
    assert extra in caplog.text and "not analyzed" in caplog.text
    assert report.to_json()["per_model"][0]["ignored_tensors"] == [extra]


def test_module_kinds() -> None:
    assert module_kind("model.layers.0.post_attention_layernorm.weight") == "norms"
    assert module_kind("model.layers.0.self_attn.q_norm.weight") == "norms"
    assert module_kind("transformer.h.0.ln_1.weight") == "norms"
    assert module_kind("model.layers.0.self_attn.o_proj.weight") == "attention"
    assert module_kind("transformer.h.0.attn.c_proj.weight") == "attention"
    assert module_kind("transformer.h.0.mlp.c_proj.weight") == "mlp"
    assert module_kind("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert module_kind("transformer.wte.weight") == "embeddings"
    assert module_kind("lm_head.weight") == "embeddings"
    assert module_kind("model.layers.0.router.bias") == "other"


# -- bad input (library) ---------------------------------------------------------------------


def test_shape_mismatch_names_tensor_and_shapes(hand: dict[str, Path], tmp_path: Path) -> None:
    bad = _save(tmp_path / "bad", {Q: torch.ones(5, 2), U: torch.ones(2, 5)})
    with pytest.raises(MergeError) as e:
        inspect_models([hand["A"], bad], base=hand["base"])
    msg = str(e.value)
    assert Q in msg and "[5, 2]" in msg and "[2, 5]" in msg and str(bad) in msg


def test_other_hidden_size_is_a_shape_error(llama_family: dict[str, Path], tmp_path: Path) -> None:
    from mergekit_lite.synthetic import save_family

    narrow = save_family(
        tmp_path, arch="llama", n_finetunes=0, hidden_size=32, intermediate_size=64, tokenizer=False
    )["base"]
    with pytest.raises(MergeError, match=r"shape \[128, 32\] here but \[128, 64\]"):
        inspect_models([narrow], base=llama_family["base"])


def test_nan_is_an_error(hand: dict[str, Path], tmp_path: Path) -> None:
    nan = _save(tmp_path / "nan", {Q: torch.full((2, 5), math.nan), U: torch.ones(2, 5)})
    with pytest.raises(MergeError, match="NaN or Inf"):
        inspect_models([nan], base=hand["base"])


@pytest.mark.parametrize(
    "kwargs", [{"top_k": 0.0}, {"top_k": 1.5}, {"eps": -1.0}, {"eps": math.nan}]
)
def test_bad_settings(hand: dict[str, Path], kwargs: dict[str, float]) -> None:
    with pytest.raises(RecipeError):
        inspect_models([hand["A"]], base=hand["base"], **kwargs)  # type: ignore[arg-type]


def test_no_models(hand: dict[str, Path]) -> None:
    with pytest.raises(RecipeError, match="at least one model"):
        inspect_models([], base=hand["base"])


# -- streaming -------------------------------------------------------------------------------


def test_reads_stream_one_tensor_name_at_a_time(
    llama_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every name is read from the base then each model, consecutively, in the base's
    order; when a tensor is read, every tensor still alive is of that same name."""
    real_read = Checkpoint.read
    live: dict[int, str] = {}
    reads: list[tuple[str, str]] = []
    peak = 0
    strays: list[tuple[str, list[str]]] = []

    def counting_read(self: Checkpoint, name: str) -> torch.Tensor:
        nonlocal peak
        others = [n for n in live.values() if n != name]
        if others:
            strays.append((name, others))
        # a tensor over a numpy array keeps that array alive exactly as long as its
        # storage (through every view), so the array's finalizer marks the memory freed
        array = real_read(self, name).numpy()
        key = id(array)
        live[key] = name
        weakref.finalize(array, live.pop, key, None)
        reads.append((self.ref, name))
        peak = max(peak, len(live))
        return torch.from_numpy(array)

    monkeypatch.setattr(Checkpoint, "read", counting_read)
    fam = llama_family
    models = [str(fam["ft0"]), str(fam["ft1"]), str(fam["ft2"])]
    report = inspect_models(models, base=str(fam["base"]))

    assert strays == []
    assert peak <= 1 + len(models)
    names = [t.name for t in report.tensors]
    expected = [(ref, n) for n in names for ref in [str(fam["base"]), *models]]
    assert reads == expected


# -- output files ----------------------------------------------------------------------------


def test_json_has_every_section_and_round_trips(hand_report: InspectReport, tmp_path: Path) -> None:
    path = write_json(hand_report, tmp_path / "sub" / "report.json")
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data == json.loads(json.dumps(data))
    assert set(data) >= {
        "base",
        "models",
        "settings",
        "definitions",
        "groups",
        "per_model",
        "pairs",
        "interference",
        "tensors",
        "skipped_tensors",
    }
    m0 = data["per_model"][0]
    assert set(m0) >= {"whole", "by_layer", "by_kind"}
    assert m0["whole"]["recommended_density"] == 0.2
    assert m0["by_layer"][0]["group"] == "0" and m0["by_layer"][0]["layer"] == 0
    assert set(m0["by_kind"]) == {"attention", "mlp"}
    assert len(data["pairs"]) == 15  # 6 models
    pair = data["pairs"][1]
    assert (pair["a"], pair["b"]) == (0, 2)
    assert pair["whole"]["cosine"] == pytest.approx(-1.0)
    assert pair["by_layer"][0]["sign_conflict_rate"] == 1.0
    assert set(pair) >= {"by_kind", "most_conflicting_layers", "least_aligned_layers"}
    tensor = next(t for t in data["tensors"] if t["name"] == Q)
    assert tensor["name"] == Q and tensor["kind"] == "attention" and tensor["shape"] == [2, 5]
    assert len(tensor["models"]) == 6 and len(tensor["pairs"]) == 15
    assert "recommended_density" in data["definitions"]
    assert "0.9" in data["interference"]["density_rule"]
    assert data["interference"]["recommended_density"][5]["density"] is None


def test_heatmap_is_a_png(llama_family: dict[str, Path], tmp_path: Path) -> None:
    fam = llama_family
    report = inspect_models([fam["ft0"], fam["ft1"], fam["base"]], base=fam["base"])
    path = save_heatmap(report, tmp_path / "heat.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]

    one = inspect_models([fam["ft0"]], base=fam["base"])
    with pytest.raises(RecipeError, match="at least two models"):
        save_heatmap(one, tmp_path / "none.png")


def test_light_imports() -> None:
    """The library needs no transformers; the CLI module imports neither torch nor
    matplotlib until the command runs (``merge run`` must stay light)."""
    code = (
        "import sys\n"
        "import mergekit_lite.cli.inspect_models\n"
        "cli = [m for m in ('torch', 'matplotlib', 'transformers') if m in sys.modules]\n"
        "import mergekit_lite.surgery.inspect\n"
        "lib = [m for m in ('matplotlib', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', cli, lib)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY [] []" in proc.stdout, proc.stdout


# -- command line ----------------------------------------------------------------------------


def _cli(*args: str | Path) -> Any:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("inspect")(inspect_cmd)
    app.command("other")(lambda: None)  # keeps Typer in multi-command mode
    return CliRunner().invoke(app, ["inspect", *(str(a) for a in args)])


def test_cli_prints_tables_and_writes_files(llama_family: dict[str, Path], tmp_path: Path) -> None:
    fam = llama_family
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    result = _cli(
        fam["ft0"], fam["ft1"], "--base", fam["base"], "--json", out_json, "--plot", out_png
    )
    assert result.exit_code == 0, (result.stdout, result.stderr)
    for needle in ("task vectors", "interference", "cosine", "sign conflict", "0 × 1", "0.5"):
        assert needle in result.stdout, needle
    assert f"wrote {out_json}" in result.stdout.replace("\n", "")
    data = json.loads(out_json.read_text())
    assert data["models"] == [str(fam["ft0"]), str(fam["ft1"])]
    assert 0.3 < data["pairs"][0]["whole"]["cosine"] < 0.7
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]


def test_cli_model_identical_to_base(hand: dict[str, Path], tmp_path: Path) -> None:
    out_json = tmp_path / "r.json"
    result = _cli(hand["base"], hand["A"], "--base", hand["base"], "--json", out_json)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "n/a" in result.stdout
    assert json.loads(out_json.read_text())["pairs"][0]["whole"]["cosine"] is None


def _bad_cases(hand: dict[str, Path], tmp: Path) -> dict[str, tuple[list[Any], str]]:
    bad = _save(tmp / "bad", {Q: torch.ones(5, 2), U: torch.ones(2, 5)})
    (tmp / "folder.json").mkdir()
    return {
        "no model": (["--base", hand["base"]], "at least one MODEL"),
        "no base": ([hand["A"]], "--base"),
        "missing path": ([tmp / "nope", "--base", hand["base"]], "does not exist"),
        "missing base": ([hand["A"], "--base", tmp / "nope"], "does not exist"),
        "shapes": ([hand["A"], bad, "--base", hand["base"]], "[5, 2]"),
        "top-k": ([hand["A"], "--base", hand["base"], "--top-k", "0"], "top_k"),
        "plot one model": ([hand["A"], "--base", hand["base"], "--plot", tmp / "p.png"], "--plot"),
        "json is a folder": (
            [hand["A"], "--base", hand["base"], "--json", tmp / "folder.json"],
            "--json",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "no model",
        "no base",
        "missing path",
        "missing base",
        "shapes",
        "top-k",
        "plot one model",
        "json is a folder",
    ],
)
def test_cli_bad_input_is_one_line_exit_2(hand: dict[str, Path], tmp_path: Path, case: str) -> None:
    args, needle = _bad_cases(hand, tmp_path)[case]
    out_json = tmp_path / "out.json"
    result = _cli(*args, *([] if "--json" in args else ["--json", out_json]))
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not out_json.exists() and not (tmp_path / "p.png").exists()
