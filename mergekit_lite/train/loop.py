"""The one training loop every trainer runs.

A trainer supplies batches and a ``loss_fn(model, batch) -> (loss_sum, n_targets,
metrics)`` that returns the *sum* of its per-target losses; the loop does the rest:

* AdamW, linear warmup then cosine / linear decay (or constant);
* gradient accumulation where each micro-batch's summed loss is divided by the number
  of targets in the whole accumulated (and, under ``torchrun``, global) batch, so the
  update does not depend on how a batch is split into micro-batches or processes;
* gradient clipping, float32 or bfloat16 autocast, periodic evaluation;
* determinism: the data order of epoch ``e`` is a permutation seeded by ``seed + e``, and
  the position in the data follows from the step, so ``resume`` from a checkpoint
  continues exactly as an uninterrupted run would;
* ``torchrun --nproc_per_node N``: DistributedDataParallel (gloo on CPU, nccl on GPU),
  each global micro-batch split across ranks, only rank 0 writing;
* one JSON object per logged step in ``log.jsonl``; checkpoints are Hugging Face
  folders plus ``train_config.yaml``, ``trainer_state.json`` and ``optimizer.pt``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mergekit_lite.train.config import TrainConfig
from mergekit_lite.train.plots import plot_history

__all__ = ["fit", "FitResult", "Dist", "LossFn", "latest_checkpoint", "prepare", "load_splits"]

log = logging.getLogger(__name__)

LossFn = Callable[
    [torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int, dict[str, float]]
]
Collate = Callable[[Sequence[Any]], dict[str, torch.Tensor]]


@dataclass
class Dist:
    """This process's place in a ``torchrun`` job (1 process without one)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def setup(cls, device: str) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(rank=dist.get_rank(), world=world)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())


@dataclass
class FitResult:
    output_dir: Path
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


def _lr_lambda(config: TrainConfig, total: int) -> Callable[[int], float]:
    warm = config.warmup_steps

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.lr_scheduler == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if config.lr_scheduler == "linear":
            return max(0.0, 1 - progress)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def prepare(config: TrainConfig, *, resume: bool) -> tuple[Path | None, str, Any]:
    """What every trainer starts with: the checkpoint to resume from (if asked and
    present), the folder to load the model from, and its tokenizer (with a pad token)."""
    from transformers import AutoTokenizer

    ckpt = latest_checkpoint(Path(config.output_dir)) if resume else None
    source = str(ckpt) if ckpt is not None else config.model
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ckpt, source, tokenizer


def load_splits(
    load: Callable[..., Any], config: TrainConfig, tokenizer: Any
) -> tuple[list[Any], list[Any] | None]:
    """The train examples and, if configured, the eval examples, through a data loader."""
    train = load(config.dataset.train, tokenizer, max_length=config.max_length).examples
    evaluate = (
        load(config.dataset.eval, tokenizer, max_length=config.max_length).examples
        if config.dataset.eval
        else None
    )
    return train, evaluate


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def _save(
    folder: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    config: TrainConfig,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # type: ignore[operator]
    tokenizer.save_pretrained(folder)
    (folder / "train_config.yaml").write_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    )
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    if optimizer is not None:
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            },
            folder / "optimizer.pt",
        )


