"""RLHF with PPO (the article's stage 3), with the four models the article lists.

The policy (trainable), a frozen reference (the starting SFT policy), a frozen reward
model and a value model (initialised from the reward model, trainable). Each step:

1. **Rollout.** Sample responses to ``batch_size`` prompts from the policy (temperature,
   ``max_new_tokens``); everything after the first EOS is padding. Score each
   (prompt, response) with the reward model; responses that never emit EOS lose
   ``missing_eos_penalty`` when it is set.
2. **Rewards.** Per response token ``r_t = -beta (log pi(y_t) - log ref(y_t))``, plus the
   score on the last token (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593;
   InstructGPT eq. 2). ``beta`` is ``kl_coef``, optionally adapted towards ``kl_target``
   (Ziegler et al.'s proportional controller).
3. **Advantages.** GAE (Schulman et al. 2016, https://arxiv.org/abs/1506.02438) with
   ``gamma``/``lam`` over the value model's per-token values, whitened over the batch.
4. **Updates.** ``ppo_epochs`` passes over ``num_mini_batches`` mini-batches of the
   rollout: clipped policy loss and clipped value loss (Schulman et al. 2017,
   https://arxiv.org/abs/1707.06347), ``loss = pg + vf_coef * vf``.

The implementation details follow Huang et al., "The N Implementation Details of RLHF with
PPO" (2024, https://arxiv.org/abs/2403.17031). Metrics (TRL's names): ``objective/kl``,
``objective/scores``, ``objective/rlhf_reward``, ``policy/approxkl``,
``policy/clipfrac``, ``loss/policy``, ``loss/value``, ``response_length/mean``.

``train_ppo`` takes an optional ``reward_fn(prompt_ids, response_ids) -> scores`` in place
of the reward model (toy rewards in tests).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mergekit_lite.train.config import PPOConfig
from mergekit_lite.train.data import PromptExample, load_prompts
from mergekit_lite.train.loop import FitResult, _lr_lambda, prepare
from mergekit_lite.train.plots import plot_history
from mergekit_lite.train.rm import rewards as rm_rewards

__all__ = ["train_ppo", "gae", "ppo_losses", "RewardFn"]

RewardFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (B, T) over the masked response tokens.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` (V after the last token is 0) and
    ``A_t = delta_t + gamma lam A_{t+1}``; returns are ``A + V``.
    """
    b, t = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    for i in reversed(range(t)):
        next_v = values[:, i + 1] * mask[:, i + 1] if i + 1 < t else torch.zeros_like(last)
        delta = rewards[:, i] + gamma * next_v - values[:, i]
        last = (delta + gamma * lam * last) * mask[:, i]
        adv[:, i] = last
    return adv, (adv + values) * mask


def _whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def ppo_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Clipped policy and value losses, masked means over response tokens."""
    n = mask.sum().clamp(min=1)
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange))
    pg_loss = (pg * mask).sum() / n
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    vf_loss = (vf * mask).sum() / n
    stats = {
        "policy/approxkl": float(0.5 * (((logp - old_logp).detach() ** 2) * mask).sum() / n),
        "policy/clipfrac": float((((ratio - 1).abs() > cliprange).float() * mask).sum() / n),
    }
    return pg_loss, vf_loss, stats


@dataclass
class _Rollout:
    ids: torch.Tensor  # (B, P + R) prompt (left-padded) + response
    attention: torch.Tensor
    response_mask: torch.Tensor  # (B, R)
    logp: torch.Tensor  # (B, R)
    ref_logp: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # (B,)
    prompt_len: int


def _token_logps(
    model: Any, ids: torch.Tensor, attention: torch.Tensor, p: int, temperature: float
) -> torch.Tensor:
    """log-probs of the response tokens ids[:, p:] under ``model`` (B, R)."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, p - 1 : -1].float()
    logits = logits / temperature
    return torch.gather(logits.log_softmax(-1), 2, ids[:, p:].unsqueeze(-1)).squeeze(-1)


