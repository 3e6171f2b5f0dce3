"""``merge convert SRC -o OUT``: GGUF, legacy pickles and dtypes to safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_lite.cli._common import (
    AllowPickle,
    MaxShardSize,
    Overwrite,
    Verbose,
    err,
    out,
    parse_size,
    setup_logging,
    user_errors,
)


def convert(
    src: Annotated[
        str, typer.Argument(help="A .gguf file, or a model folder / Hub id (safetensors or .bin).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output model folder.")],
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="Cast floating-point weights: float32, float16, bfloat16."),
    ] = None,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
    max_shard_size: MaxShardSize = "5GB",
    verbose: Verbose = False,
) -> None:
    """Convert a GGUF file or a checkpoint folder into a safetensors model folder."""
    setup_logging(verbose)
    with user_errors(verbose):
        from mergekit_lite.surgery.convert import convert as run_convert

        with err.status(f"converting {src} ..."):
            result = run_convert(
                src,
                output,
                dtype=dtype,
                overwrite=overwrite,
                allow_pickle=allow_pickle,
                max_shard_size=parse_size(max_shard_size),
            )
        out.print(
            f"{result.output}: {result.tensors} tensors from {result.source_format}, "
            f"{result.bytes_written / 1e9:.3f} GB written",
            soft_wrap=True,
            highlight=False,
        )
        if result.overflowed_values:
            err.print(
                f"warning: {result.overflowed_values} values in "
                f"{len(result.overflowed_tensors)} tensors overflowed float16 and became inf "
                f"(first: {result.overflowed_tensors[0]})",
                soft_wrap=True,
                highlight=False,
            )
