"""``merge train sft CONFIG.yaml [--key value ...]``: post-training runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mergekit_lite.cli._common import Verbose, err, out, setup_logging, user_errors

app = typer.Typer(help="Train the checkpoints that merges combine.", no_args_is_help=True)

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


Config = Annotated[Path, typer.Argument(help="Training config (YAML).")]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue from the last checkpoint in output_dir.")
]


#: one command per trainer: its one-line help, and an override example
_COMMANDS = {
    "sft": (
        "Supervised fine-tuning: cross-entropy on completion tokens.",
        "--learning_rate 1e-4 --dataset.train data.jsonl",
    ),
    "rm": (
        "Reward model: Bradley-Terry loss on (prompt, chosen, rejected) pairs.",
        "--learning_rate 1e-4 --dataset.train pairs.jsonl",
    ),
    "dpo": (
        "Preference optimisation: DPO, IPO, hinge, robust, ORPO, SimPO or KTO (loss_type).",
        "--beta 0.05 --loss_type ipo",
    ),
    "ppo": (
        "RLHF with PPO: policy, frozen reference, frozen reward model, value model.",
        "--kl_coef 0.1 --max_new_tokens 64",
    ),
}


def _command(kind: str, summary: str, example: str) -> Callable[..., None]:
    def command(
        ctx: typer.Context, config: Config, resume: Resume = False, verbose: Verbose = False
    ) -> None:
        _run(kind, ctx, config, resume, verbose)

    command.__doc__ = f"{summary}\n\nAny config key can be overridden: {example}"
    return command


for _kind, (_summary, _example) in _COMMANDS.items():
    app.command(_kind, context_settings=_EXTRA)(_command(_kind, _summary, _example))


def _run(kind: str, ctx: typer.Context, config: Path, resume: bool, verbose: bool) -> None:
    setup_logging(verbose)
    with user_errors(verbose):
        from mergekit_lite.train.config import (
            DPOConfig,
            PPOConfig,
            RMConfig,
            SFTConfig,
            load_train_config,
            parse_overrides,
        )
        from mergekit_lite.train.dpo import train_dpo
        from mergekit_lite.train.loop import Dist
        from mergekit_lite.train.ppo import train_ppo
        from mergekit_lite.train.rm import train_rm
        from mergekit_lite.train.sft import train_sft

        trainers: dict[str, tuple[type[Any], Any]] = {
            "sft": (SFTConfig, train_sft),
            "rm": (RMConfig, train_rm),
            "dpo": (DPOConfig, train_dpo),
            "ppo": (PPOConfig, train_ppo),
        }
        cls, trainer = trainers[kind]
        cfg = load_train_config(cls, config, parse_overrides(list(ctx.args)))
        main = Dist.setup(cfg.device).main
        with Progress(
            TextColumn(f"[bold]{kind}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=err,
            transient=True,
            disable=not main,
        ) as bar:
            job = bar.add_task(kind, total=cfg.max_steps, loss="-")

            def on_log(entry: dict[str, Any]) -> None:
                bar.update(job, completed=entry["step"], loss=f"{entry['loss']:.4f}")

            result = trainer(cfg, resume=resume, on_log=on_log)
        if main:
            last = result.history[-1] if result.history else {}
            out.print(
                f"{result.output_dir}: {result.steps} steps, final loss "
                f"{last.get('loss', float('nan')):.4f}, log in log.jsonl, curve in loss.png",
                soft_wrap=True,
                highlight=False,
            )
