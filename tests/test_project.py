"""Project-level promises: documented methods, light imports, packaging."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import write_recipe

from mergekit_lite.methods.base import Scope
from mergekit_lite.methods.registry import METHODS

ROOT = Path(__file__).parent.parent


def test_readme_documents_exactly_the_registered_methods() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Methods", 1)[1].split("\n\n", 3)[2]
    documented = set(
        re.findall(r"`([a-z_]+)`", "\n".join(r.split("|")[1] for r in table.splitlines()[2:]))
    )
    assert documented == set(METHODS)


def test_signatures_are_the_schema() -> None:
    linear = {p.name: p for p in METHODS["linear"].params}
    assert linear["weight"].scope is Scope.PER_MODEL and linear["weight"].required
    assert linear["normalize"].scope is Scope.SHARED and linear["normalize"].default is True
    scale = METHODS["passthrough"].params[0]
    assert (scale.name, scale.scope, scale.nullable) == ("scale", Scope.PER_MODEL, True)
    ties = {p.name: p for p in METHODS["ties"].params}
    assert ties["lambda"].arg == "lambda_"  # Python keyword mapped to its YAML name
    assert ties["election"].choices == ("weighted", "unweighted", "count")
    assert str(ties["density"].range) == "(0, 1]"


def test_merge_run_does_not_import_heavy_libraries(
    qwen_family: dict[str, Path], tmp_path: Path
) -> None:
    """A merge pays for torch, not for transformers, lm-eval or optuna."""
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "linear",
            "models": [
                {"model": str(qwen_family["ft0"]), "parameters": {"weight": 1.0}},
                {"model": str(qwen_family["ft1"]), "parameters": {"weight": 1.0}},
            ],
        },
    )
    code = (
        "import sys\n"
        "from mergekit_lite.cli.main import app\n"
        f"try:\n    app(['run', {str(recipe)!r}, '-o', {str(tmp_path / 'out')!r}])\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('transformers', 'lm_eval', 'optuna', 'datasets', 'matplotlib')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_is_packaged_under_the_distribution() -> None:
    """The front end is mergekit_lite.cli, never a top-level `cli` package."""
    import mergekit_lite.cli.main as main

    assert Path(main.__file__).resolve().parent == (ROOT / "cli").resolve()
    text = (ROOT / "pyproject.toml").read_text()
    assert '"mergekit_lite.cli" = "cli"' in text
    assert 'merge = "mergekit_lite.cli.main:main"' in text
