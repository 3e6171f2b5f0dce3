"""``merge run RECIPE.yaml -o OUT``: merge checkpoints as a recipe says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from mergekit_lite.cli._common import (
    AllowPickle,
    Device,
    MaxShardSize,
    Overwrite,
    Verbose,
    err,
    out,
    parse_size,
    setup_logging,
    user_errors,
)


def run(
    recipe: Annotated[Path, typer.Argument(help="Merge recipe (mergekit-compatible YAML).")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output folder (default: the recipe's 'output')."),
    ] = None,
    overwrite: Overwrite = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan and the bytes to move; read no weights."),
    ] = False,
    device: Device = "cpu",
    max_shard_size: MaxShardSize = "5GB",
    allow_pickle: AllowPickle = False,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed for DARE/DELLA (overrides the recipe).")
    ] = None,
    out_dtype: Annotated[
        str | None,
        typer.Option("--out-dtype", help="Output dtype (overrides the recipe's out_dtype)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable output (plan or summary).")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Merge checkpoints as RECIPE says and write a Hugging Face model folder."""
    setup_logging(verbose)
    with user_errors(verbose):
        from mergekit_lite.engine import run_merge
        from mergekit_lite.errors import RecipeError
        from mergekit_lite.io.output import check_output_path
        from mergekit_lite.plan import build_plan, describe
        from mergekit_lite.recipe import load_recipe

        overrides: dict[str, Any] = {"seed": seed, "out_dtype": out_dtype}
        parsed = load_recipe(recipe, overrides=overrides)
        target = output or (Path(parsed.output) if parsed.output else None)
        if target is None and not dry_run:
            raise RecipeError(str(recipe), "no output folder: pass -o OUT or set 'output:'")
        if target is not None and not dry_run:
            check_output_path(target, overwrite=overwrite)
        shard_bytes = parse_size(max_shard_size)
        plan = build_plan(parsed, source=str(recipe), allow_pickle=allow_pickle)

        if dry_run:
            _print_plan(plan, describe(plan), as_json)
            return

        assert target is not None
        with Progress(
            TextColumn("[bold]merging[/] {task.fields[tensors]} tensors"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        ) as bar:
            n_tasks = len(plan.tasks)
            job = bar.add_task("merge", total=plan.bytes_to_read, tensors=f"0/{n_tasks}")

            def progress(done: int, total: int, bytes_read: int) -> None:
                bar.update(job, completed=bytes_read, tensors=f"{done}/{total}")

            result = run_merge(
                parsed,
                target,
                overwrite=overwrite,
                device=device,
                max_shard_size=shard_bytes,
                allow_pickle=allow_pickle,
                progress=progress,
                source=str(recipe),
                recipe_text=recipe.read_text(),
                plan=plan,
            )
        s = result.stats
        if as_json:
            out.print_json(
                json.dumps(
                    {
                        "output": str(result.output),
                        "tensors": s.tensors,
                        "bytes_read": s.bytes_read,
                        "bytes_written": s.bytes_written,
                        "seconds": s.seconds,
                        "gb_per_s": s.gb_per_s,
                        "peak_rss_bytes": s.peak_rss_bytes,
                        "files": result.files,
                    }
                )
            )
        else:
            out.print(f"{result.output}: {s.summary()}", soft_wrap=True, highlight=False)


def _print_plan(plan: Any, rows: list[dict[str, Any]], as_json: bool) -> None:
    totals = {
        "method": plan.method.name,
        "tensors": len(rows),
        "layers": plan.num_layers,
        "bytes_to_read": plan.bytes_to_read,
        "bytes_to_write": plan.bytes_to_write,
    }
    if as_json:
        out.print_json(json.dumps({**totals, "tasks": rows}, default=str))
        return
    table = Table(title=f"merge plan: {plan.method.name} ({plan.method.paper})")
    for col in ("tensor", "shape", "dtype", "inputs", "parameters"):
        table.add_column(col, overflow="fold")
    for r in rows:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in r["params"].items())
        inputs = "\n".join(r["inputs"])
        table.add_row(r["tensor"], str(r["shape"]), r["dtype"], inputs, params)
    out.print(table)
    out.print(
        f"{totals['tensors']} tensors, {totals['layers']} layers; would read "
        f"{totals['bytes_to_read'] / 1e9:.3f} GB and write {totals['bytes_to_write'] / 1e9:.3f} GB",
        soft_wrap=True,
        highlight=False,
    )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join("-" if x is None else _fmt(x) for x in v) + "]"
    return str(v)
