"""``merge inspect MODEL... --base BASE``: task-vector diagnostics before a merge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mergekit_lite.cli._common import AllowPickle, Verbose, err, out, setup_logging, user_errors


def inspect(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            help="Models to compare with the base (folders or Hub ids).",
            show_default=False,
            metavar="MODEL",
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option("--base", "-b", help="The model task vectors are measured from (required)."),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Write every number (per tensor, layer, kind, pair) here."),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Write a PNG heatmap: layers x pairs, cosine and sign conflict."
        ),
    ] = None,
    top_k: Annotated[
        float, typer.Option("--top-k", help="Fraction of largest |delta| entries for the overlap.")
    ] = 0.2,
    eps: Annotated[
        float, typer.Option("--eps", help="|delta| <= eps counts as zero (near-zero, signs).")
    ] = 1e-6,
    allow_pickle: AllowPickle = False,
    verbose: Verbose = False,
) -> None:
    """How far each MODEL moved from BASE, and how their task vectors interfere.

    Per model: the task vector's norm, relative to the base, unchanged entries, a density.
    Per pair: cosine, sign-conflict rate, top-k overlap, the most conflicting layers.
    """
    setup_logging(verbose)
    with user_errors(verbose):
        from mergekit_lite.errors import RecipeError
        from mergekit_lite.surgery.inspect import inspect_models, save_heatmap, write_json

        if not models:
            raise RecipeError(None, "give at least one MODEL to compare with --base BASE")
        if base is None:
            raise RecipeError(
                "--base", "the base model is required (task vectors are model - base)"
            )
        if plot is not None and len(models) < 2:
            raise RecipeError("--plot", "the heatmap shows model pairs: give at least two models")
        for opt, path in (("--json", json_path), ("--plot", plot)):
            if path is not None and path.is_dir():
                raise RecipeError(opt, f"{path} is a folder, not a file name")

        with Progress(
            TextColumn("[bold]inspecting[/] {task.fields[tensors]} tensors"),
            BarColumn(),
            TextColumn("{task.fields[gb]} GB read"),
            TimeRemainingColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,  # a finished bar leaves an empty line elsewhere
        ) as bar:
            job = bar.add_task("inspect", total=None, tensors="0/?", gb="0.00")

            def progress(done: int, total: int, bytes_read: int) -> None:
                gb = f"{bytes_read / 1e9:.2f}"
                bar.update(job, completed=done, total=total, tensors=f"{done}/{total}", gb=gb)

            report = inspect_models(
                models,
                base=base,
                top_k=top_k,
                eps=eps,
                allow_pickle=allow_pickle,
                progress=progress,
            )
        _print_report(report)
        if json_path is not None:
            write_json(report, json_path)
            out.print(f"wrote {json_path}", soft_wrap=True, highlight=False)
        if plot is not None:
            save_heatmap(report, plot)
            out.print(f"wrote {plot}", soft_wrap=True, highlight=False)


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _layer(g: str) -> str:
    return f"L{g}" if g.isdigit() else g


def _print_report(report: Any) -> None:
    models = Table(title=f"task vectors (model - {report.base})", title_justify="left")
    models.add_column("#", justify="right")
    models.add_column("model", overflow="fold")
    models.add_column("‖Δ‖", justify="right")
    models.add_column("‖Δ‖/‖base‖", justify="right")
    models.add_column("near-zero", justify="right")
    models.add_column("density", justify="right")
    for i, ref in enumerate(report.models):
        s = report.model_total(i)
        models.add_row(
            str(i),
            ref,
            _num(s.delta_norm),
            _num(s.relative_norm, ".3g"),
            _pct(s.near_zero_fraction),
            _num(s.recommended_density, ".1f"),
        )
    models.caption = (
        f"near-zero: |Δ| <= {report.eps:g}; density: smallest TIES/DARE density keeping "
        f">= 90% of ‖Δ‖² (a starting point)"
    )
    out.print(models)
    if not report.pairs:
        return
    pairs = Table(title="interference between task vectors", title_justify="left")
    pairs.add_column("pair", overflow="fold")
    pairs.add_column("cosine", justify="right")
    pairs.add_column("sign conflict", justify="right")
    pairs.add_column(f"top-{100 * report.top_k:g}% overlap", justify="right")
    pairs.add_column("most conflicting layers", overflow="fold")
    pairs.add_column("least aligned layers", overflow="fold")
    for p, (a, b) in enumerate(report.pairs):
        s = report.pair_total(p)
        conflicting = ", ".join(
            f"{_layer(g)} {_pct(r)}" for g, r in report.most_conflicting_layers(p)
        )
        aligned = ", ".join(f"{_layer(g)} {c:.2f}" for g, c in report.least_aligned_layers(p))
        pairs.add_row(
            f"{a} × {b}",
            _num(s.cosine, ".3f"),
            _pct(s.sign_conflict_rate),
            _pct(s.topk_overlap),
            conflicting or "-",
            aligned or "-",
        )
    chance = f"{100 * report.top_k:g}%"
    pairs.caption = f"unrelated task vectors: cosine ≈ 0, sign conflict ≈ 50%, overlap ≈ {chance}"
    out.print(pairs)
