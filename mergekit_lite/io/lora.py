"""Reading PEFT LoRA adapters and folding them into base weights.

A LoRA adapter (Hu et al. 2021, https://arxiv.org/abs/2106.09685) stores, for each
adapted linear module, two low-rank factors ``A`` (r x in) and ``B`` (out x r); the
adapted weight is::

    W' = W + s * B @ A,     s = lora_alpha / r    (lora_alpha / sqrt(r) with use_rslora)

(transposed for GPT-2 style ``Conv1D`` weights, ``fan_in_fan_out: true``). Adapters are
the two files PEFT writes: ``adapter_config.json`` and ``adapter_model.safetensors``,
whose keys look like ``base_model.model.<module>.lora_A.weight``.

In recipes, ``path+adapter_path`` (mergekit's syntax) is the model at ``path`` with the
adapter folded in on the fly: each adapted tensor is computed in float32 when it is read
and cast back to the stored dtype, exactly what folding and saving the model would give.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_lite.errors import CheckpointError
from mergekit_lite.io.safetensors_io import read_safetensors_header, read_tensor

__all__ = ["LoraAdapter", "load_adapter", "PEFT_PREFIX"]

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraFactors:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float
    fan_in_fan_out: bool

    def delta(self) -> torch.Tensor:
        """``s * B @ A`` in float32, in the stored weight's layout."""
        d = (self.b.float() @ self.a.float()) * self.scaling
        return d.T if self.fan_in_fan_out else d


@dataclass(frozen=True)
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    factors: dict[str, LoraFactors]  # keyed by the base weight's name, e.g. "...q_proj.weight"

    def fold(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        f = self.factors.get(name)
        if f is None:
            return weight
        if f.delta().shape != weight.shape:
            raise CheckpointError(
                str(self.path),
                f"adapter for {name} has shape {list(f.delta().shape)}, "
                f"the weight {list(weight.shape)}",
            )
        return (weight.float() + f.delta()).to(weight.dtype)


def load_adapter(path: str | Path) -> LoraAdapter:
    """Load a PEFT LoRA adapter folder (small: kept in memory)."""
    path = Path(path).expanduser()
    cfg_file = path / "adapter_config.json"
    weights = path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(
            str(path),
            "not a LoRA adapter (needs adapter_config.json and adapter_model.safetensors)",
        )
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(str(cfg_file), f"cannot parse JSON: {e}") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(str(cfg_file), f"peft_type {config.get('peft_type')!r} is not LORA")
    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", r))
    scaling = alpha / (r**0.5) if config.get("use_rslora") else alpha / r
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    tensors = {k: read_tensor(v) for k, v in read_safetensors_header(weights).items()}
    factors: dict[str, LoraFactors] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise CheckpointError(str(weights), f"{key} has no matching lora_B")
        name = module.removeprefix(PEFT_PREFIX) + ".weight"
        factors[name] = LoraFactors(a, b, scaling, fan_in_fan_out)
    if not factors:
        raise CheckpointError(str(weights), "adapter has no lora_A/lora_B weights")
    return LoraAdapter(path=path, config=config, factors=factors)