def fit(
    model: torch.nn.Module,
    tokenizer: Any,
    config: TrainConfig,
    *,
    train: Sequence[Any],
    evaluate: Sequence[Any] | None,
    collate: Collate,
    loss_fn: LossFn,
    eval_collate: Collate | None = None,
    resume_from: Path | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    stop_at: int | None = None,
) -> FitResult:
    """Train ``model`` on ``train``; see the module docstring. ``stop_at`` ends the run
    early after saving a checkpoint (how tests interrupt a run)."""
    dist = Dist.setup(config.device)
    device = torch.device(config.device)
    output = Path(config.output_dir)
    model.to(device)
    module = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    micro = config.batch_size * dist.world  # examples per global micro-batch
    per_epoch = len(train) // micro
    if per_epoch == 0:
        raise ValueError(f"{len(train)} examples are fewer than one global batch ({micro})")
    accum = config.gradient_accumulation_steps
    total = config.max_steps or math.ceil((config.epochs or 1) * per_epoch / accum)

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, betas=config.adam_betas, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total))
    torch.manual_seed(config.seed)
    step, tokens = 0, 0.0
    history: list[dict[str, Any]] = []
    if resume_from is not None:
        saved = torch.load(resume_from / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state = json.loads((resume_from / "trainer_state.json").read_text())
        step, tokens = state["step"], state["tokens"]
        history = [h for h in state.get("history", []) if h["step"] <= step]
    if dist.main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

    def micro_batch(index: int) -> list[Any]:
        """The examples of global micro-batch ``index`` that this rank takes."""
        epoch, k = divmod(index, per_epoch)
        order = torch.randperm(
            len(train), generator=torch.Generator().manual_seed(config.seed + epoch)
        )
        ids = order[k * micro : (k + 1) * micro].tolist()
        mine = ids[dist.rank * config.batch_size : (dist.rank + 1) * config.batch_size]
        return [train[i] for i in mine]

    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bfloat16")
    start = time.perf_counter()
    model.train()
    while step < total:
        batches = [collate(micro_batch(step * accum + j)) for j in range(accum)]
        global_targets = dist.sum(float(sum(_targets(b) for b in batches)))
        loss_total = 0.0
        metrics_sum: dict[str, float] = {}
        for j, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            sync = j == accum - 1 or dist.world == 1
            no_sync = getattr(model, "no_sync", None)
            ctx = no_sync() if not sync and callable(no_sync) else _null()
            with ctx, amp:
                loss_sum, n, metrics = loss_fn(model, batch)
                # DDP averages gradients over ranks: scale back to a sum over all targets
                (loss_sum * dist.world / max(global_targets, 1.0)).backward()
            loss_total += float(loss_sum.detach())
            for k, v in metrics.items():
                metrics_sum[k] = metrics_sum.get(k, 0.0) + v * n
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += global_targets
        if step % config.logging_steps == 0 or step == total:
            entry: dict[str, Any] = {
                "step": step,
                "loss": dist.sum(loss_total) / max(global_targets, 1.0),
                "lr": lr,
                "tokens": int(tokens),
                "seconds": round(time.perf_counter() - start, 3),
            }
            for k, v in metrics_sum.items():
                entry[k] = dist.sum(v) / max(global_targets, 1.0)
            if evaluate and config.eval_steps and (step % config.eval_steps == 0 or step == total):
                entry["eval_loss"] = _evaluate(
                    model, evaluate, eval_collate or collate, loss_fn, config, device
                )
                model.train()
            history.append(entry)
            if dist.main:
                with (output / "log.jsonl").open("a") as f:
                    f.write(json.dumps(entry) + "\n")
            if on_log is not None:
                on_log(entry)
        state = {"step": step, "tokens": tokens, "total_steps": total, "history": history}
        if dist.main and ((config.save_steps and step % config.save_steps == 0) or step == stop_at):
            _save(
                output / f"checkpoint-{step}",
                module,
                tokenizer,
                config,
                state,
                optimizer,
                scheduler,
            )
        if step == stop_at:
            return FitResult(output, step, history)
    if dist.main:
        final = {"step": step, "tokens": tokens, "total_steps": total, "history": history}
        _save(output, module, tokenizer, config, final)
        plot_history(history, output / "loss.png")
    return FitResult(output, step, history)


def _evaluate(
    model: torch.nn.Module,
    data: Sequence[Any],
    collate: Collate,
    loss_fn: LossFn,
    config: TrainConfig,
    device: torch.device,
) -> float:
    model.eval()
    total, n_total = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), config.batch_size):
            batch = {k: v.to(device) for k, v in collate(data[i : i + config.batch_size]).items()}
            loss_sum, n, _ = loss_fn(model, batch)
            total += float(loss_sum)
            n_total += n
    return total / max(n_total, 1)


def _targets(batch: dict[str, torch.Tensor]) -> int:
    """How many targets a batch's loss sums over: ``n_targets`` if the collate says,
    else the labelled tokens, else the examples."""
    if "n_targets" in batch:
        return int(batch["n_targets"])
    if "labels" in batch:
        return int((batch["labels"] != -100).sum())
    return int(next(iter(batch.values())).shape[0])


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
