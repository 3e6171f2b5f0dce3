"""What every command shares: option aliases, the error boundary, consoles."""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console

from mergekit_lite.errors import MergekitLiteError

out = Console()
err = Console(stderr=True)

Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug logging.")
]
Device = Annotated[
    str, typer.Option("--device", help="Where the math runs: cpu, cuda, cuda:1, ...")
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle", help="Read legacy .bin checkpoints (torch.load, weights_only=True)."
    ),
]
MaxShardSize = Annotated[
    str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB, 2GiB.")
]


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so temporary output folders are removed
    raise KeyboardInterrupt


@contextmanager
def user_errors(verbose: bool) -> Iterator[None]:
    """The one place that turns library errors into one stderr line and exit status 2."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except MergekitLiteError as e:
        if verbose:
            traceback.print_exc(file=sys.stderr)
        sys.stderr.write(f"error: {e}\n")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; nothing was written to the output path\n")
        raise typer.Exit(130) from None


def parse_size(text: str) -> int:
    """``5GB`` -> 5_000_000_000, ``2GiB`` -> 2 * 2**30, ``1000`` -> 1000 (bytes)."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise MergekitLiteError(
            "--max-shard-size", f"{text!r} is not a size like 5GB, 500MB, 2GiB or 1000000"
        )
    return int(value * units[unit])


def setup_logging(verbose: bool) -> None:
    import logging

    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
        force=True,
    )
