"""``merge``: the mergekit-lite command line."""

from __future__ import annotations

import typer

from mergekit_lite.cli import convert as convert_cmd
from mergekit_lite.cli import demo as demo_cmd
from mergekit_lite.cli import inspect_models as inspect_cmd
from mergekit_lite.cli import lora as lora_cmd
from mergekit_lite.cli import run as run_cmd
from mergekit_lite.cli import train as train_cmd

app = typer.Typer(
    name="merge",
    help="Merge, inspect and post-train language model checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("run")(run_cmd.run)
app.command("inspect")(inspect_cmd.inspect)
app.command("convert")(convert_cmd.convert)
app.command("extract-lora")(lora_cmd.extract_lora)
app.command("apply-lora")(lora_cmd.apply_lora)
app.command("demo")(demo_cmd.demo)
app.add_typer(train_cmd.app, name="train")


@app.callback()
def _root() -> None:
    """Merge, inspect and post-train language model checkpoints."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