def _token_values(
    value_model: Any, ids: torch.Tensor, attention: torch.Tensor, p: int
) -> torch.Tensor:
    hidden = value_model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
    return value_model.score(hidden).squeeze(-1)[:, p - 1 : -1].float()


def train_ppo(
    config: PPOConfig,
    *,
    reward_fn: RewardFn | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
    stop_at: int | None = None,
) -> FitResult:
    """Run ``max_steps`` PPO iterations in one process; writes the policy (and the value
    model under ``value_model/``) to ``output_dir``. With ``resume`` the run continues
    from the last ``checkpoint-N`` exactly as it would have (sampling and mini-batch
    order are seeded by the step); ``stop_at`` ends it early after a checkpoint."""
    import os

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("PPO runs in a single process; start it without torchrun")
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    ckpt, source, tokenizer = prepare(config, resume=resume)
    pad, eos = int(tokenizer.pad_token_id), tokenizer.eos_token_id
    policy: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    policy.to(device)
    reference: Any = AutoModelForCausalLM.from_pretrained(
        config.reference_model or config.model, dtype=torch.float32
    )
    reference.to(device).eval().requires_grad_(False)
    reward_model: Any = None
    if reward_fn is None:
        reward_model = AutoModelForSequenceClassification.from_pretrained(
            config.reward_model, num_labels=1, dtype=torch.float32
        ).to(device)
        reward_model.eval().requires_grad_(False)
    value_source = ckpt / "value_model" if ckpt else config.value_model or config.reward_model
    value_model = AutoModelForSequenceClassification.from_pretrained(
        value_source, num_labels=1, dtype=torch.float32
    ).to(device)
    prompts: Sequence[PromptExample] = load_prompts(
        config.dataset.train, tokenizer, max_length=config.max_length
    ).examples
    if len(prompts) < config.batch_size:
        raise ValueError(f"{len(prompts)} prompts are fewer than one batch ({config.batch_size})")
    total = config.max_steps or math.ceil((config.epochs or 1) * len(prompts) / config.batch_size)
    params = [p for p in policy.parameters()] + [p for p in value_model.parameters()]
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, betas=config.adam_betas, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total))
    per_epoch = len(prompts) // config.batch_size
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    beta = config.kl_coef
    history: list[dict[str, Any]] = []
    first = 0
    if ckpt is not None:
        saved = torch.load(ckpt / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = json.loads((ckpt / "trainer_state.json").read_text())
        first, beta, history = state["step"], state["kl_coef"], state["history"]
    (output / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    start = time.perf_counter()

    def save(folder: Path, step: int, with_optimizer: bool) -> None:
        policy.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        value_model.save_pretrained(folder / "value_model")
        (folder / "train_config.yaml").write_text(
            yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        )
        state = {"step": step, "total_steps": total, "kl_coef": beta, "history": history}
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        if with_optimizer:
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                folder / "optimizer.pt",
            )

    def batch_prompts(step: int) -> list[list[int]]:
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(
            len(prompts), generator=torch.Generator().manual_seed(config.seed + epoch)
        )
        return [
            prompts[i].prompt for i in order[k * config.batch_size : (k + 1) * config.batch_size]
        ]

    for step in range(first, total):
        ro = _rollout(
            batch_prompts(step), policy, reference, reward_model, value_model, reward_fn,
            config, pad, eos, device, seed=config.seed * 100003 + step,
        )  # fmt: skip
        mask = ro.response_mask
        kl_tokens = (ro.logp - ro.ref_logp) * mask
        token_rewards = -beta * kl_tokens
        last = (mask.sum(-1) - 1).clamp(min=0)
        token_rewards[torch.arange(mask.shape[0]), last] += ro.scores
        adv, returns = gae(token_rewards, ro.values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            adv = _whiten(adv, mask)
        stats: dict[str, float] = {}
        pg_sum = vf_sum = 0.0
        updates = 0
        policy.train()
        value_model.train()
        for _ in range(config.ppo_epochs):
            order = torch.randperm(mask.shape[0], generator=torch.Generator().manual_seed(step))
            for chunk in order.chunk(config.num_mini_batches):
                ids, att = ro.ids[chunk], ro.attention[chunk]
                logp = _token_logps(policy, ids, att, ro.prompt_len, config.temperature)
                values = _token_values(value_model, ids, att, ro.prompt_len)
                pg, vf, s = ppo_losses(
                    logp, ro.logp[chunk], adv[chunk], values, ro.values[chunk], returns[chunk],
                    mask[chunk], cliprange=config.cliprange, cliprange_value=config.cliprange_value,
                )  # fmt: skip
                (pg + config.vf_coef * vf).backward()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                pg_sum, vf_sum, updates = pg_sum + float(pg), vf_sum + float(vf), updates + 1
                for k, v in s.items():
                    stats[k] = stats.get(k, 0.0) + v
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        kl = float(kl_tokens.sum(-1).mean())
        score = float(ro.scores.mean())
        if config.adaptive_kl:  # Ziegler et al. 2019, proportional control towards kl_target
            error = max(-0.2, min(0.2, kl / config.kl_target - 1))
            beta *= 1 + error * config.batch_size / config.kl_horizon
        entry: dict[str, Any] = {
            "step": step + 1,
            "loss": (pg_sum + config.vf_coef * vf_sum) / updates,
            "lr": lr,
            "tokens": int(mask.sum()),
            "objective/kl": kl,
            "objective/scores": score,
            "objective/rlhf_reward": score - beta * kl,
            "loss/policy": pg_sum / updates,
            "loss/value": vf_sum / updates,
            "response_length/mean": float(mask.sum(-1).float().mean()),
            "kl_coef": beta,
            "seconds": round(time.perf_counter() - start, 3),
            **{k: v / updates for k, v in stats.items()},
        }
        history.append(entry)
        with (output / "log.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        if on_log is not None:
            on_log(entry)
        done = step + 1
        if (config.save_steps and done % config.save_steps == 0) or done == stop_at:
            save(output / f"checkpoint-{done}", done, with_optimizer=True)
        if done == stop_at:
            return FitResult(output, done, history)

    save(output, total, with_optimizer=False)
    plot_history(history, output / "loss.png", keys=("objective/scores", "objective/kl"))
    return FitResult(output, total, history)


@torch.no_grad()
def _rollout(
    prompts: list[list[int]],
    policy: Any,
    reference: Any,
    reward_model: Any,
    value_model: Any,
    reward_fn: RewardFn | None,
    config: PPOConfig,
    pad: int,
    eos: int | None,
    device: torch.device,
    *,
    seed: int,
) -> _Rollout:
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, x in enumerate(prompts):  # left padding: generation continues every row at p
        ids[i, p - len(x) :] = torch.tensor(x)
        att[i, p - len(x) :] = 1
    ids, att = ids.to(device), att.to(device)
    policy.eval()
    torch.manual_seed(seed)
    out = policy.generate(
        input_ids=ids, attention_mask=att, do_sample=True, temperature=config.temperature,
        top_k=0, top_p=1.0, max_new_tokens=config.max_new_tokens, pad_token_id=pad,
    )  # fmt: skip
    response = out[:, p:]
    # everything after the first EOS is padding; the EOS itself is part of the response
    is_eos = response == eos if eos is not None else torch.zeros_like(response, dtype=torch.bool)
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = (~after).long()
    response = torch.where(mask.bool(), response, pad)
    full = torch.cat([ids, response], dim=1)
    full_att = torch.cat([att, mask], dim=1)
    logp = _token_logps(policy, full, full_att, p, config.temperature) * mask
    ref_logp = _token_logps(reference, full, full_att, p, config.temperature) * mask
    values = _token_values(value_model, full, full_att, p) * mask
    if reward_fn is not None:
        responses = [r[m.bool()].tolist() for r, m in zip(response, mask, strict=True)]
        scores = reward_fn(prompts, responses).to(device).float()
    else:  # the reward model reads its score at the last real token
        scores = rm_rewards(reward_model, full, full_att)
    if config.missing_eos_penalty is not None:
        scores = scores - config.missing_eos_penalty * (~is_eos.any(-1)).float()
    return _Rollout(full, full_att, mask, logp, ref_logp, values, scores, p)
