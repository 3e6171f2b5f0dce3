"""Training configs: immutable pydantic models, YAML file < command-line overrides.

Every trainer shares :class:`TrainConfig`; each adds its own keys in a subclass. Unknown
keys are errors that name the key. The fully resolved config is written into every
checkpoint as ``train_config.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergekit_lite.errors import RecipeError

__all__ = [
    "DatasetFiles",
    "TrainConfig",
    "SFTConfig",
    "RMConfig",
    "DPOConfig",
    "PPOConfig",
    "load_train_config",
    "parse_overrides",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetFiles(_Frozen):
    train: str
    eval: str | None = None


class TrainConfig(_Frozen):
    """Keys every trainer understands."""

    model: str
    dataset: DatasetFiles
    output_dir: str
    max_steps: int | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    learning_rate: float = Field(default=1e-5, gt=0)
    batch_size: int = Field(default=8, gt=0)  # per process, per micro-step
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    max_length: int = Field(default=512, gt=1)
    seed: int = 0
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    precision: Literal["float32", "bfloat16"] = "float32"
    logging_steps: int = Field(default=1, gt=0)
    eval_steps: int | None = Field(default=None, gt=0)
    save_steps: int | None = Field(default=None, gt=0)
    device: str = "cpu"

    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of max_steps or epochs")
        return self


class SFTConfig(TrainConfig):
    """Supervised fine-tuning: cross-entropy on completion tokens."""

    packing: bool = False  # several examples per row, isolated by position ids and mask


class RMConfig(TrainConfig):
    """Reward model: Bradley-Terry on (chosen, rejected) pairs."""

    center_rewards_coefficient: float = Field(default=0.0, ge=0)


class DPOConfig(TrainConfig):
    """The preference-optimisation family (see :mod:`mergekit_lite.train.losses`)."""

    loss_type: Literal["sigmoid", "robust", "hinge", "ipo", "orpo", "simpo", "kto"] = "sigmoid"
    beta: float = Field(default=0.1, gt=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    gamma: float = 0.5  # SimPO's target reward margin
    reference_model: str | None = None  # default: the starting policy (``model``)
    precompute_ref_logprobs: bool = False  # reference log-probs once, before training
    desirable_weight: float = Field(default=1.0, gt=0)  # KTO
    undesirable_weight: float = Field(default=1.0, gt=0)  # KTO

    @model_validator(mode="after")
    def _kto_reference(self) -> DPOConfig:
        if self.loss_type == "kto" and self.precompute_ref_logprobs:
            raise ValueError(
                "precompute_ref_logprobs does not apply to kto: its KL pairs are formed per batch"
            )
        return self


class PPOConfig(TrainConfig):
    """RLHF with PPO: ``max_steps`` rollouts of ``batch_size`` prompts each."""

    reward_model: str
    reference_model: str | None = None  # default: the starting policy
    value_model: str | None = None  # default: the reward model
    kl_coef: float = Field(default=0.05, ge=0)  # beta
    adaptive_kl: bool = False
    kl_target: float = Field(default=6.0, gt=0)
    kl_horizon: int = Field(default=10000, gt=0)
    max_new_tokens: int = Field(default=32, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    missing_eos_penalty: float | None = None
    ppo_epochs: int = Field(default=4, gt=0)
    num_mini_batches: int = Field(default=1, gt=0)
    cliprange: float = Field(default=0.2, gt=0)
    cliprange_value: float = Field(default=0.2, gt=0)
    vf_coef: float = Field(default=0.1, ge=0)
    gamma: float = Field(default=1.0, gt=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    whiten_advantages: bool = True


C = TypeVar("C", bound=TrainConfig)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--learning_rate", "1e-4", "--dataset.train", "x.jsonl"]`` -> nested dict; values
    are parsed as YAML scalars (numbers, booleans, null)."""
    out: dict[str, Any] = {}
    if len(args) % 2:
        raise RecipeError("overrides", f"expected --key value pairs, got {' '.join(args)}")
    for key, value in zip(args[::2], args[1::2], strict=True):
        if not key.startswith("--"):
            raise RecipeError("overrides", f"expected --key, got {key!r}")
        node = out
        parts = key[2:].replace("-", "_").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_train_config(
    cls: type[C], path: str | Path | None, overrides: dict[str, Any] | None = None
) -> C:
    """Defaults < YAML file < overrides, validated; errors name the file and key."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise RecipeError(source, "config file does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(source, f"invalid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise RecipeError(source, "a config must be a YAML mapping")
        data = loaded
    data = _merge(data, overrides or {})
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = "unknown key (a typo?)" if err["type"] == "extra_forbidden" else err["msg"]
        msg = msg.removeprefix("Value error, ")
        raise RecipeError(f"{source}: {loc}" if loc else source, msg) from e
