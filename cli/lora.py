"""``merge extract-lora`` and ``merge apply-lora``: fine-tunes <-> PEFT LoRA adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_lite.cli._common import (
    AllowPickle,
    Overwrite,
    Verbose,
    err,
    out,
    setup_logging,
    user_errors,
)


def extract_lora(
    model: Annotated[str, typer.Option("--model", help="The fine-tuned model.")],
    base: Annotated[str, typer.Option("--base", help="The model it was fine-tuned from.")],
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank r.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Adapter folder to write.")],
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
    verbose: Verbose = False,
) -> None:
    """Extract a rank-r PEFT LoRA adapter from MODEL - BASE (truncated SVD per module)."""
    setup_logging(verbose)
    with user_errors(verbose):
        from mergekit_lite.surgery.lora import extract_lora as run_extract

        with err.status("extracting ..."):
            result = run_extract(
                model, base, output, rank=rank, overwrite=overwrite, allow_pickle=allow_pickle
            )
        worst, worst_energy = result.min_energy
        out.print(
            f"{result.output}: rank-{rank} LoRA of {len(result.energy)} modules "
            f"({', '.join(result.target_modules)}); retained energy mean "
            f"{result.mean_energy:.4f}, lowest {worst_energy:.4f} ({worst}); "
            "per module in extraction.json",
            soft_wrap=True,
            highlight=False,
        )


def apply_lora(
    base: Annotated[str, typer.Argument(help="The base model.")],
    adapter: Annotated[str, typer.Argument(help="A PEFT LoRA adapter folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output model folder.")],
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="float32, float16 or bfloat16.")
    ] = None,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
) -> None:
    """Fold ADAPTER into BASE and write full weights."""
    setup_logging(verbose)
    with user_errors(verbose):
        from mergekit_lite.surgery.lora import apply_lora as run_apply

        result = run_apply(base, adapter, output, dtype=dtype, overwrite=overwrite)
        out.print(
            f"{result.output}: {result.tensors} tensors, "
            f"{result.bytes_written / 1e9:.3f} GB written",
            soft_wrap=True,
            highlight=False,
        )
